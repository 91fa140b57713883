"""The training config: common fields, recipes and how flags override them.

A recipe (``deformvit/training/recipes/*.yaml``, or any YAML file) holds every
hyper-parameter of a run; the task adds its own fields (:attr:`Task.defaults`). The resolved
config is the defaults, then the recipe, then explicit command-line flags, then
``--set key=value`` overrides, and it is written beside the checkpoints as ``config.yaml``.
:func:`check_config` checks every field before a run does any work; resuming a run
(:func:`resolve_config` with ``resume``) continues the run's own config, which flags may only
extend (:data:`RESUMABLE`).
"""
import copy
import os
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

import yaml
from timm.optim import list_optimizers

from ..errors import UsageError, closest
from ..hub import resolve_weights_spec
from ..runtime import PRECISIONS, resolve_device
from ..tasks import Task, check_model_name, get_task
from ..tasks.base import POSITIVE_INT, Limit

__all__ = ['COMMON_DEFAULTS', 'COMMON_FLAGS', 'COMMON_LIMITS', 'RESUMABLE', 'check_config', 'default_recipe',
           'defaults', 'explicit_fields', 'load_recipe', 'recipe_names', 'resolve_config']

COMMON_DEFAULTS = dict(
    description='', task='classify', data=None, epochs=300, iterations=None, batch_size=128, accum_steps=1,
    opt='adamw', lr=None, lr_base=1e-3, lr_base_size=1024, sched='cosine', min_lr=1e-7, warmup_lr=1e-6,
    warmup_epochs=20, warmup_updates=None, decay_epochs=[], decay_rate=0.1, poly_power=1.0, weight_decay=0.05,
    clip_grad=None, drop_path=0.0, model_ema=False, ema_decay=0.9998, eval_every=1, workers=4, seed=0,
    device='auto', precision='auto', compile=False, grad_checkpointing=False, channels_last=False, pretrained=None,
    output=None,
)
# fields with a flag of every training command; each task adds its own (Task.flags)
COMMON_FLAGS = ('data', 'epochs', 'batch_size', 'accum_steps', 'lr', 'workers', 'seed', 'device', 'precision',
                'output', 'pretrained')
SWITCHES = ('compile', 'grad_checkpointing', 'channels_last', 'model_ema')  # fields turned on by a bare flag
# what the common numeric and choice fields take; the other fields take values of their default's type
COMMON_LIMITS = dict(
    epochs=POSITIVE_INT, iterations=Limit(1, integer=True, optional=True), batch_size=POSITIVE_INT,
    accum_steps=POSITIVE_INT, lr=Limit(0, optional=True), lr_base=Limit(0, open_low=True),
    lr_base_size=Limit(0, open_low=True), sched=Limit(choices=('cosine', 'multistep', 'poly')), min_lr=Limit(0),
    warmup_lr=Limit(0), warmup_epochs=Limit(0), warmup_updates=Limit(0, integer=True, optional=True),
    decay_rate=Limit(0, open_low=True), poly_power=Limit(0, open_low=True),
    weight_decay=Limit(0), clip_grad=Limit(0, open_low=True, optional=True), drop_path=Limit(0, 1, open_high=True),
    ema_decay=Limit(0, 1, open_low=True, open_high=True), eval_every=POSITIVE_INT, workers=Limit(0, integer=True),
    seed=Limit(0, integer=True), precision=Limit(choices=('auto', *PRECISIONS)),
)
# fields a resumed run may change: how long it trains and where
RESUMABLE = ('epochs', 'device', 'workers', 'output')


def _shipped_recipes() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath('recipes').iterdir()
                  if p.name.endswith('.yaml'))


def recipe_names(task: Optional[str] = None) -> List[str]:
    """Names of the shipped recipes (of one task, given ``task``)."""
    names = _shipped_recipes()
    if task is None:
        return names
    return [n for n in names if (load_recipe(n).get('task') or 'classify') == task]


def load_recipe(name_or_path: str) -> Dict:
    """A recipe by name (``dat-in1k``, ``digits``...) or a YAML file path.

    A recipe with a ``base`` field (a recipe name, or a file, relative to the recipe's own folder or to the
    working folder) is that recipe with its own fields on top: a field it names replaces the base's value
    whole (a mapping such as ``backbone_kwargs`` included).
    """
    return _load_recipe(name_or_path, ())


def _load_recipe(name_or_path: str, chain: Tuple[str, ...]) -> Dict:
    if name_or_path in chain:
        raise UsageError(f'recipe {name_or_path!r} is its own base ({" -> ".join(chain + (name_or_path,))}); '
                         'expected a chain of bases that ends in a recipe without one')
    recipe = _read_recipe(name_or_path)
    base = recipe.pop('base', None)
    if base is None:
        return recipe
    if not isinstance(base, str) or not base:
        raise UsageError(f'recipe {name_or_path!r} has base {base!r}; expected the name or file of another recipe')
    beside = os.path.join(os.path.dirname(name_or_path), base)  # a file named relative to the recipe file
    if os.path.isfile(name_or_path) and not os.path.isabs(base) and os.path.isfile(beside):
        base = beside
    return dict(_load_recipe(base, chain + (name_or_path,)), **recipe)


def _read_recipe(name_or_path: str) -> Dict:
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                recipe = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UsageError(f'recipe {name_or_path} is not valid YAML: {" ".join(str(err).split())}') from err
        if not isinstance(recipe, dict):
            raise UsageError(f'recipe {name_or_path} holds a {type(recipe).__name__}; expected a mapping of '
                             'field: value lines (see src/deformvit/training/recipes/*.yaml)')
        return recipe
    names = _shipped_recipes()
    if name_or_path not in names:
        raise UsageError(f'unknown recipe {name_or_path!r}: expected a YAML file or one of {", ".join(names)}'
                         + closest(name_or_path, names))
    return yaml.safe_load(resources.files(__package__).joinpath('recipes', f'{name_or_path}.yaml').read_text())


def default_recipe(task: Task, data: Optional[str], framework: Optional[str] = None) -> str:
    """The recipe of a run without ``--recipe``: the task's (:meth:`Task.default_recipe`), except that a
    run on the built-in scenes with a framework named (``--detector atss``) takes the framework's own
    scenes recipe where one is shipped (``atss-digits``: its options, det-digits' budget)."""
    recipe = task.default_recipe(data)
    if data is None and framework:
        own = f"{framework.replace('_', '-')}-digits"
        if own in _shipped_recipes():
            return own
    return recipe


def defaults(task: Task) -> Dict:
    """Every field of ``task``'s config with its default (a fresh copy)."""
    return copy.deepcopy(dict(COMMON_DEFAULTS, **task.defaults, task=task.name))


def _parse_override(item: str, known: Dict):
    key, sep, value = item.partition('=')
    if not sep:
        raise UsageError(f'--set expects key=value, got {item!r}')
    key = key.replace('-', '_')
    if key not in known:
        raise UsageError(f'--set {key}: unknown field{closest(key, known) or f"; known fields: {sorted(known)}"}')
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise UsageError(f'--set {item}: the value is not valid YAML ({" ".join(str(err).split())})') from err


def explicit_fields(args, task: Task) -> Dict[str, Any]:
    """The fields a command line sets itself: its flags, switches and ``--set`` overrides."""
    fields = defaults(task)
    explicit = {name: getattr(args, name) for name in COMMON_FLAGS + task.flags
                if getattr(args, name, None) is not None}
    explicit.update({flag: True for flag in SWITCHES if getattr(args, flag, False)})
    for item in getattr(args, 'set', None) or []:
        key, value = _parse_override(item, fields)
        explicit[key] = value
    return explicit


def _of_type(default: Any, value: Any) -> bool:
    """Whether ``value`` is of the kind of field whose default is ``default`` (any kind when it is None)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_config(config: Dict, task: Optional[Task] = None) -> None:
    """Check every field of a resolved config before a run does any work.

    Raises:
        UsageError: a field outside its limits (:data:`COMMON_LIMITS`, the task's ``limits``), a value of
            another kind than the field's default, an unknown optimizer, model, framework or device,
            ``pretrained: official`` for a model without official weights (or another model's name), or an
            ``output`` that is a file.
    """
    task = task or get_task(config.get('task') or 'classify')
    fields = defaults(task)
    for name, value in config.items():
        if name in fields and name not in COMMON_LIMITS and name not in task.limits \
                and not _of_type(fields[name], value):
            raise UsageError(f'{name} must be {type(fields[name]).__name__.replace("NoneType", "null")} like its '
                             f'default {fields[name]!r}, got {value!r}')
    for name, limit in COMMON_LIMITS.items():
        limit.check(name, config[name])
    task.check_config(config)
    if config['opt'] not in list_optimizers():
        raise UsageError(f"unknown optimizer {config['opt']!r}" + (closest(config['opt'], list_optimizers())
                                                                   or '; see timm.optim.list_optimizers()'))
    check_model_name(config[task.model_field])
    resolve_weights_spec(config['pretrained'], config[task.model_field])
    resolve_device(config['device'])
    output = config['output']
    if output is not None and os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f'--output {output} is a file; expected the folder of the run (new, or one to --resume)')


def _recorded_config(folder: str) -> Optional[Dict]:
    path = os.path.join(folder, 'config.yaml')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            recorded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f'{path} is not readable ({err}); the run in {folder} cannot be resumed') from err
    return recorded if isinstance(recorded, dict) else None


def _same_value(key: str, value: Any, recorded: Any) -> bool:
    """Whether a field's ``value`` is the ``recorded`` one; the paths of data and weights however written."""
    if key in ('data', 'pretrained') and isinstance(value, str) and isinstance(recorded, str):
        return os.path.abspath(value) == os.path.abspath(recorded)
    return value == recorded


def _resumed(config: Dict, explicit: Dict, task: Task) -> Dict:
    """The config of the run in ``config['output']``, extended by the explicit ``RESUMABLE`` fields."""
    folder = config['output']
    recorded = _recorded_config(folder)
    if recorded is None:  # the loop reports a folder without a resumable run
        return config
    if (recorded.get('task') or 'classify') != task.name:
        raise UsageError(f"{folder} holds a {recorded.get('task') or 'classify'} run; `{task.command} --resume` "
                         f'continues {task.name} runs only')
    changed = sorted(k for k, v in explicit.items()
                     if k not in RESUMABLE and k in recorded and not _same_value(k, v, recorded[k]))
    if changed:
        was = ', '.join(f'{k}={recorded[k]!r}' for k in changed)
        asked = ', '.join(f'{k}={explicit[k]!r}' for k in changed)
        raise UsageError(f'the run in {folder} was trained with {was}; {asked} would not continue it. Resume with '
                         f'only {", ".join("--" + k.replace("_", "-") for k in RESUMABLE[:3])} changed, or start a '
                         'new run in another --output')
    resumed = dict(config)
    resumed.update({k: v for k, v in recorded.items() if k in config})
    resumed.update({k: explicit[k] for k in RESUMABLE if k in explicit})
    return resumed


def resolve_config(args, task: Optional[Task] = None) -> Dict:
    """Defaults, then the recipe, then explicit flags, then ``--set`` overrides.

    With ``args.resume``, the config is the one the run in ``args.output`` recorded, with only the
    :data:`RESUMABLE` fields taken from the command line; another explicit value of any other field
    is refused, since the run would not be continued but silently changed.

    Args:
        args: the parsed command line (any object with the flags as attributes, None for a flag not
            given): ``recipe``, ``set``, ``resume``, the common flags, ``task``'s flags and the switches.
        task: the task trained (default: classification).

    Raises:
        UsageError: an unknown recipe, field or ``--set`` item, a recipe that is not a YAML mapping, a
            recipe of another task, or a resume that would change the run.
    """
    task = task or get_task('classify')
    fields = defaults(task)
    explicit = explicit_fields(args, task)
    recipe = args.recipe or default_recipe(task, args.data, getattr(args, getattr(task, 'framework_field', ''), None))
    loaded = load_recipe(recipe)
    if (loaded.get('task') or 'classify') != task.name:
        raise UsageError(f"recipe {recipe!r} is a {loaded.get('task') or 'classify'} recipe; `{task.command}` takes "
                         f'{task.name} recipes: {recipe_names(task.name)}')
    config = dict(fields, **copy.deepcopy(loaded), recipe=recipe)
    unknown = set(config) - set(fields) - {'recipe'}
    if unknown:
        raise UsageError(f'recipe {recipe!r} has unknown fields {sorted(unknown)}')
    config.update(explicit)
    if 'epochs' in explicit and 'iterations' not in explicit:
        config['iterations'] = None  # an explicit --epochs replaces a recipe's iteration budget
    if isinstance(config['drop_path'], dict):
        config['drop_path'] = config['drop_path'].get(config[task.model_field], 0.0)
    if getattr(args, 'resume', False) and config['output']:
        config = _resumed(config, dict(explicit, **({'recipe': args.recipe} if args.recipe else {})), task)
    return config
