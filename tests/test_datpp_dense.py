"""DAT++ backbones from detection and segmentation checkpoints.

The official DAT++ dense checkpoints (LeapLabTHU DAT-Detection / DAT-Segmentation, mmdetection /
mmsegmentation files ``{'state_dict': ..., 'meta': ...}``) hold the classification backbone's keys
under ``backbone.`` without ``cls_norm`` / ``cls_head``, per-level output norms
``backbone.norms.{i}.norm.{weight,bias}`` (``models/backbones/dat.py`` of DAT-Detection) and the
neck and heads. The fake ones here are a random ``datpp_tiny`` converted to the release's names
(``shared/reference/datpp_tiny_official_state_dict.tsv``).
"""
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from deformvit.models.datpp import _official_key, checkpoint_filter_fn, dense_level_norms
from deformvit.tasks.detection import build_detector
from deformvit.tasks.segmentation import build_segmentor

REFERENCE = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'datpp_tiny_official_state_dict.tsv'
WIDTHS = (64, 128, 256, 512)
CLASSIFIER = ('cls_norm.', 'cls_head.')


def official_shapes() -> dict:
    rows = [line.split('\t') for line in REFERENCE.read_text().splitlines() if not line.startswith('#')]
    return {key: tuple(int(s) for s in shape.split('x')) for key, shape in rows}


@pytest.fixture(scope='module')
def source():
    """A random ``datpp_tiny`` (non-trivial norms) and its state dict in the release's names."""
    torch.manual_seed(0)
    model = timm.create_model('datpp_tiny').eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight') or '.norm' in name:
                p.add_(torch.randn_like(p) * 0.1)
    own = model.state_dict()
    official = {}
    for key, shape in official_shapes().items():
        ours = _official_key(key)
        if ours is not None:
            official[key] = own[ours].reshape(shape).clone()
    assert len(official) == len(own)
    return model, official


def level_norms() -> dict:
    torch.manual_seed(1)
    return {f'backbone.norms.{i}.norm.{p}': (1 + 0.1 * torch.randn(c)) if p == 'weight' else 0.1 * torch.randn(c)
            for i, c in enumerate(WIDTHS) for p in ('weight', 'bias')}


def dense_checkpoint(official: dict) -> dict:
    state_dict = {f'backbone.{k}': v for k, v in official.items() if not k.startswith(CLASSIFIER)}
    state_dict.update(level_norms())
    state_dict.update({
        'neck.lateral_convs.0.conv.weight': torch.zeros(256, 64, 1, 1),
        'neck.fpn_convs.0.conv.bias': torch.zeros(256),
        'rpn_head.rpn_conv.weight': torch.zeros(256, 256, 3, 3),
        'roi_head.bbox_head.fc_cls.weight': torch.zeros(81, 1024),
    })
    return {'state_dict': state_dict, 'meta': {'epoch': 12, 'CLASSES': ('a', 'b')}}


@pytest.fixture(scope='module')
def dense_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp('dense') / 'official_retinanet_datpp_tiny.pth'
    torch.save(dense_checkpoint(source[1]), path)
    return path


def load_features(path):
    with pytest.warns(UserWarning, match=r'backbone\.norms\.\{0,1,2,3\}'):
        return timm.create_model('datpp_tiny', features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()


def test_filter_strips_backbone_prefix_and_drops_neck_and_heads(source):
    model, official = source
    with pytest.warns(UserWarning):
        converted = checkpoint_filter_fn(dense_checkpoint(official), model)
    own = model.state_dict()
    assert set(converted) == set(own) - {'head.fc.weight', 'head.fc.bias'}
    for key, value in converted.items():
        assert value.shape == own[key].shape, key
        torch.testing.assert_close(value, own[key], rtol=0, atol=0)


def test_dense_level_norms_are_in_the_neck_layout(source):
    norms = dense_level_norms(dense_checkpoint(source[1]))
    assert sorted(norms) == sorted(f'norms.{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    torch.testing.assert_close(norms['norms.2.bias'], level_norms()['backbone.norms.2.norm.bias'])
    assert dense_level_norms({'model': source[1]}) == {}
    shifted = dense_level_norms({'state_dict': dense_checkpoint(source[1])['state_dict']}, stages=[1, 2, 3])
    assert sorted(shifted) == sorted(f'norms.{i}.{p}' for i in range(3) for p in ('weight', 'bias'))
    torch.testing.assert_close(shifted['norms.0.weight'], norms['norms.1.weight'], rtol=0, atol=0)


def test_features_only_model_loads_the_official_backbone(source, dense_file):
    model, _ = source
    features = load_features(dense_file)
    loaded = features.state_dict()
    own = model.state_dict()
    for ours in ('stem.conv1.weight', 'stages.1.downsample.conv.weight', 'stages.2.blocks.3.attn.rel_pos_table',
                 'stages.2.blocks.3.attn.proj_q.weight', 'stages.3.blocks.1.mlp.dwc.weight'):
        key = next(k for k in loaded if k.endswith(ours))
        torch.testing.assert_close(loaded[key], own[ours], rtol=0, atol=0)
    assert not any('norms' in k or 'neck' in k for k in loaded)
    for size in ((224, 224), (96, 160)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            levels = features(x)
            expected = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(t.shape) for t in levels] == [
            (1, c, -(-size[0] // s), -(-size[1] // s)) for c, s in zip(WIDTHS, (4, 8, 16, 32))]
        for got, want in zip(levels, expected):
            torch.testing.assert_close(got, want)


def test_level_norms_reproduce_the_official_outputs(source, dense_file):
    """Backbone stages, then the official LayerNorm per level (nn.LayerNorm over channels, eps 1e-5)."""
    features = load_features(dense_file)
    detector = build_detector('retinanet', backbone='datpp_tiny', num_classes=3, min_size=64, max_size=96,
                              fpn_channels=32).eval()
    detector.backbone.body.load_state_dict(features.state_dict())
    stages = [int(m.split('.')[-1]) for m in detector.backbone.body.feature_info.module_name()]
    assert stages == [1, 2, 3]  # RetinaNet reads strides 8-32: its levels 0-2 are stages 1-3
    missing, unexpected = detector.backbone.load_state_dict(
        dense_level_norms(torch.load(dense_file, weights_only=True), stages), strict=False)
    assert not unexpected and not any(k.startswith('norms.') for k in missing)
    x = torch.randn(1, 3, 64, 96)
    norms = level_norms()
    with torch.no_grad():
        levels = detector.backbone.body(x)
        for norm, level, i in zip(detector.backbone.norms, levels, stages):
            official = F.layer_norm(level.permute(0, 2, 3, 1), (level.shape[1],),
                                    norms[f'backbone.norms.{i}.norm.weight'], norms[f'backbone.norms.{i}.norm.bias'],
                                    eps=1e-5).permute(0, 3, 1, 2)
            torch.testing.assert_close(norm(level), official, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['retinanet', 'faster_rcnn'])
def test_detector_from_official_dense_checkpoint(source, dense_file, name):
    model, _ = source
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the level norms are the detector's to load: no warning about them
        detector = build_detector(name, backbone='datpp_tiny', num_classes=3, min_size=64, max_size=96,
                                  fpn_channels=32, pretrained_backbone=str(dense_file)).eval()
    norms = level_norms()
    stages = [int(m.split('.')[-1]) for m in detector.backbone.body.feature_info.module_name()]
    assert stages == ([1, 2, 3] if name == 'retinanet' else [0, 1, 2, 3])  # strides 8-32 or 4-32
    for level, stage in enumerate(stages):
        torch.testing.assert_close(detector.backbone.norms[level].weight, norms[f'backbone.norms.{stage}.norm.weight'])
        torch.testing.assert_close(detector.backbone.norms[level].bias, norms[f'backbone.norms.{stage}.norm.bias'])
        level_map = torch.randn(1, WIDTHS[stage], 5, 7)
        weight, bias = (norms[f'backbone.norms.{stage}.norm.{p}'] for p in ('weight', 'bias'))
        official = F.layer_norm(level_map.permute(0, 2, 3, 1), (WIDTHS[stage],), weight, bias, eps=1e-5)
        official = official.permute(0, 3, 1, 2)
        torch.testing.assert_close(detector.backbone.norms[level](level_map), official, rtol=1e-5, atol=1e-5)
    body = detector.backbone.body.state_dict()
    key = next(k for k in body if k.endswith('stages.0.blocks.1.attn.offset_net.conv_dw.weight'))
    torch.testing.assert_close(body[key], model.state_dict()['stages.0.blocks.1.attn.offset_net.conv_dw.weight'])
    with torch.no_grad():
        out = detector([torch.rand(3, 70, 90)])
    assert len(out) == 1 and out[0]['boxes'].shape[-1] == 4


def test_segmentor_from_official_dense_checkpoint(source, dense_file):
    segmentor = build_segmentor('semantic_fpn', backbone='datpp_tiny', num_classes=3,
                                pretrained_backbone=str(dense_file), fpn_channels=32, channels=16).eval()
    norms = level_norms()
    for stage in range(4):  # strides 4-32: level i is stage i
        torch.testing.assert_close(segmentor.decoder.norms[stage].weight, norms[f'backbone.norms.{stage}.norm.weight'])
    stem = next(v for k, v in segmentor.backbone.state_dict().items() if k.endswith('stem.conv2.weight'))
    torch.testing.assert_close(stem, source[0].state_dict()['stem.conv2.weight'])
    with torch.no_grad():
        assert segmentor(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)


def test_own_detector_checkpoint_gives_its_backbone(source):
    """A deformvit detector's state dict (backbone.body.model.*, backbone.norms.*, backbone.fpn.*, heads)."""
    model, _ = source
    detector = build_detector('retinanet', backbone='datpp_tiny', num_classes=3, min_size=64, max_size=96,
                              fpn_channels=32)
    detector.backbone.body.load_state_dict(
        {f'model.{k}': v for k, v in model.state_dict().items() if not k.startswith(('norm.', 'head.'))})
    with pytest.warns(UserWarning):
        converted = checkpoint_filter_fn({'model': detector.state_dict()}, model)
    torch.testing.assert_close(converted['stages.3.blocks.0.attn.proj_k.weight'],
                               model.state_dict()['stages.3.blocks.0.attn.proj_k.weight'])
    assert not any(k.startswith(('fpn.', 'norms.', 'head.', 'body.', 'model.')) for k in converted)


def test_new_detector_from_own_detector_file_keeps_its_own_level_norms(source, tmp_path):
    """Our detectors number their level norms by level, not by stage: a new detector on such a file takes the
    backbone and leaves its level norms to training (no stage-numbered norms to map)."""
    model, _ = source
    detector = build_detector('retinanet', backbone='datpp_tiny', num_classes=3, min_size=64, max_size=96,
                              fpn_channels=32)
    with torch.no_grad():
        for norm in detector.backbone.norms:
            norm.weight.fill_(2.0)
    path = tmp_path / 'own_retinanet.pth'
    torch.save({'model': detector.state_dict()}, path)
    second = build_detector('faster_rcnn', backbone='datpp_tiny', num_classes=3, min_size=64, max_size=96,
                            fpn_channels=32, pretrained_backbone=str(path))
    assert all(torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in second.backbone.norms)
    key = next(k for k in second.backbone.body.state_dict() if k.endswith('stages.3.blocks.0.attn.proj_k.weight'))
    torch.testing.assert_close(second.backbone.body.state_dict()[key],
                               detector.backbone.body.state_dict()[key])


def test_neck_and_head_only_file_is_refused(source, tmp_path):
    state_dict = {k: v for k, v in dense_checkpoint(source[1])['state_dict'].items()
                  if not k.startswith('backbone.')}
    path = tmp_path / 'heads.pth'
    torch.save({'state_dict': state_dict}, path)
    with pytest.raises(ValueError, match=r'no DAT\+\+ backbone weights.*backbone\.patch_proj\.0\.weight'
                                         r'.*neck\.\*, roi_head\.\*, rpn_head\.\*'):
        timm.create_model('datpp_tiny', features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(ValueError, match='no DAT\\+\\+ backbone weights'):
        build_detector('retinanet', backbone='datpp_tiny', num_classes=3, pretrained_backbone=str(path))


def test_dat_v1_file_is_refused_by_datpp(tmp_path):
    v1 = timm.create_model('dat_tiny', num_classes=0).state_dict()
    for wrapper, name in (({'model': v1}, 'v1.pth'), ({'state_dict': {f'backbone.{k}': v for k, v in v1.items()}},
                                                      'v1_dense.pth')):
        path = tmp_path / name
        torch.save(wrapper, path)
        with pytest.raises(ValueError, match=r'holds (dat_tiny weights \()?DAT \(v1\).*not datpp_tiny ones \(DAT\+\+\)'):
            timm.create_model('datpp_tiny', features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path))


def test_upernet_without_level_norms_says_the_files_norms_are_unused(dense_file):
    with pytest.warns(UserWarning, match='normalises no pyramid level'):
        build_segmentor('upernet', backbone='datpp_tiny', num_classes=3, pretrained_backbone=str(dense_file),
                        channels=16, fpn_channels=16)


def test_classification_weights_leave_the_level_norms_alone(source, tmp_path):
    path = tmp_path / 'datpp_tiny_in1k.pth'
    torch.save({'model': source[1]}, path)
    detector = build_detector('retinanet', backbone='datpp_tiny', num_classes=3, min_size=64, max_size=96,
                              fpn_channels=32, pretrained_backbone=str(path))
    assert all(torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in detector.backbone.norms)
