"""Fast paths (attention, deformable position bias, MLPs, DAT's downsampling, EAPT's offset
network) against their reference paths: values, gradients, what they keep for backward, and when
each one runs (docs/benchmarks.md, "Fast paths")."""
import importlib

import pytest
import timm
import torch

from deformvit.layers import Mlp, attention, deformable_relative_position_bias
from deformvit.models.dat import Downsample
from deformvit.models.datpp import ConvMlp
from deformvit.models.eapt import WindowOffsetNetwork

attention_module = importlib.import_module('deformvit.layers.attention')
position_module = importlib.import_module('deformvit.layers.position')


def saved_shapes(fn, *args):
    """The shapes of the tensors autograd keeps for the backward of ``fn(*args)``."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, shapes


def saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd keeps for the backward of ``fn(*args)``, inputs and
    parameters excluded."""
    parameters = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    inputs = {t.untyped_storage().data_ptr() for t in (*args, *parameters) if isinstance(t, torch.Tensor)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def grads(out, inputs):
    return torch.autograd.grad(out.square().sum(), [t for t in inputs if t is not None and t.requires_grad])


BIAS_SHAPES = [None, (1, 3, 5, 7), (2, 3, 5, 7), (5, 7), (2, 1, 5, 1)]


@pytest.mark.parametrize('bias_shape', BIAS_SHAPES)
@pytest.mark.parametrize('bias_grad', [True, False])
def test_lean_attention_equals_explicit_path_values_and_gradients(bias_shape, bias_grad):
    q, k, v = (torch.randn(2, 3, n, 4, requires_grad=True) for n in (5, 7, 7))
    bias = None if bias_shape is None else torch.randn(bias_shape, requires_grad=bias_grad)
    fast = attention(q, k, v, bias)
    assert type(fast.grad_fn).__name__ == '_LeanAttentionBackward'
    reference = attention(q, k, v, bias, fused=False)
    torch.testing.assert_close(fast, reference)
    for a, b in zip(grads(fast, (q, k, v, bias)), grads(reference, (q, k, v, bias))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('shapes', [((2, 3, 5, 4), (2, 3, 7, 4), (1, 3, 5, 7)),
                                    ((1, 3, 5, 4), (2, 3, 7, 4), (2, 1, 5, 7))])
def test_lean_attention_passes_gradcheck(shapes):
    q_shape, kv_shape, bias_shape = shapes
    shapes = (q_shape, kv_shape, kv_shape, bias_shape)
    tensors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *t: attention(*t), tensors)


def test_lean_attention_keeps_less_than_the_unfused_kernel():
    q, k, v = (torch.randn(2, 3, 64, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 64, 64, requires_grad=True)  # needs a gradient: SDPA's CPU math path
    weights = 2 * 3 * 64 * 64 * 4
    lean = saved_bytes(attention, q, k, v, bias)
    unfused = saved_bytes(torch.nn.functional.scaled_dot_product_attention, q, k, v, bias)
    assert lean == weights  # q, k, v are inputs; the weights are all it adds
    assert unfused > lean  # the math path also keeps scaled copies of q and k


def test_attention_picks_its_cpu_path():
    pick = attention_module._cpu_path
    small = [torch.randn(2, 3, 49, 32) for _ in range(3)]
    large_q, large_k = torch.randn(2, 3, 196, 32), torch.randn(2, 3, 196, 32)
    table_bias = torch.randn(2, 3, 196, 196, requires_grad=True)
    assert pick(*small, None, 0.) == 'inplace'  # no gradient, small logits
    assert pick(large_q, large_k, large_k, None, 0.) == 'sdpa'  # no gradient, large logits
    assert pick(large_q, large_k, large_k, table_bias, 0.) == 'lean'  # bias gradient: not the math path
    assert pick(large_q.requires_grad_(), large_k, large_k, table_bias.detach(), 0.) == 'sdpa'
    assert pick(small[0].requires_grad_(), small[1], small[2], None, 0.) == 'lean'  # small logits
    assert pick(*small, None, 0.1) == 'sdpa'  # dropout: the fused kernel draws the mask
    assert pick(*(t.detach().bfloat16() for t in small), None, 0.) == 'sdpa'  # half precision
    with torch.no_grad():
        assert pick(large_q, large_k, large_k, table_bias, 0.) == 'sdpa'


def test_inplace_inference_path_equals_explicit_path():
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    bias = torch.randn(2, 4, 10, 10)
    with torch.inference_mode():
        for b in (None, bias, bias[:1], bias[0, 0]):
            torch.testing.assert_close(attention(q, k, v, b), attention(q, k, v, b, fused=False))


def points(shape, dtype=torch.float64):
    return torch.rand(*shape, dtype=dtype) * 2.2 - 1.1  # some outside [-1, 1], where the table reads zero


@pytest.mark.parametrize('query_shape', [(6, 2), (8, 6, 2), (1, 6, 2)])
def test_lean_deformable_bias_equals_composite_and_passes_gradcheck(query_shape, monkeypatch):
    table = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    queries = points(query_shape).requires_grad_(len(query_shape) == 3)  # moving queries (EAPT's deform='window')
    keys = points((8, 9, 2)).requires_grad_()
    inputs = (table, queries, keys)
    fast = deformable_relative_position_bias(*inputs, 2)
    assert type(fast.grad_fn).__name__ == '_DeformableBiasBackward'
    assert torch.autograd.gradcheck(lambda *t: deformable_relative_position_bias(*t, 2), inputs)
    fast_grads = grads(fast, inputs)
    monkeypatch.setattr(position_module, '_lean_bias', lambda *args: False)
    reference = deformable_relative_position_bias(*inputs, 2)
    assert type(reference.grad_fn).__name__ != '_DeformableBiasBackward'
    torch.testing.assert_close(fast, reference)
    for a, b in zip(fast_grads, grads(reference, inputs)):
        torch.testing.assert_close(a, b)


def test_lean_deformable_bias_keeps_no_displacements(monkeypatch):
    table = torch.randn(6, 27, 27, requires_grad=True)
    queries, keys = points((196, 2), torch.float32), points((6, 49, 2), torch.float32).requires_grad_()
    displacements = (6, 196, 49, 2)
    _, fast = saved_shapes(deformable_relative_position_bias, table, queries, keys, 3)
    assert displacements not in fast and max(map(len, fast)) <= 3  # the table and the points
    monkeypatch.setattr(position_module, '_lean_bias', lambda *args: False)
    _, reference = saved_shapes(deformable_relative_position_bias, table, queries, keys, 3)
    assert displacements in reference


def mlp_pair(**kwargs):
    torch.manual_seed(0)
    return Mlp(8, 24, **kwargs).double()


def test_lean_mlp_equals_plain_path_and_keeps_one_hidden_activation(monkeypatch):
    mlp = mlp_pair()
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    fast = mlp(x)
    assert type(fast.grad_fn).__name__ == '_LeanMlpBackward'
    fast_grads = grads(fast, (x, *mlp.parameters()))
    fast_bytes = saved_bytes(mlp, x)
    monkeypatch.setattr(Mlp, 'lean', False)
    plain = mlp(x)
    hidden = 2 * 3 * 5 * 24 * 8  # one (2, 3, 5, 24) float64 activation
    assert saved_bytes(mlp, x) - fast_bytes == hidden  # the GELU's output, kept by the plain path only
    torch.testing.assert_close(fast, plain)
    for a, b in zip(fast_grads, grads(plain, (x, *mlp.parameters()))):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(Mlp, 'lean', True)
    parameters = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    assert torch.autograd.gradcheck(lambda x, *p: mlp(x), (x, *parameters))


def test_lean_mlp_steps_aside_where_it_cannot_apply():
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert type(mlp_pair()(x).grad_fn).__name__ == '_LeanMlpBackward'
    assert type(mlp_pair(drop=0.1).train()(x).grad_fn).__name__ != '_LeanMlpBackward'  # dropout between
    assert type(mlp_pair(drop=0.1).eval()(x).grad_fn).__name__ == '_LeanMlpBackward'
    hooked = mlp_pair()
    seen = []
    hooked.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert type(hooked(x).grad_fn).__name__ != '_LeanMlpBackward' and seen == [(2, 5, 24)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert type(mlp_pair().float()(x.float()).grad_fn).__name__ != '_LeanMlpBackward'
    with torch.no_grad():
        assert mlp_pair()(x).grad_fn is None


SMALL_MODELS = {
    'dat_nano': {},
    'eapt_nano': {},
    'datpp_tiny': dict(embed_dims=(16, 32, 64, 128), stage_spec=('ND', 'ND', 'DN', 'D'), num_heads=(1, 2, 4, 8),
                       groups=(1, 1, 2, 4)),
}


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_gradients_equal_with_and_without_fast_paths(name, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **SMALL_MODELS[name]).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def gradients():
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_out, fast = gradients()
    monkeypatch.setattr(Mlp, 'lean', False)
    monkeypatch.setattr(ConvMlp, 'lean', False)
    monkeypatch.setattr(Downsample, 'as_linear', False)
    monkeypatch.setattr(WindowOffsetNetwork, 'fused', False)
    monkeypatch.setattr(position_module, '_lean_bias', lambda *args: False)
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            monkeypatch.setattr(m, 'fused_attn', False)
    reference_out, reference = gradients()
    torch.testing.assert_close(fast_out, reference_out)
    assert fast.keys() == reference.keys()
    for n, g in fast.items():
        torch.testing.assert_close(g, reference[n], msg=n)


@pytest.mark.parametrize('size', [(8, 6), (7, 9)])
def test_downsample_as_linear_equals_its_convolution(size, monkeypatch):
    torch.manual_seed(0)
    down = Downsample(5, 7).double()
    x = torch.randn(2, *size, 5, dtype=torch.float64, requires_grad=True)
    fast = down(x)
    fast_grads = grads(fast, (x, down.conv.weight))
    monkeypatch.setattr(Downsample, 'as_linear', False)
    conv = down(x)
    assert fast.shape == conv.shape == (2, (size[0] + 1) // 2, (size[1] + 1) // 2, 7)
    torch.testing.assert_close(fast, conv)
    for a, b in zip(fast_grads, grads(conv, (x, down.conv.weight))):
        torch.testing.assert_close(a, b)


def test_training_after_inference_in_one_process():
    """Index tables cached under torch.inference_mode must serve a later training pass."""
    neighborhood = importlib.import_module('deformvit.layers.neighborhood')
    model = timm.create_model('datpp_tiny', num_classes=5, **SMALL_MODELS['datpp_tiny'])
    x = torch.randn(1, 3, 112, 112)  # 14x14 and 7x7 neighborhood maps: the dense method's cached tables
    with torch.inference_mode():
        expected = model.eval()(x)
    model(x).sum().backward()  # eval mode still: same values, now with a graph
    assert model.stages[1].blocks[0].attn.rpb.grad is not None
    torch.testing.assert_close(model(x).detach(), expected)
    q, k, v = torch.randn(3, 1, 2, 20, 20, 4).unbind(0)
    rpb = torch.randn(2, 13, 13)
    with torch.inference_mode():  # the tiled method's tables, cached at the tile training uses
        expected = neighborhood._tiled_attention(q, k, v, rpb, 7, 1, 0., tile=7)
    rpb.requires_grad_()
    out = neighborhood._tiled_attention(q, k, v, rpb, 7, 1, 0., tile=7)
    out.sum().backward()
    assert rpb.grad is not None
    torch.testing.assert_close(out.detach(), expected)


def test_lean_conv_mlp_equals_plain_path_and_keeps_one_hidden_map(monkeypatch):
    torch.manual_seed(0)
    mlp = ConvMlp(6, 12).double()
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    parameters = list(mlp.parameters())
    fast = mlp(x)
    assert type(fast.grad_fn).__name__ == '_LeanConvMlpBackward'
    fast_grads = grads(fast, (x, *parameters))
    fast_bytes = saved_bytes(mlp, x)
    assert torch.autograd.gradcheck(lambda x, *p: mlp(x), (x, *parameters))
    monkeypatch.setattr(ConvMlp, 'lean', False)
    plain = mlp(x)
    hidden = 2 * 5 * 7 * 12 * 8  # one (2, 5, 7, 12) float64 map
    assert fast_bytes == hidden  # fc1's output, nothing else of the hidden size
    assert saved_bytes(mlp, x) >= 3 * hidden  # the plain path: fc1's output, h + conv(h), the GELU's output
    torch.testing.assert_close(fast, plain)
    for a, b in zip(fast_grads, grads(plain, (x, *parameters))):
        torch.testing.assert_close(a, b)


def test_fused_offset_network_equals_conv_then_dense(monkeypatch):
    torch.manual_seed(0)
    net = WindowOffsetNetwork(6, 3, 4.).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 7, 7, 6, dtype=torch.float64, requires_grad=True)
    fast = net(x)
    fast_grads = grads(fast, (x, *net.parameters()))
    fast_bytes = saved_bytes(net, x)
    monkeypatch.setattr(WindowOffsetNetwork, 'fused', False)
    plain = net(x)
    channel_map = 5 * 7 * 7 * 6 * 8  # the C-channel map between the layers
    assert fast_bytes < channel_map <= saved_bytes(net, x)
    torch.testing.assert_close(fast, plain)
    for a, b in zip(fast_grads, grads(plain, (x, *net.parameters()))):
        torch.testing.assert_close(a, b)


def test_one_switch_turns_every_fast_path_off():
    from deformvit.layers import fast_paths, fast_paths_enabled
    torch.manual_seed(0)
    model = timm.create_model('dat_nano', num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    names = set()

    def record(module, args, out):
        if out.grad_fn is not None:
            names.add(type(out.grad_fn).__name__)

    for m in model.modules():
        if isinstance(m, (Mlp, Downsample)) or type(m).__name__ == 'DeformableAttention':
            m.register_forward_hook(record)
    with fast_paths(False):
        assert not fast_paths_enabled()
        model(x)
    assert fast_paths_enabled()
    assert not any(name.startswith('_Lean') for name in names), names  # hooks are on the Mlp, not its layers
    assert attention_module._cpu_path(*torch.randn(3, 1, 2, 49, 8).unbind(0), None, 0.) == 'inplace'
    with fast_paths(False):
        assert attention_module._cpu_path(*torch.randn(3, 1, 2, 49, 8).unbind(0), None, 0.) == 'sdpa'
    for careless in (0, 'no', None):
        with pytest.raises(TypeError, match='True or False'):
            with fast_paths(careless):
                pass
    assert fast_paths_enabled()
    names.clear()
    model(x)
    assert '_LeanMlpBackward' in names


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_mac_counts_do_not_depend_on_the_fast_paths(name):
    """The papers' tables count the plain formulation: the FLOP counter sees it either way."""
    from deformvit import count_macs
    from deformvit.layers import fast_paths
    model = timm.create_model(name, **SMALL_MODELS[name])
    with fast_paths(False):
        plain = count_macs(model, (3, 96, 96))
    assert count_macs(model, (3, 96, 96)) == plain
