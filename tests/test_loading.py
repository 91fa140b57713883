"""The one loader (``deformvit.load_model``): every kind of name and file, and the errors of a wrong one."""
import json
from pathlib import Path

import pytest
import timm
import torch

import deformvit
from deformvit.checkpoint import metadata_for, save_safetensors
from deformvit.tasks import TaskMismatchError, build_detector, build_segmentor, load_model
from deformvit.tools.convert import convert_checkpoint

FIXTURES = Path(__file__).parent / 'fixtures'
DENSE = dict(detect=lambda: build_detector('faster_rcnn', 'dat_nano', 3, min_size=64, max_size=64, fpn_channels=16,
                                           representation_size=32),
             segment=lambda: build_segmentor('semantic_fpn', 'dat_nano', 3, channels=16, fpn_channels=16))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def training_checkpoint(folder: Path, task: str) -> tuple:
    """A model of ``task`` and the ``best.safetensors`` a training run would write for it."""
    if task == 'classify':
        model, architecture, kwargs = timm.create_model('dat_nano', num_classes=3), 'dat_nano', dict(num_classes=3)
    else:
        model = DENSE[task]()
        architecture = model.config['detector' if task == 'detect' else 'decoder']
        kwargs = {k: v for k, v in model.config.items() if k not in ('detector', 'decoder')}
    path = folder / f'{task}.safetensors'
    save_safetensors(model.state_dict(), str(path), metadata_for(architecture, kwargs, ['a', 'b', 'c'], 0, task=task))
    return model, path


def test_a_name_builds_random_weights_and_a_close_typo_is_named():
    loaded = deformvit.load_model('dat_nano')
    assert (loaded.architecture, loaded.task, loaded.classes, loaded.weights) == (
        'dat_nano', 'classify', None, 'random weights, untrained')
    assert not loaded.model.training
    with pytest.raises(ValueError, match="unknown model 'dat_nanno'.*did you mean dat_nano"):
        load_model('dat_nanno')
    with pytest.raises(ValueError, match='name a model or a weights file'):
        load_model()
    assert tuple(load_model('dat_nano', size=64).model.img_size) == (64, 64)
    for size in (0, -1):
        with pytest.raises(ValueError, match=f'size must be a positive input side in pixels, got {size}'):
            load_model('dat_nano', size=size)


@pytest.mark.parametrize('task', ['classify', 'detect', 'segment'])
def test_training_checkpoints_of_every_task_rebuild_their_model(tmp_path, task):
    model, path = training_checkpoint(tmp_path, task)
    loaded = load_model(str(path))
    assert loaded.task == task and loaded.classes == ['a', 'b', 'c'] and loaded.source == str(path)
    assert same_weights(loaded.model, model) and not loaded.model.training
    assert load_model(checkpoint=str(path), task=task).task == task


@pytest.mark.parametrize('task, expected', [('classify', 'detect'), ('detect', 'segment'), ('segment', 'classify')])
def test_a_checkpoint_of_another_task_is_refused_by_name(tmp_path, task, expected):
    _, path = training_checkpoint(tmp_path, task)
    words = dict(classify='classification', detect='detection', segment='segmentation')
    with pytest.raises(TaskMismatchError, match=f'is a {words[task]} checkpoint .*; expected a {words[expected]} one'):
        load_model(str(path), task=expected)


def test_an_official_release_file_is_recognised_by_its_shapes(tmp_path):
    meta = json.loads((FIXTURES / 'dat_official_mini.json').read_text())
    kwargs = meta['deformvit_kwargs']
    loaded = load_model('dat_tiny', str(FIXTURES / 'dat_official_mini.pth'), **kwargs)
    reference = timm.create_model('dat_tiny', pretrained=True, **kwargs,
                                  pretrained_cfg_overlay=dict(file=str(FIXTURES / 'dat_official_mini.pth')))
    assert same_weights(loaded.model, reference) and loaded.weights == 'weights dat_official_mini.pth'
    released = tmp_path / 'dat_tiny.pth'
    torch.save({'model': timm.create_model('dat_tiny').state_dict()}, released)
    assert load_model(str(released)).architecture == 'dat_tiny'  # no name: inferred from the weights
    with pytest.raises(ValueError, match='not a DAT state dict'):
        torch.save({'model': {'foo.weight': torch.zeros(2)}}, released)
        load_model(str(released))


def test_a_converted_file_records_its_model_and_arguments(tmp_path):
    meta = json.loads((FIXTURES / 'dat_official_mini.json').read_text())
    converted = tmp_path / 'mini.safetensors'
    convert_checkpoint(str(FIXTURES / 'dat_official_mini.pth'), str(converted), 'dat_tiny', **meta['deformvit_kwargs'])
    loaded = load_model(str(converted))
    assert loaded.architecture == 'dat_tiny' and loaded.classes is None
    assert loaded.model.num_classes == meta['deformvit_kwargs']['num_classes']


def test_a_classifier_checkpoint_takes_a_new_size_but_never_a_new_class_count(tmp_path):
    model, path = training_checkpoint(tmp_path, 'classify')
    larger = load_model(str(path), img_size=64)
    assert larger.model.num_classes == 3 and tuple(larger.model.img_size) == (64, 64)
    with pytest.raises(ValueError, match='predicts 3 classes; num_classes=10 would replace its classifier'):
        load_model(str(path), num_classes=10)
    _, dense = training_checkpoint(tmp_path, 'detect')
    with pytest.raises(ValueError, match='records its own model arguments'):
        load_model(str(dense), min_size=32)


def test_missing_unreadable_and_mismatched_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint file at nowhere.safetensors'):
        load_model('nowhere.safetensors')
    empty = tmp_path / 'empty.safetensors'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match='not a readable safetensors file'):
        load_model(str(empty))
    _, path = training_checkpoint(tmp_path, 'classify')
    with pytest.raises(ValueError, match='holds a dat_nano model, not eapt_nano'):
        load_model('eapt_nano', str(path))
    with pytest.raises(ValueError, match='is a file; name the model it belongs to'):
        load_model(str(path), str(path))
    bare = tmp_path / 'bare.safetensors'
    save_safetensors(timm.create_model('dat_nano').state_dict(), str(bare))
    with pytest.raises(ValueError, match='does not record its architecture'):
        load_model(str(bare), task='detect')
    with pytest.raises(ValueError, match='bare.safetensors does not fit this model'):
        load_model('dat_nano', str(bare), embed_dims=(32, 64, 128, 128))
