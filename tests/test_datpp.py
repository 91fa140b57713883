"""DAT++ (Xia et al. 2023, arXiv:2309.01430): registration, the release's layout and parameter counts,
any-size inputs, features, gradients and official-code logits.

``fixtures/datpp_official_mini.pth`` is a release-format checkpoint (``{'model': state_dict}``) of a
narrow DAT++ (widths 16-128, every block kind, 10 classes) built with random weights by the official
code (LeapLabTHU/DAT ``models/dat.py``, ``nat.py`` at b580702, ``dat_blocks.py`` at 2f31405, natten's
two kernels replaced by their definitions) through ``benchmarks/compare_official.py --release datpp
--write-fixture``; the JSON beside it holds the official logits for seeded ``torch.randn`` inputs at
224x224 and 80x112.
"""
import json
from pathlib import Path

import pytest
import timm
import torch

from deformvit.models.datpp import DATPlusPlus, checkpoint_filter_fn, release_reference_points
from deformvit.tools.complexity import count_macs

REFERENCE = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'datpp_tiny_official_state_dict.tsv'
FIXTURES = Path(__file__).parent / 'fixtures'
VARIANTS = ('datpp_tiny', 'datpp_small', 'datpp_base', 'datpp_base_384')


def small_model(**kwargs) -> DATPlusPlus:
    """Every block kind of DAT-T++ at widths 16-128 (fast on one core)."""
    args = dict(embed_dims=(16, 32, 64, 128), stage_spec=('ND', 'ND', 'DN', 'D'), num_heads=(1, 2, 4, 8),
                groups=(1, 1, 2, 4), num_classes=10)
    return timm.create_model('datpp_tiny', **dict(args, **kwargs))


def official_shapes() -> dict:
    rows = [line.split('\t') for line in REFERENCE.read_text().splitlines() if not line.startswith('#')]
    return {key: tuple(int(s) for s in shape.split('x')) for key, shape in rows}


def test_variants_are_registered_with_timm():
    for name in VARIANTS:
        assert name in timm.list_models('datpp_*')


def test_datpp_tiny_state_dict_is_the_release_layout():
    shapes = official_shapes()
    model = timm.create_model('datpp_tiny')
    fake = {key: torch.zeros(shape) for key, shape in shapes.items()}
    converted = checkpoint_filter_fn({'model': fake}, model)
    own = model.state_dict()
    assert len(converted) == len(shapes) == len(own)
    assert set(converted) == set(own)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}
    model.load_state_dict(converted, strict=True)


@pytest.mark.parametrize('name, published', [('datpp_tiny', 4.3), ('datpp_small', 9.4)])
def test_macs_at_224_match_the_published_figures(name, published):
    """fvcore-convention MACs, neighborhood attention counted as its k^2 products per query."""
    with torch.device('meta'):
        model = timm.create_model(name)
    assert count_macs(model) / 1e9 == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize('name, millions', [('datpp_tiny', 23.96), ('datpp_small', 53.13), ('datpp_base', 93.69),
                                            ('datpp_base_384', 93.69)])
def test_parameter_counts_match_the_release(name, millions):
    model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize('size', [(32, 32), (65, 97), (224, 224)])
def test_any_input_size_gives_finite_logits(size):
    model = small_model().eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 10)
    assert torch.isfinite(logits).all()


def test_input_below_32_pixels_is_refused():
    with pytest.raises(ValueError, match='32x32 minimum'):
        small_model()(torch.randn(1, 3, 31, 64))


def test_features_only_channels_and_strides():
    model = small_model(features_only=True).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 65, 97))
    assert [tuple(f.shape) for f in features] == [(1, 16, 17, 25), (1, 32, 9, 13), (1, 64, 5, 7), (1, 128, 3, 4)]


def test_forward_intermediates_matches_forward_features():
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(intermediates) == 4


def test_gradients_reach_the_offset_networks():
    model = small_model()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    blocks = model.deformable_blocks()
    assert len(blocks) == 4
    for _, _, attn in blocks:
        grad = attn.offset_net.conv_dw.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(1, 3, 64, 64)
    plain = model(x)
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_sampling_points_are_clamped_to_the_map():
    model = small_model().eval()
    _, records = model.forward_sampling_points(torch.randn(1, 3, 64, 96))
    assert len(records) == 4
    for record in records:
        assert record.points.abs().max() <= 1
        assert record.reference.abs().max() <= 1


def test_reference_points_follow_the_release_normalisation():
    # (i + 0.5) / (H - 1) * 2 - 1: half a cell off the sampler's grid, the last row outside [-1, 1]
    ref = release_reference_points(3, 5, None)
    torch.testing.assert_close(ref[:, 0, 0], torch.tensor([-0.5, 0.5, 1.5]))
    torch.testing.assert_close(ref[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75, 1.25]))


def test_release_checkpoint_gives_official_logits():
    meta = json.loads((FIXTURES / 'datpp_official_mini.json').read_text())
    path = FIXTURES / 'datpp_official_mini.pth'
    model = timm.create_model('datpp_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **meta['deformvit_kwargs']).eval()
    state = torch.load(path, map_location='cpu', weights_only=True)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    for case in meta['inputs']:
        x = torch.randn(*case['shape'], generator=torch.Generator().manual_seed(case['seed']))
        expected = torch.tensor(case['logits'])
        with torch.no_grad():
            logits = model(x)
        # float32 rounding is ~2e-7 here; LayerNorm eps 1e-6 instead of the release's 1e-5 gives ~5e-5
        assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-5
