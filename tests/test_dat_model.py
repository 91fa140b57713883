"""DAT behaviour: the timm contract, any-size inputs, gradients, fast paths, sampling points."""
import pytest
import timm
import torch

from deformvit.layers import relative_position_index
from deformvit.models.dat import DAT, DeformableAttention, WindowAttention


def small_dat(**kwargs) -> DAT:
    """A narrow DAT with every block type of the released models (fast on CPU)."""
    args = dict(embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), groups=(1, 1, 2, 4),
                num_classes=10)
    return DAT(**dict(args, **kwargs))


def test_create_model_returns_logits_tensor():
    model = timm.create_model('dat_tiny', num_classes=7, drop_path_rate=0.1).eval()
    out = model(torch.randn(2, 3, 224, 224))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    assert model.num_classes == 7 and model.in_chans == 3 and model.num_features == 768


def test_pretrained_cfg_describes_preprocessing():
    model = timm.create_model('dat_base_384')
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 384, 384) and cfg['crop_pct'] == 1.0
    assert timm.create_model('dat_tiny').pretrained_cfg['crop_pct'] == 0.875
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN
    assert set(timm.list_models('dat_*')) >= {'dat_tiny', 'dat_small', 'dat_base', 'dat_base_384'}


def test_forward_features_head_and_pre_logits():
    model = timm.create_model('dat_tiny').eval()
    feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 7, 7, 768)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 768)
    assert model.forward_head(feats).shape == (1, 1000)


def test_reset_classifier_and_get_classifier():
    model = small_dat()
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 3)])
def test_features_only_returns_nchw_pyramid(out_indices):
    model = timm.create_model('dat_tiny', features_only=True, out_indices=out_indices).eval()
    feats = model(torch.randn(1, 3, 224, 224))
    assert model.feature_info.reduction() == [(4, 8, 16, 32)[i] for i in out_indices]
    assert model.feature_info.channels() == [(96, 192, 384, 768)[i] for i in out_indices]
    for feat, reduction, channels in zip(feats, model.feature_info.reduction(), model.feature_info.channels()):
        assert feat.shape == (1, channels, 224 // reduction, 224 // reduction)


def test_forward_intermediates_match_features_and_forward():
    model = small_dat().eval()
    x = torch.randn(1, 3, 96, 64)
    final, inter = model.forward_intermediates(x)
    assert [f.shape[-2:] for f in inter] == [(24, 16), (12, 8), (6, 4), (3, 2)]
    torch.testing.assert_close(model.forward_head(final), model(x))
    nhwc = model.forward_intermediates(x, indices=1, output_fmt='NHWC', intermediates_only=True)
    torch.testing.assert_close(nhwc[0], inter[-1].permute(0, 2, 3, 1))


@pytest.mark.parametrize('size', [(224, 224), (200, 264), (100, 150), (33, 47), (384, 384)])
def test_any_input_size_without_rebuilding(size):
    model = timm.create_model('dat_tiny').eval()
    h, w = size
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
        logits = model(torch.randn(1, 3, h, w))
    expected_h, expected_w = -(-h // 4), -(-w // 4)
    for feat in feats:
        assert feat.shape[-2:] == (expected_h, expected_w)
        expected_h, expected_w = -(-expected_h // 2), -(-expected_w // 2)
    assert torch.isfinite(logits).all()


def test_224_weights_run_at_512x640():
    model = timm.create_model('dat_tiny').eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 512, 640), intermediates_only=True)
    assert [f.shape[-2:] for f in feats] == [(128, 160), (64, 80), (32, 40), (16, 20)]


@pytest.mark.parametrize('bad, message', [
    (torch.randn(1, 3, 30, 30), 'smaller than the 32x32 minimum'),
    (torch.randn(1, 3, 64, 16), 'smaller than the 32x32 minimum'),
    (torch.randn(1, 1, 64, 64), 'expected 3 input channels, got 1'),
    (torch.randn(3, 64, 64), 'expected a 4-D'),
])
def test_bad_inputs_raise_clear_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        small_dat()(bad)


def test_in_chans_is_honoured():
    model = small_dat(in_chans=1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def window_attention_oracle(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Each real token attends to the real tokens of its window (of the shifted map); no padding."""
    b, h, w, c = x.shape
    wh, ww = attn.window_size
    sh, sw = attn.shift_size
    heads, d = attn.num_heads, attn.head_dim
    table = attn.relative_position_bias_table
    index = relative_position_index((wh, wh))
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    # position of each real token in the padded, shifted frame, and its window and region
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    srow, scol = (rows - sh) % hp, (cols - sw) % wp
    region = lambda p, size, win, shift: 0 if p < size - win else (1 if p < size - shift else 2)  # noqa: E731
    qkv = attn.qkv(x).view(b, h * w, 3, heads, d)
    q, k, v = qkv.unbind(2)
    out = torch.zeros(b, h * w, heads, d)
    srow, scol = srow.flatten(), scol.flatten()
    for i in range(h * w):
        same = (srow // wh == srow[i] // wh) & (scol // ww == scol[i] // ww)
        if sh:
            ri = (region(srow[i], hp, wh, sh), region(scol[i], wp, ww, sw))
            same &= torch.tensor([(region(r, hp, wh, sh), region(cc, wp, ww, sw)) == ri for r, cc in zip(srow, scol)])
        keys = same.nonzero().flatten()
        pos_i = (srow[i] % wh) * ww + scol[i] % ww
        pos_k = (srow[keys] % wh) * ww + scol[keys] % ww
        bias = table[index[pos_i, pos_k]].t()  # (heads, K)
        logits = torch.einsum('bhd,bkhd->bhk', q[:, i] * d ** -0.5, k[:, keys]) + bias
        out[:, i] = torch.einsum('bhk,bkhd->bhd', logits.softmax(-1), v[:, keys])
    return attn.proj(out.reshape(b, h, w, c))


@pytest.mark.parametrize('shift', [False, True])
@pytest.mark.parametrize('size', [(14, 14), (10, 12)])
def test_window_attention_equals_per_window_oracle_with_padding_masked(shift, size):
    attn = WindowAttention(16, 2, 7, shift=shift).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        x = torch.randn(2, *size, 16)
        torch.testing.assert_close(attn(x), window_attention_oracle(attn, x), rtol=1e-4, atol=1e-4)


def set_fused(model, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused


@pytest.mark.parametrize('position_bias', ['relative', 'fixed', 'dwconv', 'none'])
def test_fused_path_equals_explicit_reference_path(position_bias):
    model = small_dat(position_bias=position_bias).eval()
    x = torch.randn(2, 3, 96, 80)
    fused = model(x)
    set_fused(model, False)
    torch.testing.assert_close(model(x), fused, rtol=1e-4, atol=1e-5)


def test_fused_path_gradients_equal_explicit_path():
    model = small_dat()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-3, atol=1e-6, msg=name)


def test_gradients_reach_every_offset_network_and_position_table():
    model = timm.create_model('dat_tiny')
    model(torch.randn(2, 3, 224, 224)).logsumexp(-1).mean().backward()
    blocks = model.deformable_blocks()
    assert len(blocks) == 4
    for _, _, attn in blocks:
        for p in (*attn.offset_net.parameters(), attn.rel_pos_table):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_inference_path_equals_training_path_numerically():
    """The no-grad forward applies GELU in place; results must not change."""
    model = small_dat().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
    torch.testing.assert_close(model(x), fast)


def test_grad_checkpointing_gives_same_output_and_gradients():
    model = small_dat()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    grad = model.stages[2].blocks[1].attn.offset_net.conv_dw.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(model.stages[2].blocks[1].attn.offset_net.conv_dw.weight.grad, grad)


def test_no_weight_decay_lists_position_tables_and_group_matcher_covers_all():
    model = small_dat()
    nwd = model.no_weight_decay()
    assert 'stages.0.blocks.0.attn.relative_position_bias_table' in nwd
    assert 'stages.2.blocks.1.attn.rel_pos_table' in nwd
    assert all(name in dict(model.named_parameters()) for name in nwd)
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    # timm's layer-wise decay optimizer factory uses both: position tables get no weight decay
    from timm.optim import create_optimizer_v2
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    table = model.stages[2].blocks[1].attn.rel_pos_table
    group = next(g for g in optimizer.param_groups if any(p is table for p in g['params']))
    assert group['weight_decay'] == 0 and len({g['lr_scale'] for g in optimizer.param_groups}) > 4


def test_sampling_points_api_reports_every_deformable_block():
    model = timm.create_model('dat_tiny').eval()
    x = torch.randn(2, 3, 224, 224)
    logits, records = model.forward_sampling_points(x)
    torch.testing.assert_close(logits, model(x))
    assert [(r.stage, r.block) for r in records] == [(2, 1), (2, 3), (2, 5), (3, 1)]
    assert records[0].points.shape == (2, 3, 14, 14, 2) and records[-1].points.shape == (2, 6, 7, 7, 2)
    for r in records:
        offsets = r.points - r.reference
        hk, wk = r.points.shape[2:4]
        s = 2.0  # offset range factor: |offset| <= s / H_G in normalised units (s x s cells region)
        assert offsets[..., 0].abs().max() <= s / hk + 1e-6 and offsets[..., 1].abs().max() <= s / wk + 1e-6
        assert offsets.abs().max() > 0
        pixels = r.reference.new_tensor(r.to_pixels('reference')[0, 0, 0, 0].tolist())
        assert torch.allclose(pixels, torch.full((2,), r.stride / 2 - 0.5), atol=r.stride)
    assert all(attn.last_sampling is None and not attn.record_sampling for *_, attn in model.deformable_blocks())


def test_offsets_follow_the_input_size():
    model = small_dat().eval()
    _, records = model.forward_sampling_points(torch.randn(1, 3, 96, 160))
    assert records[0].feature_size == (6, 10) and records[0].points.shape == (1, 2, 6, 10, 2)


def test_deformable_attention_keys_come_from_deformed_points():
    """Eq. (7): moving the offsets changes the sampled keys, hence the output."""
    attn = DeformableAttention(32, 4, 2, (8, 8), offset_kernel_size=3).eval()
    x = torch.randn(1, 8, 8, 32)
    with torch.no_grad():
        base = attn(x)
        attn.offset_net.conv_proj.weight.add_(1.0)
        moved = attn(x)
    assert not torch.allclose(base, moved)


def test_training_reduces_loss_on_a_small_task(small_task_losses):
    losses = small_task_losses(small_dat(num_classes=2))
    assert losses[-1] < 0.5 * losses[0]


def test_mixed_precision_runs_and_keeps_sampling_positions_in_float32():
    model = small_dat()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).mean().backward()
    assert model.stages[2].blocks[1].attn.offset_net.conv_proj.weight.grad.abs().sum() > 0
    model = small_dat().to(torch.bfloat16).eval()
    _, records = model.forward_sampling_points(x.bfloat16())
    assert all(r.points.dtype == torch.float32 for r in records)


def test_pixel_centre_sampling_convention_is_an_option():
    model = small_dat(sample_align_corners=False).eval()
    assert all(not attn.sample_align_corners for *_, attn in model.deformable_blocks())
    logits, records = model.forward_sampling_points(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(logits).all() and records[0].align_corners is False


def test_hooks_on_mlp_input_layer_see_pre_activation_values():
    model = small_dat().eval()
    seen = []
    model.stages[0].blocks[0].mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # GELU is never below -0.17: an in-place activation would have overwritten the hooked tensor
    assert seen[0].min() < -0.2
