"""The training config: common fields, recipes and how flags override them.

A recipe (``deformvit/training/recipes/*.yaml``, or any YAML file) holds every
hyper-parameter of a run; the task adds its own fields (:attr:`Task.defaults`). The resolved
config is the defaults, then the recipe, then explicit command-line flags, then
``--set key=value`` overrides, and it is written beside the checkpoints as ``config.yaml``.
"""
import copy
import os
from importlib import resources
from typing import Dict, List, Optional

import yaml

from ..tasks import Task, get_task

__all__ = ['COMMON_DEFAULTS', 'COMMON_FLAGS', 'defaults', 'load_recipe', 'recipe_names', 'resolve_config']

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
    """A recipe by name (``dat-in1k``, ``digits``...) or a YAML file path."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            return yaml.safe_load(f) or {}
    names = _shipped_recipes()
    if name_or_path not in names:
        raise ValueError(f'unknown recipe {name_or_path!r}: expected a YAML file or one of {names}')
    return yaml.safe_load(resources.files(__package__).joinpath('recipes', f'{name_or_path}.yaml').read_text())


def defaults(task: Task) -> Dict:
    """Every field of ``task``'s config with its default (a fresh copy)."""
    return copy.deepcopy(dict(COMMON_DEFAULTS, **task.defaults, task=task.name))


def _parse_override(item: str, known: Dict):
    key, sep, value = item.partition('=')
    if not sep:
        raise ValueError(f'--set expects key=value, got {item!r}')
    key = key.replace('-', '_')
    if key not in known:
        raise ValueError(f'--set {key}: unknown field; known fields: {sorted(known)}')
    return key, yaml.safe_load(value)


def resolve_config(args, task: Optional[Task] = None) -> Dict:
    """Defaults, then the recipe, then explicit flags, then ``--set`` overrides.

    Args:
        args: the parsed command line (any object with the flags as attributes, None for a flag not
            given): ``recipe``, ``set``, the common flags, ``task``'s flags and the switches.
        task: the task trained (default: classification).
    """
    task = task or get_task('classify')
    fields = defaults(task)
    recipe = args.recipe or task.default_recipe(args.data)
    loaded = load_recipe(recipe)
    if (loaded.get('task') or 'classify') != task.name:
        raise ValueError(f"recipe {recipe!r} is a {loaded.get('task') or 'classify'} recipe; `{task.command}` takes "
                         f'{task.name} recipes: {recipe_names(task.name)}')
    config = dict(fields, **copy.deepcopy(loaded), recipe=recipe)
    unknown = set(config) - set(fields) - {'recipe'}
    if unknown:
        raise ValueError(f'recipe {recipe!r} has unknown fields {sorted(unknown)}')
    for name in COMMON_FLAGS + task.flags:
        value = getattr(args, name, None)
        if value is not None:
            config[name] = value
    if args.epochs is not None and getattr(args, 'iterations', None) is None:
        config['iterations'] = None  # an explicit --epochs replaces a recipe's iteration budget
    for flag in SWITCHES:
        if getattr(args, flag, False):
            config[flag] = True
    for item in args.set or []:
        key, value = _parse_override(item, fields)
        config[key] = value
    if isinstance(config['drop_path'], dict):
        config['drop_path'] = config['drop_path'].get(config[task.model_field], 0.0)
    return config
