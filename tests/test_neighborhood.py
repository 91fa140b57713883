"""Neighborhood attention with natten 0.14's semantics (DAT++ 'N' blocks, NAT / DiNAT windows)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from deformvit.layers.neighborhood import (
    GATHER_CHUNK_ELEMENTS,
    NeighborhoodAttention2D,
    neighborhood_attention,
    neighborhood_attention_method,
    neighborhood_attention_reference,
    neighborhood_bias_start,
    neighborhood_indices,
    neighborhood_window_start,
)
from deformvit.layers.neighborhood import _counted_attention
from deformvit.tools.complexity import count_macs_of

METHODS = ['dense', 'neighborhood', 'tiled', None]


def brute_force_window_start(index, length, kernel_size, dilation):
    """The start of the most centred window of ``kernel_size`` consecutive members of the query's dilation
    group that lies inside the axis, found by trying every window: natten's rule stated as a search."""
    group = list(range(index % dilation, length, dilation))
    member = group.index(index)
    starts = range(len(group) - kernel_size + 1)
    best = min(starts, key=lambda s: abs(s + kernel_size // 2 - member))
    return group[best]


def qkv_rpb(batch, heads, height, width, head_dim, kernel_size, dtype=torch.float32, grad=False):
    tensors = [torch.randn(batch, heads, height, width, head_dim, dtype=dtype) for _ in range(3)]
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=dtype)
    return [t.requires_grad_(grad) for t in (*tensors, rpb)]


# --- windows and bias rows ---------------------------------------------------------------------

def test_window_and_bias_starts_by_hand_length5_kernel3():
    # queries 0 and 4 sit on the borders: their windows are shifted inside, not cut
    assert [neighborhood_window_start(i, 5, 3) for i in range(5)] == [0, 0, 1, 2, 2]
    assert [neighborhood_bias_start(i, 5, 3) for i in range(5)] == [2, 1, 1, 1, 0]
    keys, bias = neighborhood_indices(5, 3)
    assert keys.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
    assert bias.tolist() == [[2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2]]


def test_window_and_bias_starts_by_hand_dilated_length7_kernel3_dilation2():
    # groups {0, 2, 4, 6} and {1, 3, 5}; each query's window is 3 members of its own group
    assert [neighborhood_window_start(i, 7, 3, 2) for i in range(7)] == [0, 1, 0, 1, 2, 1, 2]
    assert [neighborhood_bias_start(i, 7, 3, 2) for i in range(7)] == [2, 2, 1, 1, 1, 0, 0]
    keys, bias = neighborhood_indices(7, 3, 2)
    assert keys.tolist() == [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]]
    assert bias.tolist() == [[2, 3, 4], [2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2], [0, 1, 2]]


@pytest.mark.parametrize('kernel_size,dilation', list(itertools.product([1, 3, 5, 7, 9], [1, 2, 3, 4])))
def test_windows_are_the_most_centred_inside_the_axis_on_every_length(kernel_size, dilation):
    for length in range(kernel_size * dilation, 41):
        expected_start = [brute_force_window_start(i, length, kernel_size, dilation) for i in range(length)]
        # the first key's bias row is its dilated offset from the query plus k - 1
        expected_bias = [(start - i) // dilation + kernel_size - 1 for i, start in enumerate(expected_start)]
        assert [neighborhood_window_start(i, length, kernel_size, dilation) for i in range(length)] == expected_start
        assert [neighborhood_bias_start(i, length, kernel_size, dilation) for i in range(length)] == expected_bias
        keys, bias = neighborhood_indices(length, kernel_size, dilation)
        assert keys[:, 0].tolist() == expected_start
        assert bias[:, 0].tolist() == expected_bias
        assert (keys.diff(dim=1) == dilation).all() and (bias.diff(dim=1) == 1).all()


@pytest.mark.parametrize('length,kernel_size,dilation', [(5, 3, 1), (12, 5, 1), (7, 3, 2), (23, 5, 3), (16, 7, 2)])
def test_bias_row_is_the_dilated_relative_position_even_at_the_borders(length, kernel_size, dilation):
    keys, bias = neighborhood_indices(length, kernel_size, dilation)
    query = torch.arange(length)[:, None]
    assert ((keys - query) % dilation == 0).all(), 'a window left its dilation group'
    assert torch.equal(bias, (keys - query) // dilation + kernel_size - 1)


def test_every_key_of_a_window_is_inside_the_axis_and_the_query_is_in_its_window():
    for length, kernel_size, dilation in [(9, 3, 3), (10, 5, 2), (30, 7, 4)]:
        keys, _ = neighborhood_indices(length, kernel_size, dilation)
        assert keys.min() >= 0 and keys.max() < length
        assert (keys == torch.arange(length)[:, None]).any(dim=1).all()


# --- the oracle ----------------------------------------------------------------------------------

def test_map_equal_to_the_kernel_is_global_attention_with_relative_position_bias():
    q, k, v, rpb = qkv_rpb(2, 3, 5, 5, 4, kernel_size=5)
    coords = [(y, x) for y in range(5) for x in range(5)]
    bias = torch.stack([torch.stack([rpb[:, ky - qy + 4, kx - qx + 4] for ky, kx in coords], -1)
                        for qy, qx in coords], -2)  # (heads, N, N) built pair by pair
    flat = [t.flatten(2, 3) for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*flat, attn_mask=bias, scale=1.0).view_as(q)
    torch.testing.assert_close(neighborhood_attention_reference(q, k, v, rpb, 5), expected, atol=1e-5, rtol=1e-5)


def test_reference_attends_only_to_the_natten_window():
    q, k, v, rpb = qkv_rpb(1, 1, 7, 9, 2, kernel_size=3)
    base = neighborhood_attention_reference(q, k, v, rpb, 3)
    v_far = v.clone()
    v_far[:, :, 6, 0] += 100.0  # the bottom-left corner: only queries (5-6, 0-1) have it in their window
    changed = (neighborhood_attention_reference(q, k, v_far, rpb, 3) - base).abs().amax(dim=(0, 1, 4)) > 0
    expected = torch.zeros(7, 9, dtype=torch.bool)
    expected[5:, :2] = True
    assert torch.equal(changed, expected)


# --- fast paths against the oracle ---------------------------------------------------------------

CASES = [  # (height, width, kernel, dilation)
    (7, 7, 3, 1),
    (9, 13, 3, 1),
    (10, 11, 5, 1),
    (7, 7, 7, 1),  # map equal to the kernel
    (7, 10, 7, 1),
    (12, 17, 3, 2),
    (9, 10, 3, 3),
    (15, 14, 5, 2),
]


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('height,width,kernel_size,dilation', CASES)
def test_fast_paths_match_the_reference(height, width, kernel_size, dilation, method):
    q, k, v, rpb = qkv_rpb(2, 3, height, width, 4, kernel_size)
    expected = neighborhood_attention_reference(q, k, v, rpb, kernel_size, dilation)
    out = neighborhood_attention(q, k, v, rpb, kernel_size, dilation, method=method)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('method', ['dense', 'neighborhood'])
@pytest.mark.parametrize('height,width,kernel_size,dilation', [(7, 9, 3, 1), (8, 8, 5, 1), (11, 9, 3, 3), (7, 7, 7, 1)])
def test_fast_paths_have_the_reference_gradients(height, width, kernel_size, dilation, method):
    inputs = qkv_rpb(2, 2, height, width, 3, kernel_size, dtype=torch.float64, grad=True)
    upstream = torch.randn(2, 2, height, width, 3, dtype=torch.float64)
    expected = torch.autograd.grad(neighborhood_attention_reference(*inputs, kernel_size, dilation), inputs, upstream)
    got = torch.autograd.grad(neighborhood_attention(*inputs, kernel_size, dilation, method=method), inputs, upstream)
    for name, g, e in zip('q k v rpb'.split(), got, expected):
        assert e.abs().sum() > 0, f'no gradient reaches {name}'
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-8, msg=f'gradient of {name}')


@pytest.mark.parametrize('neighbours_per_chunk', [1, 2, 4, 9])
def test_gather_in_chunks_of_neighbours_matches_the_reference(monkeypatch, neighbours_per_chunk):
    inputs = qkv_rpb(2, 2, 7, 8, 3, kernel_size=3, dtype=torch.float64, grad=True)
    elements = 7 * 8 * 2 * 2 * 3  # one gathered neighbour: N * B*heads * d
    monkeypatch.setitem(GATHER_CHUNK_ELEMENTS, 'cpu', neighbours_per_chunk * elements)
    upstream = torch.randn(2, 2, 7, 8, 3, dtype=torch.float64)
    expected = neighborhood_attention_reference(*inputs, 3, 2)
    out = neighborhood_attention(*inputs, 3, 2, method='neighborhood')
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-8)
    for g, e in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-8)


def test_neighborhood_path_passes_gradcheck():
    inputs = qkv_rpb(1, 2, 6, 7, 3, kernel_size=3, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda *t: neighborhood_attention(*t, 3, 2, method='neighborhood'), inputs)


@pytest.mark.parametrize('method', ['dense', 'neighborhood'])
def test_without_bias(method):
    q, k, v, _ = qkv_rpb(2, 2, 8, 9, 4, kernel_size=3)
    expected = neighborhood_attention_reference(q, k, v, None, 3, 2)
    torch.testing.assert_close(neighborhood_attention(q, k, v, None, 3, 2, method=method), expected,
                               atol=1e-5, rtol=1e-5)


def test_dense_only_on_small_maps():
    cpu, gpu = torch.device('cpu'), torch.device('cuda')  # only the device type is read
    assert neighborhood_attention_method((14, 14), 7, cpu) == 'dense'  # 4 tokens per neighbour
    assert neighborhood_attention_method((14, 15), 7, cpu) == 'tiled'
    assert neighborhood_attention_method((28, 28), 7, gpu) == 'dense'  # 16 tokens per neighbour
    assert neighborhood_attention_method((28, 29), 7, gpu) == 'neighborhood'
    assert neighborhood_attention_method((200, 320), 7, gpu) == 'neighborhood'


def test_non_contiguous_inputs():
    q, k, v, rpb = qkv_rpb(2, 2, 9, 8, 4, kernel_size=3)
    q, k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    expected = neighborhood_attention_reference(q, k, v, rpb, 3)
    torch.testing.assert_close(neighborhood_attention(q, k, v, rpb, 3, method='neighborhood'), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('method', ['dense', 'neighborhood', 'tiled'])
def test_bfloat16_stays_close_to_float32(method):
    q, k, v, rpb = qkv_rpb(1, 2, 10, 12, 8, kernel_size=5)
    expected = neighborhood_attention(q, k, v, rpb, 5, method=method)
    out = neighborhood_attention(*(t.bfloat16() for t in (q, k, v, rpb)), 5, method=method)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_detector_sized_map_runs_in_linear_memory_and_matches_an_interior_query_by_hand():
    # 200x320 tokens: a dense (N, N) bias alone would be 16 GB; the gather keeps (k*k, N) weights
    q, k, v, rpb = qkv_rpb(1, 1, 200, 320, 4, kernel_size=7)
    out = neighborhood_attention(q, k, v, rpb, 7)
    assert out.shape == q.shape and torch.isfinite(out).all()
    y, x = 100, 150
    logits = (q[0, 0, y, x] * k[0, 0, y - 3:y + 4, x - 3:x + 4]).sum(-1) + rpb[0, 3:10, 3:10]
    expected = (logits.flatten().softmax(0)[:, None] * v[0, 0, y - 3:y + 4, x - 3:x + 4].reshape(49, 4)).sum(0)
    torch.testing.assert_close(out[0, 0, y, x], expected, atol=1e-5, rtol=1e-5)


# --- the DAT++ module ----------------------------------------------------------------------------

def module_by_hand(module, x, dilation):
    """The official forward written out: pad (B, H, W, C) bottom/right to the window, qkv, NA, crop, proj."""
    b, c, h, w = x.shape
    window = module.kernel_size * dilation
    x = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, max(window - w, 0), 0, max(window - h, 0)))
    hp, wp = x.shape[1:3]
    heads, head_dim = module.num_heads, c // module.num_heads
    q, k, v = module.qkv(x).view(b, hp, wp, 3, heads, head_dim).permute(3, 0, 4, 1, 2, 5)
    out = neighborhood_attention_reference(q * head_dim ** -0.5, k, v, module.rpb, module.kernel_size, dilation)
    out = out.permute(0, 2, 3, 1, 4).reshape(b, hp, wp, c)[:, :h, :w]
    return module.proj(out).permute(0, 3, 1, 2)


def test_module_state_dict_has_the_official_keys_and_shapes():
    module = NeighborhoodAttention2D(64, 7, 2)
    shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert shapes == {'qkv.weight': (192, 64), 'qkv.bias': (192,), 'rpb': (2, 13, 13),
                      'proj.weight': (64, 64), 'proj.bias': (64,)}
    official = {name: torch.randn(shape) for name, shape in shapes.items()}
    module.load_state_dict(official, strict=True)
    assert torch.equal(module.rpb, official['rpb'])


@pytest.mark.parametrize('height,width,kernel_size,dilation', [
    (9, 11, 3, 1),
    (13, 7, 5, 1),
    (11, 13, 3, 2),
    (5, 9, 7, 1),  # height < kernel: padded to 7x9
    (4, 4, 7, 1),  # both sides < kernel: padded to 7x7
    (10, 10, 3, 4),  # < kernel x dilation = 12: padded to 12x12
])
def test_module_is_the_official_forward(height, width, kernel_size, dilation):
    module = NeighborhoodAttention2D(24, kernel_size, 3, dilation=dilation).eval()
    torch.nn.init.normal_(module.qkv.bias)  # padded tokens carry the qkv bias into the attention
    x = torch.randn(2, 24, height, width)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, module_by_hand(module, x, dilation), atol=1e-5, rtol=1e-5)


def test_padded_tokens_are_keys_of_the_real_queries():
    module = NeighborhoodAttention2D(8, 7, 2).eval()
    torch.nn.init.normal_(module.qkv.bias)
    x = torch.randn(1, 8, 5, 5)
    out = module(x)
    with torch.no_grad():
        module.qkv.bias[8:] += 1.0  # the keys and values of the padding (zero inputs) are their biases
    assert not torch.allclose(module(x), out)


def test_module_adaptive_dilation_is_min_side_over_kernel():
    adaptive = NeighborhoodAttention2D(16, 3, 2, dilation='adaptive').eval()
    fixed = NeighborhoodAttention2D(16, 3, 2, dilation=4).eval()
    fixed.load_state_dict(adaptive.state_dict())
    x = torch.randn(1, 16, 13, 15)
    assert adaptive.dilation_for((13, 15)) == 4
    torch.testing.assert_close(adaptive(x), fixed(x))
    assert adaptive.dilation_for((2, 40)) == 1


def test_module_attention_dropout_acts_only_in_training():
    module = NeighborhoodAttention2D(16, 3, 2, attn_drop=0.5)
    x = torch.randn(1, 16, 9, 9)
    module.eval()
    torch.testing.assert_close(module(x), module(x))
    module.train()
    assert not torch.allclose(module(x), module.eval()(x))


def test_module_trains_in_bfloat16():
    module = NeighborhoodAttention2D(16, 3, 2)
    x = torch.randn(2, 16, 9, 11)
    expected = module(x)
    module_bf16 = NeighborhoodAttention2D(16, 3, 2).bfloat16()
    module_bf16.load_state_dict(module.state_dict())
    out = module_bf16(x.bfloat16())
    out.float().sum().backward()
    assert module_bf16.rpb.grad is not None and module_bf16.rpb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


# --- bad arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize('kernel_size,dilation,message', [
    (4, 1, 'kernel_size must be an odd integer'),
    (0, 1, 'kernel_size must be an odd integer'),
    (-3, 1, 'kernel_size must be an odd integer'),
    (3.0, 1, 'kernel_size must be an odd integer'),
    (3, 0, 'dilation must be an integer >= 1'),
    (3, 1.5, 'dilation must be an integer >= 1'),
])
def test_bad_kernel_or_dilation_raises(kernel_size, dilation, message):
    q, k, v, _ = qkv_rpb(1, 1, 9, 9, 2, kernel_size=3)
    with pytest.raises(ValueError, match=message):
        neighborhood_attention(q, k, v, None, kernel_size, dilation)
    with pytest.raises(ValueError, match=message):
        neighborhood_indices(9, kernel_size, dilation)
    with pytest.raises(ValueError, match=message):
        NeighborhoodAttention2D(8, kernel_size, 2, dilation=dilation)


@pytest.mark.parametrize('height,width,kernel_size,dilation', [(6, 9, 7, 1), (9, 6, 7, 1), (11, 12, 3, 4)])
def test_map_smaller_than_kernel_times_dilation_raises_like_natten(height, width, kernel_size, dilation):
    q, k, v, rpb = qkv_rpb(1, 1, height, width, 2, kernel_size)
    with pytest.raises(ValueError, match=r'smaller than kernel_size x dilation = \d+ per side.*pad it first'):
        neighborhood_attention(q, k, v, rpb, kernel_size, dilation)
    with pytest.raises(ValueError, match='shorter than kernel_size x dilation'):
        neighborhood_indices(min(height, width), kernel_size, dilation)


def test_bad_shapes_and_method_raise():
    q, k, v, rpb = qkv_rpb(1, 2, 9, 9, 4, kernel_size=3)
    with pytest.raises(ValueError, match='share one'):
        neighborhood_attention(q, k[:, :, :8], v, rpb, 3)
    with pytest.raises(ValueError, match='share one'):
        neighborhood_attention(q[0], k[0], v[0], rpb, 3)
    with pytest.raises(ValueError, match=r'rpb must be \(heads, 2k-1, 2k-1\) = \(2, 5, 5\)'):
        neighborhood_attention(q, k, v, rpb[:, :3, :3], 3)
    with pytest.raises(ValueError, match='method must be one of'):
        neighborhood_attention(q, k, v, rpb, 3, method='flash')
    with pytest.raises(ValueError, match='outside an axis of length 9'):
        neighborhood_window_start(9, 9, 3)


def test_bad_module_arguments_raise():
    with pytest.raises(ValueError, match='multiple of num_heads'):
        NeighborhoodAttention2D(10, 3, 3)
    with pytest.raises(ValueError, match="'adaptive'"):
        NeighborhoodAttention2D(8, 3, 2, dilation='auto')


# --- CUDA (runs where a GPU is visible) ----------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('method', ['dense', 'neighborhood'])
@pytest.mark.parametrize('height,width,kernel_size,dilation', [(9, 13, 3, 1), (7, 7, 7, 1), (15, 14, 5, 2)])
def test_cuda_matches_the_cpu_reference_values_and_gradients(height, width, kernel_size, dilation, method):
    inputs = qkv_rpb(2, 3, height, width, 4, kernel_size, dtype=torch.float64, grad=True)
    upstream = torch.randn(2, 3, height, width, 4, dtype=torch.float64)
    expected = neighborhood_attention_reference(*inputs, kernel_size, dilation)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    on_gpu = [t.detach().cuda().requires_grad_() for t in inputs]
    out = neighborhood_attention(*on_gpu, kernel_size, dilation, method=method)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-10, rtol=1e-8)
    for g, e in zip(torch.autograd.grad(out, on_gpu, upstream.cuda()), expected_grads):
        torch.testing.assert_close(g.cpu(), e, atol=1e-10, rtol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_module_in_bfloat16_with_padding():
    module = NeighborhoodAttention2D(64, 7, 2).cuda()
    x = torch.randn(2, 64, 5, 33, device='cuda')  # 5 < 7: padded
    expected = module(x)
    module_bf16 = NeighborhoodAttention2D(64, 7, 2).cuda().bfloat16()
    module_bf16.load_state_dict(module.state_dict())
    out = module_bf16(x.bfloat16())
    out.float().sum().backward()
    assert torch.isfinite(module_bf16.rpb.grad).all()
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize('method', ['dense', 'neighborhood', 'tiled', None])
@pytest.mark.parametrize('size,kernel_size,dilation', [((14, 14), 7, 1), ((20, 9), 3, 2), ((7, 7), 7, 1)])
def test_flop_counter_sees_the_k_squared_products_of_every_path(method, size, kernel_size, dilation):
    """``deformvit.count_macs`` counts ``H W k^2 d`` MACs per head for ``q . k`` and as many for the
    weighted sum, whichever path would run (the dense path computes ``(H W)^2``, the gather path hides
    its products in element-wise ops), and the counted form gives the same values."""
    q, k, v, rpb = qkv_rpb(2, 3, *size, 4, kernel_size)
    total, _ = count_macs_of(lambda: neighborhood_attention(q, k, v, rpb, kernel_size, dilation, method=method))
    assert total == 2 * 2 * 3 * size[0] * size[1] * kernel_size ** 2 * 4
    expected = neighborhood_attention_reference(q, k, v, rpb, kernel_size, dilation)
    torch.testing.assert_close(_counted_attention(q, k, v, rpb, kernel_size, dilation), expected, atol=1e-5, rtol=1e-5)
