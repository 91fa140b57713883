"""EAPT: Table III counts, Eq. (1)-(5)/(13) against a per-window oracle, the ablations of
Table VII / VIII and Fig. 4, the timm contract and training."""
import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from deformvit import count_macs, count_parameters, save_safetensors
from deformvit.tools.complexity import _FVCORE_EXTRA as FVCORE_CONVENTION
from deformvit.models.eapt import EAPT, DeformableWindowAttention, WindowGeometry


def small_eapt(**kwargs) -> EAPT:
    """A narrow EAPT with every component (fast on CPU)."""
    args = dict(embed_dims=(16, 32, 64, 128), depths=(2, 1, 2, 1), num_heads=(1, 2, 4, 8),
                endec_channels=((1, 2), (2, 4), (4, 8), (8, 16)), window_size=4, broaden_size=2., num_classes=10)
    return EAPT(**dict(args, **kwargs))


# ---------------------------------------------------------------- Table III

@pytest.mark.parametrize('name, size, params, gflops', [
    ('eapt_small', 224, 39e6, 6.5),
    ('eapt_medium', 224, 107e6, 18.3),
    ('eapt_medium_384', 384, 116e6, 53.6),
])
def test_parameters_and_macs_within_10_percent_of_table3(name, size, params, gflops):
    model = timm.create_model(name)
    measured_params = count_parameters(model)
    macs = count_macs(model, (3, size, size))
    assert abs(measured_params / params - 1) < 0.10, measured_params
    assert abs(macs / 1e9 / gflops - 1) < 0.10, macs


def test_eapt_large_is_table2_l():
    model = timm.create_model('eapt_large')
    assert [info['num_chs'] for info in model.feature_info] == [192, 384, 768, 1536]
    assert [len(s.blocks) for s in model.stages] == [3, 3, 16, 3]
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [6, 12, 24, 48]
    assert [s.blocks[0].attn.endec.encode.out_channels for s in model.stages] == [8, 16, 32, 64]


def test_deformable_attention_costs_no_more_attention_than_window_attention():
    """Sec. III-A: offsets move keys but a window keeps Wh*Ww of them: the projections and the
    attention cost the same with and without Deformable Attention."""
    def attention_macs(broaden):
        model = EAPT(embed_dims=(96,), depths=(1,), num_heads=(3,), endec_channels=((1, 2),), use_endec=False,
                     num_classes=0, broaden_size=broaden).eval()
        counter = FlopCounterMode(display=False, custom_mapping=FVCORE_CONVENTION)
        with counter, torch.no_grad():
            model(torch.randn(1, 3, 56, 56))
        counts = counter.get_flop_counts()
        attn = {str(op): n for op, n in counts['EAPT.stages.0.blocks.0.attn'].items()}
        offset = {str(op): n for op, n in counts.get('EAPT.stages.0.blocks.0.attn.offset_net', {}).items()}
        projections = attn.get('aten.addmm', 0) + attn.get('aten.mm', 0) - offset.get('aten.addmm', 0)
        return projections, sum(n for op, n in attn.items() if 'attention' in op)

    deformable, plain = attention_macs(4.), attention_macs(0.)
    assert deformable == plain and plain[1] > 0


# ---------------------------------------------------------------- the oracle

def bilinear_eq3(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """EAPT Eq. (3): sum over the four nearest positions q of (1-|q_x-x|)(1-|q_y-y|) V(q)."""
    h, w, _ = feature.shape
    total = torch.zeros(feature.shape[-1], dtype=feature.dtype)
    for qy in (math.floor(y), math.floor(y) + 1):
        for qx in (math.floor(x), math.floor(x) + 1):
            weight = max(0., 1 - abs(qy - y)) * max(0., 1 - abs(qx - x))
            if weight > 0 and 0 <= qy < h and 0 <= qx < w:
                total = total + weight * feature[qy, qx]
    return total


def run_attention(attn: DeformableWindowAttention, f: torch.Tensor) -> torch.Tensor:
    b, h, w, c = f.shape
    geometry = WindowGeometry.of((h, w), attn.effective_window((h, w)))
    padded = F.pad(f, (0, 0, 0, -w % geometry.window[1], 0, -h % geometry.window[0]))
    padded = padded + 5.0 * (padded == 0)  # padding holds junk, as in a stage: it must not leak
    out = attn(geometry.partition(padded), geometry)
    return geometry.reverse(out)[:, :h, :w]


def test_fused_attention_equals_explicit_path():
    model = small_eapt(position_encoding='relative').eval()
    x = torch.randn(2, 3, 50, 38)
    with torch.no_grad():
        fused = model(x)
        for _, _, attn in model.attention_modules():
            attn.fused_attn = False
        torch.testing.assert_close(model(x), fused, rtol=1e-4, atol=1e-5)


def test_offsets_are_bounded_by_the_broaden_size_and_clamped_to_the_map():
    model = small_eapt(broaden_size=1.5).eval()
    attn = model.stages[0].blocks[0].attn
    with torch.no_grad():
        attn.offset_net.dense.weight.mul_(500)
    attn.record_sampling = True
    model(torch.randn(1, 3, 44, 36))  # stage 1: 11 x 9, windows of 4 with padding
    positions, _ = attn.last_sampling  # (B, nW, N, 2)
    geometry = WindowGeometry.of((11, 9), (4, 4))
    grid = torch.stack(torch.meshgrid(torch.arange(12.), torch.arange(12.), indexing='ij'), -1)
    base = geometry.partition(grid[None]).view(1, geometry.num_windows, 16, 2)
    real = (base[..., 0] < 11) & (base[..., 1] < 9)
    moved = (positions - base)[real].abs()
    assert moved.max() <= 1.5 + 1e-5 and moved.max() > 1.0  # |o| <= b, and the offsets are used
    assert positions[..., 0].min() >= 0 and positions[..., 0].max() <= 10  # C clamps into the 11 x 9 map
    assert positions[..., 1].min() >= 0 and positions[..., 1].max() <= 8


def test_gradients_reach_offset_networks_endec_and_position_tables():
    model = small_eapt(position_encoding='relative')
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for _, _, attn in model.attention_modules():
        for p in (attn.offset_net.conv.weight, attn.offset_net.dense.weight, attn.endec.compress.weight,
                  attn.endec.encode.weight, attn.endec.decode.weight, attn.rel_pos_table):
            assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------- ablations

@pytest.mark.parametrize('deformable, endec, mcmd', list(itertools.product([True, False], repeat=3)))
def test_table7_every_component_combination_builds_runs_and_trains(deformable, endec, mcmd):
    model = small_eapt(broaden_size=2. if deformable else 0., use_endec=endec,
                       position_encoding='mcmd' if mcmd else 'none')
    attn = model.stages[0].blocks[0].attn
    assert (attn.offset_net is not None) == deformable and (attn.endec is not None) == endec
    assert (attn.position is not None) == mcmd
    out = model(torch.randn(2, 3, 40, 56))
    out.logsumexp(-1).sum().backward()
    assert out.shape == (2, 10) and model.stages[0].blocks[0].attn.q.weight.grad.abs().sum() > 0


def test_table7_components_cost_what_they_add():
    full = count_parameters(small_eapt())
    assert count_parameters(small_eapt(position_encoding='none')) == full  # MCMD has no parameters
    endec = sum(count_parameters(a.endec) for *_, a in small_eapt().attention_modules())
    offsets = sum(count_parameters(a.offset_net) for *_, a in small_eapt().attention_modules())
    assert count_parameters(small_eapt(use_endec=False)) == full - endec
    assert count_parameters(small_eapt(broaden_size=0)) == full - offsets


@pytest.mark.parametrize('encoding', ['mcmd', 'sinusoidal', 'embedding', 'relative', 'floater'])
def test_table8_position_encodings_build_run_and_train_at_any_size(encoding):
    model = small_eapt(position_encoding=encoding, img_size=64)
    for size in ((64, 64), (40, 72)):
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    trainable = [p for n, p in model.named_parameters() if 'position' in n or 'rel_pos_table' in n]
    assert (len(trainable) > 0) == (encoding in ('embedding', 'relative', 'floater'))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize('broaden', [0, 1, 2, 4, 6, 8])
def test_fig4_broaden_sizes_from_0_to_8(broaden):
    model = small_eapt(broaden_size=broaden).eval()
    attn = model.stages[1].blocks[0].attn
    assert (attn.offset_net is None) == (broaden == 0)
    if broaden:
        assert attn.offset_net.broaden_size == broaden
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match='broaden_size must be >= 0'):
        small_eapt(broaden_size=-1)
    with pytest.raises(ValueError, match='position_encoding'):
        small_eapt(position_encoding='rope')
    with pytest.raises(ValueError, match="multiple of c'"):
        small_eapt(endec_channels=((3, 2), (2, 4), (4, 8), (8, 16)))
    with pytest.raises(ValueError, match='kernel - stride even'):
        small_eapt(endec_kernel_size=4, endec_stride=3)
    with pytest.raises(ValueError, match='one per stage'):
        small_eapt(depths=(2, 2, 2))


# ---------------------------------------------------------------- timm contract

def test_registered_models_follow_the_timm_contract():
    for name in ('eapt_nano', 'eapt_small', 'eapt_medium', 'eapt_large', 'eapt_medium_384'):
        assert name in timm.list_models('eapt_*')
    model = timm.create_model('eapt_nano', num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 256)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(x).shape == (2, 3)
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)


@pytest.mark.parametrize('size', [(32, 32), (45, 61), (100, 36)])
def test_features_only_gives_nchw_pyramid_for_any_size(size):
    model = timm.create_model('eapt_nano', features_only=True, out_indices=(1, 2, 3)).eval()
    feats = model(torch.randn(1, 3, *size))
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    expected = []
    for i in range(4):
        expected.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert [f.shape[1] for f in feats] == [64, 128, 256]
    assert [tuple(f.shape[-2:]) for f in feats] == expected[1:]
    assert model.feature_info.reduction() == [8, 16, 32]


def test_forward_intermediates_and_grad_checkpointing_agree_with_forward():
    model = small_eapt()
    x = torch.randn(2, 3, 50, 70)
    out = model(x)
    final, feats = model.forward_intermediates(x)
    torch.testing.assert_close(model.forward_head(final), out)
    assert len(feats) == 4 and feats[0].shape == (2, 16, 13, 18)
    out.sum().backward()
    grad = model.stages[0].blocks[1].attn.offset_net.dense.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(model.stages[0].blocks[1].attn.offset_net.dense.weight.grad, grad)


def test_no_weight_decay_and_layer_decay_groups():
    model = small_eapt(position_encoding='relative')
    nwd = model.no_weight_decay()
    assert 'stages.0.blocks.0.attn.rel_pos_table' in nwd and all(n in dict(model.named_parameters()) for n in nwd)
    from timm.optim import create_optimizer_v2
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize('bad, message', [
    (torch.randn(1, 3, 30, 30), 'smaller than the 32x32 minimum'),
    (torch.randn(1, 1, 64, 64), 'expected 3 input channels, got 1'),
    (torch.randn(3, 64, 64), 'expected a 4-D'),
])
def test_bad_inputs_raise_clear_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        small_eapt()(bad)


def test_checkpoint_round_trip_and_embedding_resized_across_image_sizes(tmp_path):
    model = timm.create_model('eapt_nano', position_encoding='embedding', num_classes=10).eval()
    path = tmp_path / 'eapt.safetensors'
    save_safetensors(model.state_dict(), path)
    same = timm.create_model('eapt_nano', position_encoding='embedding', num_classes=10, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(same(x), model(x))
    bigger = timm.create_model('eapt_nano', position_encoding='embedding', num_classes=10, img_size=64,
                               pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert bigger.stages[0].blocks[0].attn.position.pos_embed.shape == (1, 16, 16, 32)
    with pytest.raises(ValueError, match='eapt_small has no official weights'):
        timm.create_model('eapt_small', pretrained=True)


def test_mixed_precision_keeps_positions_in_float32():
    model = small_eapt()
    attn = model.stages[0].blocks[0].attn
    attn.record_sampling = True
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert out.dtype == torch.bfloat16 and attn.last_sampling[0].dtype == torch.float32
    out.float().logsumexp(-1).mean().backward()
    assert attn.offset_net.dense.weight.grad.abs().sum() > 0


def test_training_reduces_loss_on_a_small_task(small_task_losses):
    losses = small_task_losses(small_eapt(num_classes=2))
    assert losses[-1] < 0.5 * losses[0]


def test_training_command_on_the_embedded_digits_learns_with_eapt(tmp_path, capsys):
    """Two epochs of ``deformvit train`` (the embedded MNIST digits) with eapt_nano: the loss falls and
    held-out accuracy is far above the 10 % of chance."""
    from deformvit.cli import main
    out = tmp_path / 'run'
    main(['train', '--recipe', 'digits', '--model', 'eapt_nano', '--epochs', '2', '--workers', '0',
          '--output', str(out)])
    rows = [line.split(',') for line in (out / 'metrics.csv').read_text().splitlines()[1:]]
    assert float(rows[1][1]) < float(rows[0][1])  # training loss of epoch 2 below epoch 1
    assert float(rows[1][3]) > 60.0  # held-out top-1
