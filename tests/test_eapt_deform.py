"""Which features Deformable Attention moves (EAPT Sec. III-A, Eq. (1)-(3)): keys and values only
(``deform='keys_values'``) or "each position of this window" (``deform='window'``), each against a
token-by-token oracle, at the same cost, and off at broaden size 0."""
import pytest
import timm
import torch
import torch.nn.functional as F

from deformvit import count_macs, count_parameters
from deformvit.models.eapt import DeformableWindowAttention
from test_eapt import bilinear_eq3, run_attention, small_eapt

MODES = ('keys_values', 'window')


def deformed_attention_oracle(attn: DeformableWindowAttention, f: torch.Tensor) -> torch.Tensor:
    """EAPT attention on a (B, H, W, C) map, token by token, in either ``deform`` mode.

    Every position l of a window moves to C(l + o) (Eq. (1)-(2)) and f + P_f is read there by
    Eq. (3). Keys and values are projected from those reads; the query of l from its own read
    with deform='window', from f + P_f at l otherwise. Each real query attends to the real
    positions of its window; a relative position bias is the table read at the query's minus the
    key's position (the moved ones where they moved); the En-DeC output is added before the
    output projection (Eq. (4)-(5)).
    """
    b, h, w, c = f.shape
    wh, ww = attn.effective_window((h, w))
    heads, d = attn.num_heads, attn.head_dim
    x = f + attn.position(f) if attn.position is not None else f
    padded = F.pad(x, (0, 0, 0, -w % ww, 0, -h % wh))
    out = torch.zeros(b, h, w, c, dtype=f.dtype)
    for bi in range(b):
        for r0 in range(0, padded.shape[1], wh):
            for c0 in range(0, padded.shape[2], ww):
                window = padded[bi, r0:r0 + wh, c0:c0 + ww]
                offsets = attn.offset_net(window[None])[0] if attn.offset_net is not None else torch.zeros(wh, ww, 2)
                real = [(i, j) for i in range(wh) for j in range(ww) if r0 + i < h and c0 + j < w]
                moved = {(i, j): (min(max(r0 + i + offsets[i, j, 0].item(), 0.), h - 1.),  # C(l + o), Eq. (2)
                                  min(max(c0 + j + offsets[i, j, 1].item(), 0.), w - 1.)) for i, j in real}
                reads = {(i, j): bilinear_eq3(x[bi], *moved[i, j]) for i, j in real}  # Eq. (3)
                kv = attn.kv(torch.stack([reads[p] for p in real])).view(len(real), 2, heads, d)
                for i, j in real:
                    if attn.deform == 'window':
                        query, query_at = reads[i, j], moved[i, j]
                    else:
                        query, query_at = x[bi, r0 + i, c0 + j], (r0 + i, c0 + j)
                    logits = torch.einsum('hd,khd->hk', attn.q(query).view(heads, d), kv[:, 0]) * d ** -0.5
                    if attn.position_encoding == 'relative':
                        key_at = [moved[p] if attn.offset_net is not None else (r0 + p[0], c0 + p[1]) for p in real]
                        logits = logits + relative_bias_oracle(attn, query_at, key_at)
                    weights = logits.softmax(-1)
                    out[bi, r0 + i, c0 + j] = torch.einsum('hk,khd->hd', weights, kv[:, 1]).reshape(c)
    if attn.endec is not None:
        comm = attn.endec(x)
        out = (out.unflatten(-1, (comm.shape[-1], -1)) + comm[..., None]).flatten(-2)
    return attn.proj(out)


def relative_bias_oracle(attn: DeformableWindowAttention, query_at, key_at) -> torch.Tensor:
    """(heads, keys): the table, indexed from -extent to +extent, read by Eq. (3) at each displacement."""
    table = attn.rel_pos_table.permute(1, 2, 0).to(torch.float64)  # (Th, Tw, heads)
    extent_y, extent_x = attn.relative_extent
    return torch.stack([
        bilinear_eq3(table, query_at[0] - y + extent_y, query_at[1] - x + extent_x) for y, x in key_at], dim=-1)


@pytest.mark.parametrize('size', [(8, 8), (9, 11), (3, 13)])
@pytest.mark.parametrize('position', ['mcmd', 'relative', 'none'])
@pytest.mark.parametrize('deform', MODES)
def test_attention_equals_token_by_token_oracle_in_both_deform_modes(deform, position, size):
    torch.manual_seed(0)
    attn = DeformableWindowAttention(16, 2, 4, broaden_size=3., deform=deform, position_encoding=position,
                                     endec_channels=(2, 4)).double()
    with torch.no_grad():
        attn.offset_net.dense.weight.mul_(40)  # large offsets: reads across windows and at the border
        if position == 'relative':
            attn.rel_pos_table.normal_()  # a bias that matters next to the logits
    f = torch.randn(2, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        # positions are float32 by design (exact under AMP), hence float32-level agreement
        torch.testing.assert_close(run_attention(attn, f), deformed_attention_oracle(attn, f), rtol=1e-5, atol=1e-6)


def test_window_mode_moves_queries_and_keys_mode_does_not():
    """Same weights, the two readings give different outputs: the window mode really moves queries."""
    torch.manual_seed(0)
    window = DeformableWindowAttention(16, 2, 4, broaden_size=3., deform='window', endec_channels=(2, 4))
    keys_values = DeformableWindowAttention(16, 2, 4, broaden_size=3., deform='keys_values', endec_channels=(2, 4))
    keys_values.load_state_dict(window.state_dict())
    f = torch.randn(1, 9, 11, 16)
    with torch.no_grad():
        assert (run_attention(window, f) - run_attention(keys_values, f)).abs().max() > 1e-3


@pytest.mark.parametrize('deform', MODES)
def test_gradients_reach_the_offset_networks_in_both_modes(deform):
    model = small_eapt(deform=deform, position_encoding='relative')
    model(torch.randn(2, 3, 40, 56)).logsumexp(-1).sum().backward()
    for _, _, attn in model.attention_modules():
        for p in (attn.offset_net.conv.weight, attn.offset_net.dense.weight, attn.q.weight, attn.rel_pos_table):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_moving_the_whole_window_costs_what_moving_keys_costs():
    """Sec. III-A: "does not introduce additional attention calculation costs" in either reading."""
    for position in ('mcmd', 'relative'):
        keys_values, window = (small_eapt(deform=mode, position_encoding=position) for mode in MODES)
        assert count_macs(window, (3, 44, 52)) == count_macs(keys_values, (3, 44, 52))
        if position == 'mcmd':
            assert count_parameters(window) == count_parameters(keys_values)
    # only the relative table grows: moved queries double the displacement range, window - 1 + ceil(2b)
    table_growth = sum(a.rel_pos_table.numel() - b.rel_pos_table.numel()
                       for (*_, a), (*_, b) in zip(window.attention_modules(), keys_values.attention_modules()))
    assert count_parameters(window) - count_parameters(keys_values) == table_growth > 0


def plain_window_attention(attn: DeformableWindowAttention, f: torch.Tensor) -> torch.Tensor:
    """Window attention with the module's projections on a (B, H, W, C) map that the window tiles."""
    b, h, w, c = f.shape
    (wh, ww), heads, d = attn.window_size, attn.num_heads, attn.head_dim
    # (B, H, W, C) -> (B*nW, N, C)
    windows = f.view(b, h // wh, wh, w // ww, ww, c).transpose(2, 3).reshape(-1, wh * ww, c)
    q = attn.q(windows).view(-1, wh * ww, heads, d).transpose(1, 2)
    k, v = attn.kv(windows).view(-1, wh * ww, 2, heads, d).permute(2, 0, 3, 1, 4)
    out = ((q @ k.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v  # (B*nW, heads, N, d)
    out = out.transpose(1, 2).reshape(b, h // wh, w // ww, wh, ww, c).transpose(2, 3).reshape(b, h, w, c)
    return attn.proj(out)


@pytest.mark.parametrize('deform', MODES)
def test_broaden_size_0_makes_both_modes_plain_window_attention(deform):
    torch.manual_seed(0)
    attn = DeformableWindowAttention(16, 2, 4, broaden_size=0, deform=deform, position_encoding='none')
    assert not attn.deformable
    f = torch.randn(2, 8, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_attention(attn, f), plain_window_attention(attn, f), rtol=1e-5, atol=1e-6)


def test_broaden_size_0_models_are_identical_in_both_modes():
    keys_values, window = (small_eapt(deform=mode, broaden_size=0).eval() for mode in MODES)
    window.load_state_dict(keys_values.state_dict())
    x = torch.randn(2, 3, 44, 52)  # stage maps not multiples of the window: padding masked in both
    with torch.no_grad():
        torch.testing.assert_close(window(x), keys_values(x), rtol=0, atol=0)


def test_eapt_nano_with_the_whole_window_moved_runs_trains_and_records_its_points():
    model = timm.create_model('eapt_nano', deform='window', num_classes=10)
    assert all(attn.deform == 'window' for *_, attn in model.attention_modules())
    for size in ((32, 32), (45, 61)):
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert all(attn.offset_net.dense.weight.grad.abs().sum() > 0 for *_, attn in model.attention_modules())
    model.eval()
    with torch.no_grad():
        _, records = model.forward_sampling_points(torch.randn(1, 3, 45, 61))
    assert len(records) == len(list(model.deformable_blocks())) > 0
    first = records[0]
    assert first.points.shape == (1, 1, 12, 16, 2) and first.points.abs().max() <= 1
    assert (first.points - first.reference).abs().max() > 0  # the recorded positions moved


def test_unknown_deform_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="deform 'queries' is not one of"):
        small_eapt(deform='queries')
