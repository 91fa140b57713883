"""ATSS, RepPoints v2 and Sparse R-CNN through the shared loop and the ``detect`` commands: train, resume,
evaluate, predict, two processes, bf16, checkpoints, the EAPT recipes and the sizes of EAPT Table IV.
The frameworks' own parts (assignment, point sets, matching) are tested in test_atss.py,
test_reppoints.py and test_sparse_rcnn.py."""
import json
import os

import pytest
import torch

from deformvit.checkpoint import metadata_for, save_safetensors
from deformvit.cli import main
from deformvit.data.scenes import write_digit_scenes
from deformvit.tasks import DETECTORS, build_detector, load_model
from deformvit.tools.complexity import count_parameters
from deformvit.tools.paper import EAPT_TABLE_IV

FRAMEWORKS = ('atss', 'reppoints_v2', 'sparse_rcnn')
SMALL = dict(min_size=128, max_size=128, fpn_channels=32)
# untrained dense heads score about 0.01 x 0.5, under the 0.05 threshold: the tests look at every detection
OPTIONS = dict(atss=dict(score_thresh=0.0), reppoints_v2=dict(score_thresh=0.0), sparse_rcnn=dict(num_proposals=20))
FAST = ['--workers', '0', '--batch-size', '4', '--set', 'eval_batch_size=4', '--set', 'fpn_channels=32',
        '--set', 'warmup_updates=0', '--lr', '0.001', '--set', 'min_size=128', '--set', 'max_size=128']


def _options(name: str) -> list:
    return ['--set', 'detector_kwargs=' + json.dumps(OPTIONS[name])] if OPTIONS[name] else []


@pytest.fixture(scope='module')
def scenes(tmp_path_factory) -> dict:
    return write_digit_scenes(tmp_path_factory.mktemp('scenes') / 'digits', n_train=8, n_val=4)


def _model(name: str, backbone: str = 'dat_nano', **kwargs):
    torch.manual_seed(0)
    return build_detector(name, backbone, 3, **SMALL, **dict(OPTIONS[name], **kwargs))


def test_the_frameworks_of_eapt_table_4_are_registered():
    assert set(FRAMEWORKS) <= set(DETECTORS)
    assert {detector for detector, _ in EAPT_TABLE_IV} <= set(DETECTORS)


@pytest.mark.parametrize('name', FRAMEWORKS)
def test_detect_commands_train_resume_evaluate_and_predict(scenes, tmp_path, capsys, name):
    out = tmp_path / 'run'
    common = ['detect', 'train', '--data', scenes['coco'], '--output', str(out), '--detector', name,
              '--backbone', 'dat_nano', *FAST, *_options(name)]
    main([*common, '--epochs', '1'])
    main([*common, '--epochs', '2', '--resume'])
    printed = capsys.readouterr().out
    assert 'box AP' in printed and 'mask AP' not in printed
    rows = (out / 'metrics.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1'] and 'box_ap' in rows[0]
    loaded = load_model(str(out / 'last.safetensors'))
    assert isinstance(loaded.model, DETECTORS[name]) and not loaded.model.has_masks()
    assert loaded.classes == [str(d) for d in range(10)]

    main(['detect', 'eval', str(out / 'last.safetensors'), '--data', scenes['coco'], '--workers', '0'])
    assert 'box  AP' in capsys.readouterr().out
    main(['detect', 'predict', str(out / 'last.safetensors'), os.path.join(scenes['coco'], 'val'),
          '--output', str(tmp_path / 'pred'), '--score-threshold', '0.0'])
    record = json.loads((tmp_path / 'pred' / 'detections.json').read_text())
    assert len(record['images']) == 4 and len(list((tmp_path / 'pred').glob('*.png'))) == 4
    detections = [d for image in record['images'] for d in image['detections']]
    assert detections and all(d['label'] in loaded.classes and 0 <= d['score'] <= 1 for d in detections)
    assert all(0 <= v <= 128 for d in detections for v in d['box_xyxy'])


@pytest.mark.parametrize('name', FRAMEWORKS)
def test_checkpoints_rebuild_the_same_detector_through_the_one_loader(tmp_path, name):
    model = _model(name).eval()
    path = tmp_path / 'detector.safetensors'
    kwargs = {k: v for k, v in model.config.items() if k != 'detector'}
    save_safetensors(model.state_dict(), str(path), metadata_for(name, kwargs, ['a', 'b', 'c'], 0, task='detect'))
    loaded = load_model(str(path)).model.eval()
    assert type(loaded) is type(model)
    image = [torch.rand(3, 112, 150)]
    with torch.no_grad():
        expected, got = model(image)[0], loaded(image)[0]
    assert expected['boxes'].shape[0] > 0
    for key in ('boxes', 'labels', 'scores'):
        torch.testing.assert_close(expected[key], got[key])


@pytest.mark.parametrize('name', FRAMEWORKS)
def test_a_bfloat16_autocast_step_gives_finite_losses_and_float32_detections(name):
    model = _model(name)
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 50.0]]),
                    labels=torch.tensor([1, 3]))]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model([torch.rand(3, 128, 128)], targets)
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            detections = model([torch.rand(3, 128, 128)])[0]
    assert losses and all(torch.isfinite(v) for v in losses.values())
    assert detections['boxes'].dtype == detections['scores'].dtype == torch.float32


def test_two_process_runs_of_the_three_frameworks(tmp_path, scenes, two_process_detection):
    for name in FRAMEWORKS:
        out = tmp_path / name
        two_process_detection(scenes['coco'], out, name, *_options(name))
        assert isinstance(load_model(str(out / 'last.safetensors')).model, DETECTORS[name])


@pytest.mark.parametrize('args, message', [
    (['--detector', 'atss', '--set', 'detector_kwargs={rpn_pre_nms_top_n_train: 600}'],
     'takes no option rpn_pre_nms_top_n_train'),
    (['--detector', 'sparse_rcnn', '--set', 'detector_kwargs={num_proposals: 0}'], 'num_proposals'),
    (['--detector', 'reppoints_v2', '--set', 'detector_kwargs={nms_thresh: -1}'], 'nms_thresh'),
    (['--detector', 'atss', '--set', 'anchor_sizes=[8, 16]'], 'anchor_sizes must be a list of 5'),
    (['--detector', 'sparse_rcnn', '--backbone', 'eapt_nano', '--set', 'backbone_kwargs={broaden: 0}'],
     "backbone_kwargs: eapt_nano takes no argument 'broaden'"),
])
def test_careless_settings_stop_before_any_work(refused_before_work, args, message):
    refused_before_work(['detect', 'train', *args], message)


def test_table_7_recipes_build_eapt_small_without_the_components_they_name():
    from deformvit.training import load_recipe
    full = load_recipe('eapt-sparse-rcnn-3x')
    kwargs = dict(num_classes=3, **SMALL, **dict(full['detector_kwargs'], num_proposals=10))
    sizes = {}
    for name in ('eapt-sparse-rcnn-3x', 'eapt-sparse-rcnn-3x-no-deform', 'eapt-sparse-rcnn-3x-no-endec'):
        recipe = load_recipe(name)
        model = build_detector(recipe['detector'], recipe['backbone'], backbone_kwargs=recipe.get('backbone_kwargs'),
                               **kwargs)
        sizes[name] = count_parameters(model.backbone.body)
        assert model.config['backbone_kwargs'] == recipe.get('backbone_kwargs', {})
    # each component removed takes its parameters with it (the offset networks, the encoder-decoder)
    assert sizes['eapt-sparse-rcnn-3x'] > sizes['eapt-sparse-rcnn-3x-no-deform']
    assert sizes['eapt-sparse-rcnn-3x'] > sizes['eapt-sparse-rcnn-3x-no-endec']


@pytest.mark.parametrize('name', FRAMEWORKS)
@pytest.mark.parametrize('backbone', ['resnet50', 'swin_tiny_patch4_window7_224'])
def test_parameters_match_eapt_table_4_within_3_percent(name, backbone):
    paper = EAPT_TABLE_IV[(name, backbone)]['params']
    assert count_parameters(build_detector(name, backbone, 80)) / 1e6 == pytest.approx(paper, rel=0.03)


def test_deformable_convolutions_count_as_the_convolutions_they_are():
    from torchvision.ops import DeformConv2d
    from deformvit.tools.complexity import count_macs_of
    conv = DeformConv2d(16, 32, 3, padding=1, groups=2)
    x, offsets = torch.randn(1, 16, 10, 12), torch.randn(1, 18, 10, 12)
    for convention in ('fvcore', 'modules'):  # 32 outputs x 10 x 12 positions x (16 / 2 channels x 3 x 3 taps)
        assert count_macs_of(lambda: conv(x, offsets), convention)[0] == 32 * 10 * 12 * 8 * 9


@pytest.mark.parametrize('name', list(DETECTORS))
def test_every_detector_runs_on_the_scenes_without_a_recipe(name):
    """``deformvit detect train --detector NAME`` takes the framework's own scenes recipe where one is shipped
    (its options on det-digits' budget), det-digits otherwise, and every such config passes the checks."""
    import argparse
    from deformvit.cli.train import add_training_arguments
    from deformvit.tasks import get_task
    from deformvit.training import check_config, resolve_config
    from deformvit.training.config import default_recipe
    task = get_task('detect')
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, task)
    config = resolve_config(parser.parse_args(['--detector', name]), task)
    check_config(config, task)
    own = {'atss': 'atss-digits', 'reppoints_v2': 'reppoints-v2-digits', 'sparse_rcnn': 'sparse-rcnn-digits',
           'htc': 'htc-digits', 'retinanet': 'retinanet-digits'}
    assert config['recipe'] == own.get(name, 'det-digits') and config['detector'] == name
    assert default_recipe(task, '/data/coco', name) == 'det-1x'  # with data: the paper's recipe
