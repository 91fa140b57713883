"""Detection and instance segmentation: torchvision detectors on deformvit backbones, the
``deformvit detect`` commands on COCO-layout data, and the sizes of DAT Tables 3-4."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deformvit.cli import main
from deformvit.tasks import build_detector, load_model
from deformvit.tools.complexity import count_parameters, framework_macs
from deformvit.data.scenes import write_digit_scenes

SMALL = dict(min_size=128, max_size=128, fpn_channels=32, anchor_sizes=(16, 32, 64, 128, 256),
             representation_size=64)
FAST = ['--workers', '0', '--batch-size', '4', '--set', 'eval_batch_size=4', '--set', 'fpn_channels=32',
        '--set', 'representation_size=64', '--set', 'warmup_updates=0', '--lr', '0.001']


@pytest.fixture(scope='module')
def scenes(tmp_path_factory) -> dict:
    return write_digit_scenes(tmp_path_factory.mktemp('scenes') / 'digits', n_train=16, n_val=8)


def _targets(n: int, size: int = 128, masks: bool = True) -> list:
    targets = []
    for i in range(n):
        target = dict(boxes=torch.tensor([[10.0 + i, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 50.0]]),
                      labels=torch.tensor([1, 2]))
        if masks:
            target['masks'] = torch.zeros(2, size, size, dtype=torch.uint8)
            target['masks'][0, 12:70, 10 + i:60] = 1
            target['masks'][1, 20:50, 70:110] = 1
        targets.append(target)
    return targets


@pytest.mark.parametrize('detector', ['retinanet', 'faster_rcnn', 'mask_rcnn'])
@pytest.mark.parametrize('backbone', ['dat_nano', 'eapt_nano'])
def test_detectors_train_and_predict_on_any_image_size(detector, backbone):
    model = build_detector(detector, backbone, num_classes=3, **SMALL)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 150)]  # resized and padded to a multiple of 32
    losses = model(images, _targets(2, masks=False) if detector != 'mask_rcnn' else [
        dict(t, masks=t['masks'][:, :h, :w]) for t, (h, w) in zip(_targets(2), [(128, 128), (96, 150)])])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    offsets = [p for n, p in model.named_parameters() if 'offset' in n and p.grad is not None]
    assert offsets and any(p.grad.abs().sum() > 0 for p in offsets), 'no gradient reached the offset networks'
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for (h, w), out in zip([(128, 128), (96, 150)], outputs):
        assert out['boxes'].shape[1] == 4 and (out['boxes'][:, 2] <= w + 1e-3).all()
        if detector == 'mask_rcnn':
            assert out['masks'].shape[-2:] == (h, w)


def test_retinanet_uses_p3_to_p7_and_rcnn_p2_to_p6():
    retina = build_detector('retinanet', 'dat_nano', 3, **SMALL)
    rcnn = build_detector('faster_rcnn', 'dat_nano', 3, **SMALL)
    x = torch.rand(1, 3, 128, 128)
    assert [f.shape[-1] for f in retina.backbone(x).values()] == [16, 8, 4, 2, 1]  # strides 8..128
    assert [f.shape[-1] for f in rcnn.backbone(x).values()] == [32, 16, 8, 4, 2]  # strides 4..64


def test_detectors_match_dat_tables_3_and_4_in_parameters():
    # DAT Table 3: RetinaNet DAT-T 38M; Table 4a: Mask R-CNN DAT-T 48M (80 COCO classes)
    assert count_parameters(build_detector('retinanet', 'dat_tiny', 80)) / 1e6 == pytest.approx(38, abs=0.6)
    assert count_parameters(build_detector('mask_rcnn', 'dat_tiny', 80)) / 1e6 == pytest.approx(48, abs=0.6)


def test_retinanet_dat_tiny_macs_match_table3_in_mmcv_convention():
    macs = framework_macs(build_detector('retinanet', 'dat_tiny', 80), (800, 1280), convention='modules')
    assert macs['total'] / 1e9 == pytest.approx(253, rel=0.05)  # DAT Table 3: 253G
    assert macs['total'] == macs['backbone'] + macs['neck'] + macs['head']


def test_multi_scale_training_draws_the_shorter_side_per_image():
    model = build_detector('faster_rcnn', 'dat_nano', 3, min_size=(64, 96, 128), max_size=256, fpn_channels=32)
    model.train()
    sizes = {model.transform(torch.rand(3, 100, 100)[None].unbind(0))[0].image_sizes[0][0] for _ in range(30)}
    assert sizes == {64, 96, 128}
    model.eval()
    assert model.transform([torch.rand(3, 100, 100)])[0].image_sizes[0] == (128, 128)  # the last at test time


def test_unknown_detector_and_bad_anchor_count_are_reported():
    with pytest.raises(ValueError, match='unknown detector'):
        build_detector('yolo', 'dat_nano')
    with pytest.raises(ValueError, match='one per pyramid level'):
        build_detector('retinanet', 'dat_nano', anchor_sizes=(32, 64))


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, '-m', 'deformvit', *args], capture_output=True, text=True, check=check)


def test_detect_train_eval_predict_on_coco_layout(scenes, tmp_path, capsys):
    out = tmp_path / 'run'
    main(['detect', 'train', '--data', str(scenes['coco']), '--output', str(out), '--epochs', '2',
          '--detector', 'mask_rcnn', '--backbone', 'dat_nano', *FAST, '--set', 'min_size=128', '--set', 'max_size=128'])
    printed = capsys.readouterr().out
    assert 'box AP' in printed and 'mask AP' in printed
    for name in ('last.safetensors', 'last.state.pt', 'best.safetensors', 'metrics.csv', 'metrics.png',
                 'per_class_ap.csv', 'config.yaml'):
        assert (out / name).exists(), name
    header = (out / 'metrics.csv').read_text().splitlines()[0].split(',')
    assert {'box_ap', 'box_ap50', 'mask_ap'} <= set(header)
    loaded = load_model(str(out / 'last.safetensors'))
    assert loaded.task == 'detect' and loaded.classes == [str(d) for d in range(10)]
    assert loaded.model.has_masks() and loaded.model.roi_heads.has_mask()

    main(['detect', 'eval', str(out / 'last.safetensors'), '--data', str(scenes['coco']), '--workers', '0'])
    printed = capsys.readouterr().out
    assert 'box  AP' in printed and 'mask AP' in printed and 'per-class box AP' in printed

    images = Path(scenes['coco']) / 'val'
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    main(['detect', 'predict', str(out / 'last.safetensors'), str(images / '000001.png'), str(tmp_path / 'broken.png'),
          '--output', str(tmp_path / 'pred'), '--score-threshold', '0.0'])
    record = json.loads((tmp_path / 'pred' / 'detections.json').read_text())
    assert (tmp_path / 'pred' / '000001.png').exists()
    assert record['unreadable'] == [str(tmp_path / 'broken.png')]
    assert all(set(d) == {'label', 'score', 'box_xyxy'} for d in record['images'][0]['detections'])


def test_detect_train_resumes_with_the_detection_task(scenes, tmp_path):
    out = tmp_path / 'run'
    common = ['detect', 'train', '--data', str(scenes['coco']), '--output', str(out), '--detector', 'retinanet',
              '--backbone', 'dat_nano', *FAST, '--set', 'min_size=128', '--set', 'max_size=128']
    main([*common, '--epochs', '1'])
    main([*common, '--epochs', '2', '--resume'])
    rows = (out / 'metrics.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1'] and 'box_ap' in rows[0]


def test_bad_coco_data_fails_with_a_message(scenes, tmp_path):
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (root / split).mkdir()
        data = json.loads((Path(scenes['coco']) / 'annotations' / f'instances_{split}.json').read_text())
        (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(data))  # images not copied
    result = run_cli('detect', 'train', '--data', str(root), '--output', str(tmp_path / 'run'), *FAST, check=False)
    assert result.returncode == 1 and 'Traceback' not in result.stderr and 'not in' in result.stderr
    result = run_cli('detect', 'train', '--recipe', 'digits', check=False)
    assert result.returncode == 1 and 'deformvit detect train` takes detect recipes' in result.stderr


def test_a_classification_checkpoint_is_not_a_detector(tmp_path):
    from deformvit.checkpoint import metadata_for
    from deformvit.checkpoint import save_safetensors
    path = tmp_path / 'cls.safetensors'
    save_safetensors({'w': torch.zeros(1)}, path, metadata_for('dat_nano', {}, ['a'], 0))
    result = run_cli('detect', 'predict', str(path), str(tmp_path), check=False)
    assert result.returncode == 1
    assert 'is a classification checkpoint (dat_nano); expected a detection one' in result.stderr
