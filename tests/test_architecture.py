"""The package's shape: imports run one way (cli -> training / tools -> tasks -> models / data ->
layers, checkpoint, runtime -> errors), tools build models only through the one loader, tasks keep no
state, and the attention switches leave a model as they found it."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

import deformvit
from deformvit.layers import attention_switches
from deformvit.tasks import create_model, get_task
from deformvit.training import defaults

PACKAGE = Path(deformvit.__file__).parent
ROOT = PACKAGE.name

# rank of each part of the package: a module may import its own part and parts of a lower rank
RANKS = {
    'errors': 0, 'version': 0,
    'layers': 1, 'checkpoint': 1, 'runtime': 1,
    'hub': 2,
    'models': 3, 'data': 3,
    'tasks': 4,
    'training': 5, 'tools': 5,
    'cli': 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in PACKAGE.rglob('*.py')}


def _resolve(module: str, node: ast.AST) -> List[str]:
    """The deformvit modules one import statement of ``module`` binds."""
    is_package = MODULES[module].name == '__init__.py'
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split('.')[0] == ROOT]
    if node.level:
        anchor = module.split('.')
        anchor = anchor[:len(anchor) - node.level + is_package]
        base = '.'.join(anchor + (node.module.split('.') if node.module else []))
    else:
        base = node.module or ''
    if base.split('.')[0] != ROOT:
        return []
    targets = [f'{base}.{alias.name}' for alias in node.names if f'{base}.{alias.name}' in MODULES]
    if len(targets) < len(node.names):  # names defined in the module itself
        targets.append(base)
    return targets


def import_graph() -> Dict[str, Set[str]]:
    """``{module: modules it imports}``, at module level and inside functions alike."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in _resolve(module, node) if target != module}
    return graph


def part(module: str) -> str:
    return module.split('.')[1] if '.' in module else ''


def test_the_import_graph_covers_every_module_and_finds_known_edges():
    graph = import_graph()
    assert set(graph) == set(MODULES) and len(MODULES) > 40
    assert 'deformvit.layers' in graph['deformvit.models.dat']
    assert 'deformvit.tasks.necks' in graph['deformvit.tasks.detection.base']
    assert 'deformvit.tasks.detection' in graph['deformvit.tasks.detection.task']  # ``from . import DETECTORS``
    assert 'deformvit.tasks.segmentation.segmentor' in graph['deformvit.tasks.segmentation.upernet']


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    seen, active, cycles = set(), [], []

    def visit(module: str) -> None:
        seen.add(module)
        active.append(module)
        for target in sorted(graph[module]):
            if target in active:
                cycles.append(active[active.index(target):] + [target])
            elif target not in seen:
                visit(target)
        active.pop()

    for module in sorted(graph):
        if module not in seen:
            visit(module)
    assert not cycles, '\n'.join(' -> '.join(cycle) for cycle in cycles)


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert set(part(m) for m in MODULES) - {'', '__main__'} == set(RANKS), 'a part of the package has no rank'
    upward = []
    for module, targets in graph.items():
        if part(module) in ('', '__main__'):  # the facade and `python -m deformvit` import anything
            continue
        for target in targets:
            if target == ROOT:
                upward.append(f'{module} imports the package facade {ROOT}')
            elif part(target) != part(module) and RANKS[part(target)] >= RANKS[part(module)]:
                upward.append(f'{module} ({part(module)}) imports {target} ({part(target)})')
    assert not upward, '\n'.join(upward)


def test_models_and_layers_import_nothing_above_them():
    graph = import_graph()
    for module, targets in graph.items():
        if part(module) in ('models', 'layers'):
            assert not {part(t) for t in targets} & {'tasks', 'training', 'tools', 'cli', 'data'}, module


@pytest.mark.parametrize('folder', ['tools', 'cli'])
def test_tools_and_commands_build_models_only_through_the_loader(folder):
    for path in (PACKAGE / folder).rglob('*.py'):
        tree = ast.parse(path.read_text())
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == 'create_model'
                 and isinstance(node.value, ast.Name) and node.value.id == 'timm']
        assert not calls, f'{path.relative_to(PACKAGE)} calls timm.create_model; use deformvit.tasks.load_model'


# --- tasks keep no state -------------------------------------------------------------------------

NANO = {'classify': dict(model='dat_nano', img_size=32),
        'detect': dict(backbone='dat_nano', detector='mask_rcnn', fpn_channels=16, representation_size=32),
        'segment': dict(backbone='dat_nano', decoder='semantic_fpn', decoder_channels=16, fpn_channels=16)}


@pytest.mark.parametrize('name', ['classify', 'detect', 'segment'])
def test_tasks_keep_no_state_and_answer_in_any_order(name):
    task = get_task(name)
    config = dict(defaults(task), **NANO[name])
    metrics = task.metrics(config)  # before any data or model exists
    model, architecture, kwargs = task.build_model(config, ['a', 'b'])
    step = task.training_step(config, ['a', 'b'])
    assert task.metrics(config) == metrics and callable(step)
    assert vars(task) == {}, f'{name} task kept {sorted(vars(task))}'
    if name == 'detect':  # masks are asked of the framework, not of its name
        assert model.has_masks() and 'mask_ap' in metrics
        assert 'mask_ap' not in task.metrics(dict(config, detector='faster_rcnn'))
    assert architecture in (config.get('model'), config.get('detector'), config.get('decoder'))


def test_task_defaults_are_fresh_copies():
    task = get_task('classify')
    first = defaults(task)
    first['scale'].append(99)
    assert defaults(task)['scale'] == [0.08, 1.0]


# --- one switch for attention modules --------------------------------------------------------------

@pytest.mark.parametrize('name', ['dat_nano', 'eapt_nano'])
def test_attention_switches_restore_every_flag_and_drop_the_records(name):
    model = create_model(name).eval()
    before = {(n, flag): getattr(m, flag) for n, m in model.named_modules()
              for flag in ('fused_attn', 'record_sampling', 'record_attention') if hasattr(m, flag)}
    assert any(flag == 'fused_attn' for _, flag in before)
    with pytest.raises(RuntimeError, match='inside'):
        with attention_switches(model, fused=False, record_sampling=True, record_attention=True) as switched:
            assert switched and all(not m.fused_attn for m in switched if hasattr(m, 'fused_attn'))
            with torch.no_grad():
                model(torch.randn(1, 3, 32, 32))
            assert all(m.last_sampling is not None for m in switched if hasattr(m, 'record_sampling')
                       and getattr(m, 'deformable', False))
            raise RuntimeError('inside')
    after = {(n, flag): getattr(m, flag) for n, m in model.named_modules()
             for flag in ('fused_attn', 'record_sampling', 'record_attention') if hasattr(m, flag)}
    assert after == before
    assert all(getattr(m, 'last_sampling', None) is None and getattr(m, 'last_attention', None) is None
               for m in model.modules())


@pytest.mark.parametrize('name', ['dat_nano', 'eapt_nano'])
def test_both_families_list_deformable_blocks_and_their_sampling_points(name):
    model = create_model(name).eval()
    blocks = model.deformable_blocks()
    logits, records = model.forward_sampling_points(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000) and blocks
    assert [(r.stage, r.block) for r in records] == [(i, j) for i, j, _ in blocks]
    for record in records:
        assert record.points.shape == record.reference.shape and record.points.shape[0] == 2
        size = torch.tensor(record.feature_size) * record.stride
        assert (record.to_pixels('reference') >= -0.5).all() and (record.to_pixels('reference') <= size).all()
