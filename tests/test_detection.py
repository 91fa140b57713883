"""Detection and instance segmentation: torchvision detectors on deformvit backbones, the
``deformvit detect`` commands on COCO-layout data, and the sizes of DAT Tables 3-4."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deformvit.checkpoint import metadata_for, save_safetensors
from deformvit.cli import main
from deformvit.runtime import DistributedContext
from deformvit.tasks import build_detector, load_model
from deformvit.tasks.dense import output_names
from deformvit.tasks.detection.task import evaluate_detector, predict
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


def test_channels_last_timm_backbones_give_channels_first_levels_at_any_size():
    from deformvit.tasks.necks import create_backbone
    body = create_backbone('swin_tiny_patch4_window7_224')  # built for 224x224, channels-last levels
    with torch.no_grad():
        levels = body(torch.rand(1, 3, 192, 320))
    assert [tuple(level.shape) for level in levels] == [(1, c, 192 // s, 320 // s) for c, s in
                                                        zip((96, 192, 384, 768), (4, 8, 16, 32))]


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
    main(['detect', 'predict', str(out / 'last.safetensors'), str(images), str(tmp_path / 'broken.png'),
          '--output', str(tmp_path / 'pred'), '--score-threshold', '0.0'])
    record = json.loads((tmp_path / 'pred' / 'detections.json').read_text())
    relative = images.relative_to(tmp_path.parent)  # several inputs: paths below the folder holding both
    assert record['images'][0]['outputs'] == [str(relative / '000001.png')]
    assert (tmp_path / 'pred' / relative / '000001.png').exists()
    assert [entry['file'] for entry in record['skipped']] == [str(tmp_path / 'broken.png')]
    assert record['skipped'][0]['reason'].startswith('not a readable image')
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
    assert result.returncode == 2 and 'deformvit detect train` takes detect recipes' in result.stderr


def test_a_classification_checkpoint_is_not_a_detector(tmp_path):
    from deformvit.checkpoint import metadata_for
    from deformvit.checkpoint import save_safetensors
    path = tmp_path / 'cls.safetensors'
    save_safetensors({'w': torch.zeros(1)}, path, metadata_for('dat_nano', {}, ['a'], 0))
    result = run_cli('detect', 'predict', str(path), str(tmp_path), check=False)
    assert result.returncode == 1
    assert 'is a classification checkpoint (dat_nano); expected a detection one' in result.stderr


# ---- eval on the val split alone, predict that keeps the user's files ----------------------------

CLASSES = ['a', 'b', 'c']


def _detector(folder: Path) -> Path:
    """A small Faster R-CNN (input 64x64, every box kept) saved as a training run's checkpoint."""
    model = build_detector('faster_rcnn', 'dat_nano', len(CLASSES), min_size=64, max_size=64, fpn_channels=16,
                           representation_size=32, box_score_thresh=0.0)
    path = folder / 'detector.safetensors'
    kwargs = {k: v for k, v in model.config.items() if k != 'detector'}
    save_safetensors(model.state_dict(), str(path), metadata_for('faster_rcnn', kwargs, CLASSES, 0, task='detect'))
    return path


def _photo(path: Path, size=(40, 30)) -> Path:
    """A plain orange image in PNG, whatever the extension of ``path`` (Pillow reads files by their content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, (200, 120, 40)).save(path, format='PNG')
    return path


@pytest.mark.parametrize('split', ['val2017', 'val'])
def test_eval_needs_only_the_val_split(tmp_path, split):
    for image_id in (1, 2):
        _photo(tmp_path / split / f'{image_id}.png', size=(64, 48))
    (tmp_path / 'annotations').mkdir()
    (tmp_path / 'annotations' / f'instances_{split}.json').write_text(json.dumps(dict(
        images=[dict(id=i, file_name=f'{i}.png', width=64, height=48) for i in (1, 2)],
        annotations=[dict(id=i, image_id=i, category_id=i, bbox=[8, 8, 20, 16]) for i in (1, 2)],
        categories=[dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)])))
    evaluation, images = evaluate_detector(load_model(str(_detector(tmp_path))), str(tmp_path), DistributedContext(),
                                           workers=0)
    assert images == str(tmp_path / split) and evaluation.images == 2 and 'box_ap' in evaluation.metrics


def test_output_names_mirror_the_inputs_and_keep_the_extension_where_names_would_meet(tmp_path):
    photos = tmp_path / 'photos'
    names = ('a/x.jpg', 'b/x.jpg', 'x.jpg', 'x.png', 'y.jpeg', 'x', 'x_overlay')
    files = [str(_photo(photos / name)) for name in names]
    assert output_names(files[:5], [str(photos)], ['.png']) == [
        ['a/x.png'], ['b/x.png'], ['x.jpg.png'], ['x.png.png'], ['y.png']]
    assert output_names(files[:2], files[:2], ['.png']) == [['a/x.png'], ['b/x.png']]  # their common folder
    assert output_names(files[:2], [str(photos / 'a'), str(photos / 'b')], ['.png']) == [['a/x.png'], ['b/x.png']]
    assert output_names(files[4:5], files[4:5], ['.png']) == [['y.png']]  # a single file: its name
    assert output_names(files[:1], [str(photos / 'a')], ['.png']) == [['x.png']]
    # files given without an extension can meet even so: the later one takes a number
    assert output_names(files[5:], files[5:], ['.png', '_overlay.png']) == [
        ['x.png', 'x_overlay.png'], ['x_overlay~2.png', 'x_overlay~2_overlay.png']]


def test_predict_mirrors_the_folders_and_keeps_every_result(tmp_path):
    photos = tmp_path / 'photos'
    for name in ('a/x.jpg', 'b/x.jpg', 'x.jpg', 'x.png'):
        _photo(photos / name)
    result = predict(load_model(str(_detector(tmp_path))), [str(photos)], str(tmp_path / 'out'), score_threshold=0.0)
    record = json.loads((tmp_path / 'out' / 'detections.json').read_text())
    assert [(r['file'], r['outputs']) for r in record['images']] == [
        (str(photos / 'a/x.jpg'), ['a/x.png']), (str(photos / 'b/x.jpg'), ['b/x.png']),
        (str(photos / 'x.jpg'), ['x.jpg.png']), (str(photos / 'x.png'), ['x.png.png'])]
    written = sorted(str(path.relative_to(tmp_path / 'out')) for path in (tmp_path / 'out').rglob('*.png'))
    assert written == ['a/x.png', 'b/x.png', 'x.jpg.png', 'x.png.png']
    assert result['images'] == record['images'] and record['skipped'] == [] == result['skipped']


def test_predict_refuses_an_output_among_the_inputs_or_a_bad_threshold_before_creating_anything(tmp_path):
    loaded = load_model(str(_detector(tmp_path)))
    photos = tmp_path / 'photos'
    photo = _photo(photos / 'x.png')
    _photo(tmp_path / 'other' / 'y.png')
    for inputs, output, match in (
            ([photos], photos, 'is the input folder'),
            ([photos], photos / 'results', 'is inside the input folder'),
            ([photo], photos, 'holds the input'),
            ([photo, tmp_path / 'other' / 'y.png'], tmp_path, r'would replace the input image\(s\) .*photos/x.png')):
        with pytest.raises(ValueError, match=match):
            predict(loaded, [str(item) for item in inputs], str(output))
    for threshold in (-0.1, 1.5, float('nan')):
        with pytest.raises(ValueError, match=rf'score_threshold {threshold} is outside \[0, 1\]'):
            predict(loaded, [str(photos)], str(tmp_path / 'out'), score_threshold=threshold)
    assert sorted(path.name for path in tmp_path.rglob('*')) == ['detector.safetensors', 'other', 'photos', 'x.png',
                                                                 'y.png']


def test_predict_skips_unreadable_bomb_and_too_thin_images_with_their_reason(tmp_path, bomb_png):
    photos = tmp_path / 'photos'
    _photo(photos / 'good.png')
    _photo(photos / 'thin.png', size=(2000, 3))  # resized to 64x0: interpolate used to raise and end the folder
    bomb_png(photos / 'bomb.png')
    (photos / 'broken.jpg').write_bytes(b'not a JPEG')
    result = predict(load_model(str(_detector(tmp_path))), [str(photos)], str(tmp_path / 'out'))
    record = json.loads((tmp_path / 'out' / 'detections.json').read_text())
    assert [r['file'] for r in record['images']] == [str(photos / 'good.png')]
    reasons = {Path(entry['file']).name: entry['reason'] for entry in record['skipped']}
    assert reasons['bomb.png'].startswith('too large to decode (Image size (3600000000 pixels) exceeds limit')
    assert reasons['broken.jpg'].startswith('not a readable image')
    assert reasons['thin.png'] == ("too thin to detect in: 2000x3 pixels (width x height) become 64x0 at the "
                                   "detector's input size (shorter side 64, longer side at most 64); expected a "
                                   "longer side at most 64 times the shorter one")
    assert sorted(entry['file'] for entry in result['skipped']) == sorted(
        str(photos / name) for name in ('bomb.png', 'broken.jpg', 'thin.png'))
    assert sorted(path.name for path in (tmp_path / 'out').iterdir()) == ['detections.json', 'good.png']
