"""Semantic segmentation: Semantic FPN / UperNet on deformvit backbones, whole / sliding /
multi-scale inference, the ``deformvit segment`` commands and the sizes of DAT Table 5."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deformvit.checkpoint import metadata_for, save_safetensors
from deformvit.cli import main
from deformvit.runtime import DistributedContext
from deformvit.tasks import build_segmentor, load_model
from deformvit.tasks.segmentation.inference import segment_logits
from deformvit.tasks.segmentation.task import SegmentationTask, evaluate_segmentor, predict
from deformvit.tools.complexity import count_parameters
from deformvit.data.scenes import write_digit_scenes

FAST = ['--workers', '0', '--batch-size', '4', '--set', 'eval_batch_size=4', '--set', 'warmup_updates=0',
        '--lr', '0.002']


@pytest.fixture(scope='module')
def scenes(tmp_path_factory) -> dict:
    return write_digit_scenes(tmp_path_factory.mktemp('scenes') / 'digits', n_train=16, n_val=8)


@pytest.mark.parametrize('decoder', ['semantic_fpn', 'upernet'])
@pytest.mark.parametrize('backbone', ['dat_nano', 'eapt_nano'])
def test_segmentors_give_logits_at_any_input_size_and_train_the_offsets(decoder, backbone):
    model = build_segmentor(decoder, backbone, num_classes=5, channels=32, fpn_channels=32)
    x = torch.randn(2, 3, 96, 136)
    out = model(x)
    if decoder == 'upernet':  # the auxiliary FCN head of mmsegmentation's UperNet, training only
        assert set(out) == {'out', 'aux'} and out['aux'].shape == (2, 5, 96, 136)
        out = out['out']
    assert out.shape == (2, 5, 96, 136)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 5, (2, 96, 136))).backward()
    offsets = [p for n, p in model.named_parameters() if 'offset' in n and p.grad is not None]
    assert offsets and any(p.grad.abs().sum() > 0 for p in offsets)
    model.eval()
    assert model(torch.randn(1, 3, 70, 50)).shape == (1, 5, 70, 50)


def test_segmentors_match_dat_table5_in_parameters():
    # DAT Table 5: S-FPN DAT-T 32M, UperNet DAT-T 60M (150 ADE20K classes, UperNet with its auxiliary head)
    assert count_parameters(build_segmentor('semantic_fpn', 'dat_tiny', 150)) / 1e6 == pytest.approx(32, abs=0.6)
    assert count_parameters(build_segmentor('upernet', 'dat_tiny', 150)) / 1e6 == pytest.approx(60, abs=0.6)


def test_semantic_fpn_upsamples_each_level_to_stride_4():
    heads = build_segmentor('semantic_fpn', 'dat_nano', 3).decoder.scale_heads
    # Kirillov et al. 2019: one conv for P2 and P3, then one conv + 2x upsampling per octave
    assert [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in heads] == [1, 1, 2, 3]
    assert [sum(isinstance(m, torch.nn.Upsample) for m in h.modules()) for h in heads] == [0, 1, 2, 3]


class _Pixelwise(torch.nn.Module):
    """A position-independent 'segmentor' (1x1 conv): sliding windows must reproduce it exactly."""
    num_classes = 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_and_flip_average_reproduce_a_pixelwise_model():
    model = _Pixelwise().eval()
    x = torch.randn(1, 3, 50, 70)
    whole = segment_logits(model, x, (50, 70))
    slide = segment_logits(model, x, (50, 70), mode='slide', crop=(32, 32), stride=(21, 21))
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(segment_logits(model, x, (50, 70), flip=True), whole)
    multi = segment_logits(model, x, (25, 35), scales=(0.5, 1.0, 1.5), flip=True)
    assert multi.shape == (1, 4, 25, 35)
    torch.testing.assert_close(multi.sum(1), torch.ones(1, 25, 35))
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        segment_logits(model, x, (50, 70), mode='tiles')


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, '-m', 'deformvit', *args], capture_output=True, text=True, check=check)


def test_segment_train_eval_predict_on_ade_layout(scenes, tmp_path, capsys):
    out = tmp_path / 'run'
    main(['segment', 'train', '--data', str(scenes['ade']), '--output', str(out), '--epochs', '2',
          '--decoder', 'upernet', '--backbone', 'dat_nano', *FAST, '--set', 'decoder_channels=32',
          '--set', 'crop_size=[96, 96]', '--set', 'scale=[128, 128]'])
    printed = capsys.readouterr().out
    assert 'mIoU' in printed and 'per_class_iou.csv' in printed
    for name in ('last.safetensors', 'best.safetensors', 'metrics.csv', 'metrics.png', 'per_class_iou.csv'):
        assert (out / name).exists(), name
    loaded = load_model(str(out / 'last.safetensors'), task='segment')
    assert loaded.task == 'segment' and loaded.classes == ['background', 'digit']

    main(['segment', 'eval', str(out / 'last.safetensors'), '--data', str(scenes['ade']), '--workers', '0',
          '--scale', '128', '128', '--multi-scale', '--mode', 'slide', '--crop', '64', '64', '--stride', '48', '48'])
    printed = capsys.readouterr().out
    assert 'multi-scale + flip, slide inference' in printed and 'mIoU' in printed

    image = next((Path(scenes['ade']) / 'images' / 'validation').iterdir())
    main(['segment', 'predict', str(out / 'last.safetensors'), str(image), '--output', str(tmp_path / 'pred'),
          '--scale', '128', '128'])
    labels = np.asarray(Image.open(tmp_path / 'pred' / f'{image.stem}.png'))
    assert labels.shape == Image.open(image).size[::-1] and labels.max() < len(loaded.classes)
    assert (tmp_path / 'pred' / f'{image.stem}_overlay.png').exists()
    record = json.loads((tmp_path / 'pred' / 'classes.json').read_text())
    assert abs(sum(record['images'][0]['classes'].values()) - 1) < 1e-3


def test_iterations_set_the_epochs_of_a_poly_schedule(scenes, tmp_path):
    out = tmp_path / 'run'
    main(['segment', 'train', '--data', str(scenes['ade']), '--output', str(out), '--iterations', '7',
          '--backbone', 'dat_nano', *FAST, '--set', 'fpn_channels=16', '--set', 'decoder_channels=16',
          '--set', 'crop_size=[64, 64]', '--set', 'scale=[64, 64]', '--decoder', 'semantic_fpn'])
    rows = (out / 'metrics.csv').read_text().splitlines()
    assert len(rows) - 1 == 2  # 16 images / batch 4 = 4 updates per epoch: 7 updates take 2 epochs
    assert float(rows[-1].split(',')[-4]) == pytest.approx(0.002 * (1 - 7 / 7) ** 1.0, abs=1e-9)


def test_mask_of_the_wrong_size_is_reported(scenes, tmp_path):
    import shutil
    root = tmp_path / 'ade'
    shutil.copytree(scenes['ade'], root)
    annotation = next((root / 'annotations' / 'training').iterdir())
    Image.new('L', (40, 40)).save(annotation)
    result = run_cli('segment', 'train', '--data', str(root), '--output', str(tmp_path / 'run'), '--epochs', '1',
                     '--backbone', 'dat_nano', '--decoder', 'semantic_fpn', *FAST, '--set', 'fpn_channels=16',
                     '--set', 'decoder_channels=16', '--set', 'crop_size=[64, 64]', '--set', 'scale=[128, 128]',
                     check=False)
    assert result.returncode != 0 and annotation.name in result.stderr


def test_any_timm_pyramid_serves_as_backbone_by_its_strides():
    # resnet18's features_only levels start with a stride-2 stem; the stride 4-32 levels are picked
    model = build_segmentor('semantic_fpn', 'resnet18', num_classes=3, channels=16, fpn_channels=16)
    assert model.backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match='none at'):
        build_segmentor('semantic_fpn', 'vit_tiny_patch16_224', num_classes=3)


# ---- crops without labels, eval on the validation split alone, predict ---------------------------

CLASSES = ['a', 'b', 'c']


def _segmentor(folder: Path) -> Path:
    """A small Semantic FPN saved as a training run's checkpoint."""
    model = build_segmentor('semantic_fpn', 'dat_nano', len(CLASSES), channels=16, fpn_channels=16)
    path = folder / 'segmentor.safetensors'
    kwargs = {k: v for k, v in model.config.items() if k != 'decoder'}
    save_safetensors(model.state_dict(), str(path), metadata_for('semantic_fpn', kwargs, CLASSES, 0, task='segment'))
    return path


def test_a_batch_of_crops_without_labelled_pixels_gives_zero_loss_and_zero_gradients_not_nan():
    model = build_segmentor('upernet', 'dat_nano', len(CLASSES), channels=16, fpn_channels=16)  # with its aux head
    step = SegmentationTask().training_step(dict(aux_weight=0.4), CLASSES)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, len(CLASSES), (2, 32, 32))
    labels[1] = 255
    torch.manual_seed(1)
    loss, crops = step(model, images, labels, torch.device('cpu'))
    torch.manual_seed(1)  # the same dropout: the loss is the mean over the labelled pixels, as before
    out = model(images)
    expected = sum(weight * torch.nn.functional.cross_entropy(out[key], labels, ignore_index=255)
                   for key, weight in (('out', 1.0), ('aux', 0.4)))
    assert crops == 1 and torch.allclose(loss, expected)
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    loss, crops = step(model, images, torch.full_like(labels, 255), torch.device('cpu'))
    assert crops == 0 and loss.item() == 0.0  # F.cross_entropy averages over no pixel: NaN
    loss.backward()  # every process of a DDP run still reduces the same gradients, all zero here
    assert {name for name, p in model.named_parameters() if p.grad is not None} == trained
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def _ade_validation(root: Path, n: int = 2) -> Path:
    """``root`` in the ADE20K layout with only a validation split of ``n`` 32x32 pairs, classes a, b, c."""
    for split in ('images', 'annotations'):
        (root / split / 'validation').mkdir(parents=True)
    for index in range(n):
        annotation = np.random.default_rng(index).integers(0, len(CLASSES) + 1, (32, 32)).astype(np.uint8)
        Image.fromarray(annotation * 60).convert('RGB').save(root / 'images' / 'validation' / f'{index}.jpg')
        Image.fromarray(annotation).save(root / 'annotations' / 'validation' / f'{index}.png')
    (root / 'classes.txt').write_text('\n'.join(CLASSES))
    return root


def test_segment_eval_needs_only_the_validation_split(tmp_path):
    root = _ade_validation(tmp_path / 'ade')
    evaluation, evaluated = evaluate_segmentor(load_model(str(_segmentor(tmp_path))), str(root), DistributedContext(),
                                               scale=(32, 32), workers=0)
    assert evaluated == str(root) and evaluation.images == 2 and 0 <= evaluation.metrics['miou'] <= 100


@pytest.mark.parametrize('settings, match', [
    (dict(scale=(0, 0)), r'scale \(0, 0\) is not two positive whole numbers of pixels; expected the \(long, short\)'),
    (dict(scale=(2048, -1)), r'scale \(2048, -1\) is not two positive'),
    (dict(mode='tiles'), r"mode must be 'whole' or 'slide', got 'tiles'"),
    (dict(mode='slide', crop=(0, 512)), r'crop \(0, 512\) is not two positive whole numbers of pixels; expected '
                                        r'the \(height, width\) of the sliding window'),
    (dict(mode='slide', stride=(341, 0)), r'stride \(341, 0\) is not two positive whole numbers'),
])
def test_segment_eval_and_predict_refuse_non_positive_sizes_before_reading_anything(tmp_path, settings, match):
    loaded = load_model(str(_segmentor(tmp_path)))
    with pytest.raises(ValueError, match=match):  # checked before the missing data is noticed
        evaluate_segmentor(loaded, str(tmp_path / 'no-data'), DistributedContext(), workers=0, **settings)
    if 'crop' not in settings and 'stride' not in settings:
        with pytest.raises(ValueError, match=match):
            predict(loaded, [str(tmp_path / 'no-photos')], str(tmp_path / 'out'), **settings)
    assert not (tmp_path / 'out').exists()


def test_segment_predict_names_outputs_apart_and_skips_only_what_it_cannot_read(tmp_path):
    photos = tmp_path / 'photos'
    photos.mkdir()
    for name, size in (('x.png', (40, 30)), ('x_overlay.jpg', (40, 30)), ('thin.png', (2000, 3))):
        Image.new('RGB', size, (200, 120, 40)).save(photos / name)
    (photos / 'broken.png').write_bytes(b'not a PNG')
    result = predict(load_model(str(_segmentor(tmp_path))), [str(photos)], str(tmp_path / 'out'), scale=(64, 32))
    record = json.loads((tmp_path / 'out' / 'classes.json').read_text())
    # x.png's overlay and x_overlay.jpg's label map would both be x_overlay.png: both keep their extension
    assert {Path(r['file']).name: r['outputs'] for r in record['images']} == {
        'thin.png': ['thin.png', 'thin_overlay.png'], 'x.png': ['x.png.png', 'x.png_overlay.png'],
        'x_overlay.jpg': ['x_overlay.jpg.png', 'x_overlay.jpg_overlay.png']}
    assert np.asarray(Image.open(tmp_path / 'out' / 'thin.png')).shape == (3, 2000)  # thin, yet segmented
    assert [(Path(entry['file']).name, entry['reason'][:20]) for entry in record['skipped']] == [
        ('broken.png', 'not a readable image')]
    assert [entry['file'] for entry in result['skipped']] == [str(photos / 'broken.png')]
    assert len(list((tmp_path / 'out').iterdir())) == 7
