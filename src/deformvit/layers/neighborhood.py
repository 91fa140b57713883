"""Neighborhood attention (NA) in plain PyTorch, with the semantics of natten 0.14.

Neighborhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) lets
every query attend to the ``k x k`` keys around it; dilated NA (Hassani and Shi, "Dilated
Neighborhood Attention Transformer", 2022) spaces them ``d`` apart. DAT++ (Xia, Pan, Song, Li and
Huang, "DAT++: Spatially Dynamic Vision Transformer with Deformable Attention", arXiv:2309.01430)
builds the ``'N'`` blocks of its stage specifications from it: the official code
(LeapLabTHU/DAT, ``models/nat.py``) calls natten 0.14's compiled ``natten2dqkrpb`` and
``natten2dav`` kernels through a ``NeighborhoodAttention2D`` module. natten is a compiled
extension, so this file reimplements the same operation:

* :func:`neighborhood_attention_reference`, one query at a time, the test oracle;
* :func:`neighborhood_attention`, the fast path: dense masked attention on small maps; on larger
  ones, query tiles against the key regions that hold their windows on the CPU, and elsewhere a
  gather over the ``k * k`` neighbours with hand-written gradients (memory linear in the map)
  (:func:`neighborhood_attention_method` says which);
* :class:`NeighborhoodAttention2D`, the official module, parameter for parameter.

The windows follow natten's helpers ``get_window_start`` and ``get_pb_start``
(``src/natten/csrc/cpu/natten_cpu_commons.h``), one axis at a time. On an axis of length ``L``
with odd kernel ``k`` and dilation ``d``, the queries ``i`` with the same ``r = i mod d`` form
a group of ``n_r = ceil((L - r) / d)`` positions, query ``i`` being the ``p = i // d``-th; its
window is the ``k`` members of its group starting at member
``s = clamp(p - k // 2, 0, n_r - k)``, i.e. positions ``r + d * (s + t)``, ``t = 0 .. k-1``
(for ``d = 1``: ``clamp(i - k // 2, 0, L - k)``). The bias of the ``t``-th key is row (or
column) ``s - p + k - 1 + t`` of the ``(2k - 1)``-sided table: ``(j - i) / d + k - 1`` for key
``j``, the relative position at the borders too, where the window is shifted inside the map
rather than cut. natten refuses maps with a side shorter than ``k * d``; the module pads them.
"""
import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .attention import attention, counting_flops
from .fast import fast_paths_enabled

__all__ = [
    'NeighborhoodAttention2D',
    'neighborhood_attention',
    'neighborhood_attention_method',
    'neighborhood_attention_reference',
    'neighborhood_bias_start',
    'neighborhood_indices',
    'neighborhood_window_start',
]

DENSE_TOKENS_PER_KEY = {'cpu': 4, 'other': 16}
"""The fast path runs dense masked attention while the map has at most ``n`` tokens per
neighbour, ``H * W <= n * k * k``, and beyond that the tiled method on the CPU (:data:`TILE`)
and the gather elsewhere. On one CPU core (n = 4: up to 14x14
for ``k = 7``) dense attention is about as fast as the gather at 4 tokens per neighbour, 4x
slower at 16 and over 20x at 87; on an H200 (n = 16: up to 28x28 for ``k = 7``) dense SDPA is
faster up to about 40x40, but its memory grows with ``(H * W) ** 2``
(``benchmarks/neighborhood_attention.py``, ``docs/datpp.md``)."""

METHODS = ('dense', 'neighborhood', 'tiled')

GATHER_CHUNK_ELEMENTS = {'cpu': 1 << 18, 'other': 1 << 25}
"""The gather path takes as many neighbours at a time as fit this many gathered elements: on a
CPU about one (larger chunks leave the caches and run up to 3x slower), on a GPU up to 32M
elements (128 MiB in float32), so that the ``k * k`` neighbours take a few kernel launches."""


def _check_kernel_and_dilation(kernel_size: int, dilation: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be an odd integer >= 1 (natten centres the window on the query), got {kernel_size!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1 (1 is plain neighborhood attention), got {dilation!r}")


def _check_length(length: int, kernel_size: int, dilation: int) -> None:
    if length < kernel_size * dilation:
        raise ValueError(
            f"an axis of length {length} is shorter than kernel_size x dilation = {kernel_size} x {dilation} = "
            f"{kernel_size * dilation}, which natten refuses: pad the map first (NeighborhoodAttention2D does)")


def neighborhood_window_start(index: int, length: int, kernel_size: int, dilation: int = 1) -> int:
    """First key position of the window of query ``index`` on one axis, natten's case by case rule.

    natten 0.14 ``get_window_start``: away from the borders the window starts ``k // 2``
    dilated steps before the query; a window that would cross the start of the axis starts at
    ``index mod d`` (the first position of the query's dilation group); one that would cross the
    end ends at the last position of the group.

    Args:
        index: query position, ``0 <= index < length``.
        length: axis length, at least ``kernel_size * dilation``.
        kernel_size: odd window size ``k``.
        dilation: spacing ``d`` of the keys.

    Returns:
        The position of the window's first key; the others follow ``dilation`` apart.
    """
    _check_kernel_and_dilation(kernel_size, dilation)
    _check_length(length, kernel_size, dilation)
    if not 0 <= index < length:
        raise ValueError(f"index {index} is outside an axis of length {length}")
    reach = (kernel_size // 2) * dilation
    if index - reach < 0:
        return index % dilation
    if index + reach >= length:
        # the last position of the query's group, then k - 1 dilated steps back
        last = index + ((length - 1 - index) // dilation) * dilation
        return last - (kernel_size - 1) * dilation
    return index - reach


def neighborhood_bias_start(index: int, length: int, kernel_size: int, dilation: int = 1) -> int:
    """Row (or column) of the bias table read for the first key of query ``index``'s window.

    natten 0.14 ``get_pb_start``: ``k // 2`` away from the borders, ``k - 1 - index // d``
    where the window is pushed away from the start of the axis, ``(length - index - 1) // d``
    where it is pushed away from the end; the ``t``-th key of the window reads ``start + t``.

    Args:
        index, length, kernel_size, dilation: as in :func:`neighborhood_window_start`.

    Returns:
        Index into the ``2 * kernel_size - 1`` rows (or columns) of the bias table.
    """
    _check_kernel_and_dilation(kernel_size, dilation)
    _check_length(length, kernel_size, dilation)
    if not 0 <= index < length:
        raise ValueError(f"index {index} is outside an axis of length {length}")
    reach = (kernel_size // 2) * dilation
    if index - reach < 0:
        return kernel_size - 1 - index // dilation
    if index + reach >= length:
        return (length - index - 1) // dilation
    return kernel_size // 2


def neighborhood_indices(
        length: int,
        kernel_size: int,
        dilation: int = 1,
        device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key positions and bias rows of every query of one axis, in closed form.

    The group form of the module docstring, for all queries at once; equal to
    :func:`neighborhood_window_start` / :func:`neighborhood_bias_start` (tested on every
    length, kernel and dilation up to 40 / 9 / 4).

    Args:
        length: axis length ``L``, at least ``kernel_size * dilation``.
        kernel_size: odd window size ``k``.
        dilation: spacing ``d`` of the keys.
        device: where to build the tensors.

    Returns:
        ``(keys, bias)``, two ``(L, k)`` long tensors: the position of each query's ``t``-th
        key and the bias-table row it reads.
    """
    _check_kernel_and_dilation(kernel_size, dilation)
    _check_length(length, kernel_size, dilation)
    position = torch.arange(length, device=device)
    group, member = position % dilation, position // dilation
    group_size = (length - group + dilation - 1) // dilation  # n_r
    first = torch.minimum((member - kernel_size // 2).clamp(min=0), group_size - kernel_size)  # s
    step = torch.arange(kernel_size, device=device)
    keys = (group + dilation * first)[:, None] + dilation * step  # (L, k)
    bias = (first - member + kernel_size - 1)[:, None] + step  # (L, k)
    return keys, bias


def _neighborhood_tables(
        size: Tuple[int, int], kernel_size: int, dilation: int, device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat key index and flat bias index of every (query, neighbour) pair of an ``H x W`` map.

    Returns:
        ``(keys, bias)``, two ``(k*k, H*W)`` long tensors, neighbour-major: ``keys[s, n]`` is the
        token ``y * W + x`` of query ``n``'s ``s``-th neighbour (``s = ky * k + kx``, natten's
        order) and ``bias[s, n]`` its entry in the flattened ``(2k-1) x (2k-1)`` table.
    """
    (height, width), k = size, kernel_size
    row_keys, row_bias = neighborhood_indices(height, k, dilation, device)
    col_keys, col_bias = neighborhood_indices(width, k, dilation, device)
    # (H, 1, k, 1) and (1, W, 1, k) -> (H, W, k, k) -> (k*k, H*W)
    keys = row_keys[:, None, :, None] * width + col_keys[None, :, None, :]
    bias = row_bias[:, None, :, None] * (2 * k - 1) + col_bias[None, :, None, :]
    return keys.flatten(2).flatten(0, 1).t().contiguous(), bias.flatten(2).flatten(0, 1).t().contiguous()


def _cached(build):
    """``build`` with its results cached per arguments, except while torch.compile / torch.export trace.

    Cached tables are built outside ``torch.inference_mode``: made inside it, they would be
    inference tensors, which a later training pass could not save for its backward.
    """
    cached = functools.lru_cache(maxsize=64)(build)

    @functools.wraps(build)
    def tables(*args):
        if torch.compiler.is_compiling():
            return build(*args)
        with torch.inference_mode(False):
            return cached(*args)

    return tables


_tables = _cached(_neighborhood_tables)


def _check_inputs(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: int, dilation: int,
) -> None:
    _check_kernel_and_dilation(kernel_size, dilation)
    if q.dim() != 5 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k and v must share one (B, heads, H, W, head_dim) shape (natten's layout), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads, height, width = q.shape[1:4]
    side = 2 * kernel_size - 1
    if rpb is not None and tuple(rpb.shape) != (heads, side, side):
        raise ValueError(
            f"rpb must be (heads, 2k-1, 2k-1) = {(heads, side, side)} for {heads} heads and kernel {kernel_size}, "
            f"got {tuple(rpb.shape)}")
    if height < kernel_size * dilation or width < kernel_size * dilation:
        raise ValueError(
            f"a {height}x{width} map is smaller than kernel_size x dilation = {kernel_size * dilation} per side, "
            "which natten refuses: pad it first (NeighborhoodAttention2D pads to the window and crops back)")


def neighborhood_attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: Optional[torch.Tensor],
        kernel_size: int,
        dilation: int = 1,
) -> torch.Tensor:
    """2D neighborhood attention one query at a time: the oracle of :func:`neighborhood_attention`.

    For each query, reads the window and bias starts from natten's case-by-case rules
    (:func:`neighborhood_window_start`, :func:`neighborhood_bias_start`), gathers the
    ``k x k`` keys and values, and computes ``softmax(q . k + rpb) v`` over them, as natten's
    ``natten2dqkrpb``, a softmax and ``natten2dav`` do. Slow (a Python loop over the map); differentiable.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``, already scaled (natten does not scale;
            the module multiplies by ``head_dim ** -0.5`` first).
        k: keys, same shape.
        v: values, same shape.
        rpb: relative position bias ``(heads, 2k-1, 2k-1)``, or None for none.
        kernel_size: odd window size ``k``.
        dilation: spacing of the keys (dilated NA).

    Returns:
        ``(B, heads, H, W, head_dim)``.
    """
    _check_inputs(q, k, v, rpb, kernel_size, dilation)
    batch, heads, height, width, head_dim = q.shape
    outputs = []
    for y in range(height):
        row_start = neighborhood_window_start(y, height, kernel_size, dilation)
        row_bias = neighborhood_bias_start(y, height, kernel_size, dilation)
        rows = [row_start + t * dilation for t in range(kernel_size)]
        for x in range(width):
            col_start = neighborhood_window_start(x, width, kernel_size, dilation)
            col_bias = neighborhood_bias_start(x, width, kernel_size, dilation)
            cols = [col_start + t * dilation for t in range(kernel_size)]
            keys = k[:, :, rows][:, :, :, cols]  # (B, heads, k, k, d)
            values = v[:, :, rows][:, :, :, cols]  # (B, heads, k, k, d)
            logits = (keys * q[:, :, y, x, None, None, :]).sum(-1)  # (B, heads, k, k)
            if rpb is not None:
                logits = logits + rpb[:, row_bias:row_bias + kernel_size, col_bias:col_bias + kernel_size]
            weights = logits.flatten(2).softmax(-1).view_as(logits)
            outputs.append((weights[..., None] * values).sum((2, 3)))  # (B, heads, d)
    return torch.stack(outputs, 2).view(batch, heads, height, width, head_dim)


def _gather(tensor: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``keys`` ``(c, N)`` of a token-major ``(N, B*heads, d)`` tensor: ``(c, N, B*heads, d)`` in ``dtype``."""
    return tensor.index_select(0, keys.flatten()).view(*keys.shape, *tensor.shape[1:]).to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (sums over ``k*k`` neighbours stay accurate), else the input's."""
    return torch.promote_types(dtype, torch.float32)


def _neighbour_logits(query: torch.Tensor, key: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(N, B*heads, d)`` queries and keys -> ``(k*k, N, B*heads)`` logits, ``chunk`` neighbours at a time."""
    dtype = _accumulation_dtype(query.dtype)
    query = query.to(dtype)
    return torch.cat([torch.linalg.vecdot(query, _gather(key, index, dtype)) for index in keys.split(chunk)])


def _add_weighted(out: torch.Tensor, weight: torch.Tensor, gathered: torch.Tensor) -> None:
    """``out += sum_c weight[c] * gathered[c]`` in place (``addcmul_`` for one neighbour: 4x faster on CPU)."""
    if weight.shape[0] == 1:
        out.addcmul_(weight[0], gathered[0])
    else:
        out += (weight * gathered).sum(0)


def _neighbour_sum(weights: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(k*k, N, B*heads)`` weights and ``(N, B*heads, d)`` values -> ``(N, B*heads, d)`` weighted sums."""
    dtype = _accumulation_dtype(value.dtype)
    weights = weights.to(dtype).unsqueeze(-1)  # (k*k, N, B*heads, 1)
    out = torch.zeros_like(value, dtype=dtype)
    for index, weight in zip(keys.split(chunk), weights.split(chunk)):
        _add_weighted(out, weight, _gather(value, index, dtype))
    return out.to(value.dtype)


class _NeighborhoodLogits(torch.autograd.Function):
    """``q . k`` with each query's ``k*k`` neighbours (natten's ``natten2dqk``), saving only q and k.

    Tensors are token-major, ``(N, B*heads, d)``, so that gathering neighbours and scattering
    their gradients (``index_select`` / ``index_add_`` along dim 0) move whole rows; the logits
    are neighbour-major, ``(k*k, N, B*heads)``. Both are several times faster on CPU than
    gathering along the token dim of ``(B, heads, N, d)`` or stacking the neighbours last.
    Neighbours are taken ``chunk`` at a time (one kernel launch per chunk on a GPU). Sums are
    made in float32 for half-precision inputs; the logits come out in that precision.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
        # query, key: (N, B*heads, d); keys: (k*k, N), the token of each neighbour
        ctx.save_for_backward(query, key, keys)
        ctx.chunk = chunk
        return _neighbour_logits(query, key, keys, chunk)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits: torch.Tensor):
        query, key, keys = ctx.saved_tensors
        dtype = _accumulation_dtype(query.dtype)
        grad_logits = grad_logits.to(dtype).contiguous().unsqueeze(-1)  # (k*k, N, B*heads, 1)
        grad_query = torch.zeros_like(query, dtype=dtype) if ctx.needs_input_grad[0] else None
        grad_key = torch.zeros_like(key, dtype=dtype) if ctx.needs_input_grad[1] else None
        query_acc = query.to(dtype)
        for index, grad in zip(keys.split(ctx.chunk), grad_logits.split(ctx.chunk)):
            if grad_query is not None:
                _add_weighted(grad_query, grad, _gather(key, index, dtype))
            if grad_key is not None:
                grad_key.index_add_(0, index.flatten(), (grad * query_acc).flatten(0, 1))
        return (None if grad_query is None else grad_query.to(query.dtype),
                None if grad_key is None else grad_key.to(key.dtype), None, None)


class _NeighborhoodWeightedSum(torch.autograd.Function):
    """``sum_s a_s v_s`` over each query's ``k*k`` neighbours (natten's ``natten2dav``), saving a and v.

    Layouts, chunks and precision as in :class:`_NeighborhoodLogits`: weights
    ``(k*k, N, B*heads)``, values and output ``(N, B*heads, d)``; the output has the values' dtype.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
        weights = weights.to(_accumulation_dtype(value.dtype)).contiguous()
        ctx.save_for_backward(weights, value, keys)
        ctx.chunk = chunk
        return _neighbour_sum(weights, value, keys, chunk)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        weights, value, keys = ctx.saved_tensors
        dtype = weights.dtype
        grad_out = grad_out.to(dtype).contiguous()
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[0] else None  # (k*k, N, B*heads)
        grad_value = torch.zeros_like(value, dtype=dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, keys.shape[0], ctx.chunk):
            index = keys[start:start + ctx.chunk]
            if grad_weights is not None:
                torch.linalg.vecdot(grad_out, _gather(value, index, dtype), out=grad_weights[start:start + ctx.chunk])
            if grad_value is not None:
                weight = weights[start:start + ctx.chunk].unsqueeze(-1)  # (c, N, B*heads, 1)
                grad_value.index_add_(0, index.flatten(), (weight * grad_out).flatten(0, 1))
        return grad_weights, None if grad_value is None else grad_value.to(value.dtype), None, None


def _gathered_attention(q, k, v, rpb, kernel_size, dilation, dropout_p):
    """Neighbour-gather path: ``(B, heads, H, W, d)`` in and out, memory linear in ``H * W``."""
    batch, heads, height, width, head_dim = q.shape
    neighbours, tokens = kernel_size ** 2, height * width
    budget = GATHER_CHUNK_ELEMENTS['cpu' if q.device.type == 'cpu' else 'other']
    # a symbolic batch (torch.export with a dynamic batch axis) sizes the chunks per sample, so that the
    # graph does not depend on the batch size
    samples = batch if isinstance(batch, int) else 1
    chunk = min(max(budget // (tokens * samples * heads * head_dim), 1), neighbours)
    keys, bias = _tables((height, width), kernel_size, dilation, q.device)  # (k*k, N) each
    # (B, heads, H, W, d) -> (H, W, B, heads, d) -> (N, B*heads, d)
    q, k, v = (t.permute(2, 3, 0, 1, 4).reshape(tokens, batch * heads, head_dim).contiguous() for t in (q, k, v))
    # the hand-written backward where gradients are wanted, the same forward as plain ops where
    # not (inference, tracing and export)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rpb))
    logits_fn = _NeighborhoodLogits.apply if grad else _neighbour_logits
    sum_fn = _NeighborhoodWeightedSum.apply if grad else _neighbour_sum
    logits = logits_fn(q, k, keys, chunk)  # (k*k, N, B*heads)
    if rpb is not None:
        table = rpb.to(logits.dtype).flatten(1).t().contiguous()  # (heads, 2k-1, 2k-1) -> ((2k-1)**2, heads)
        table = table.index_select(0, bias.flatten()).view(neighbours, tokens, heads)  # (k*k, N, heads)
        logits = (logits.view(neighbours, tokens, batch, heads) + table[:, :, None]).view(neighbours, tokens, -1)
    weights = logits.softmax(0)
    if dropout_p > 0.:
        weights = F.dropout(weights, p=dropout_p)
    out = sum_fn(weights, v, keys, chunk)  # (N, B*heads, d)
    # (N, B*heads, d) -> (H, W, B, heads, d) -> (B, heads, H, W, d)
    return out.view(height, width, batch, heads, head_dim).permute(2, 3, 0, 1, 4)


def _dense_attention(q, k, v, rpb, kernel_size, dilation, dropout_p):
    """Dense masked path: one SDPA call over all ``H * W`` tokens, memory quadratic in ``H * W``."""
    batch, heads, height, width, head_dim = q.shape
    tokens = height * width
    keys, bias = _tables((height, width), kernel_size, dilation, q.device)  # (k*k, N) each
    if rpb is None:
        mask = torch.zeros(tokens, tokens, dtype=torch.bool, device=q.device).scatter_(1, keys.t(), True)
    else:
        # scattering the (heads, N, k*k) biases (not gathering an (N, N) index) keeps the
        # gradient of rpb a sum over N * k*k entries instead of N * N
        values = rpb.to(q.dtype).flatten(1)[:, bias.t()]  # (heads, N, k*k)
        outside = q.new_full((heads, tokens, tokens), float('-inf'))
        mask = outside.scatter(2, keys.t().expand(heads, -1, -1), values)  # (heads, N, N)
    # (B, heads, H, W, d) -> (B, heads, N, d)
    q, k, v = (t.reshape(batch, heads, tokens, head_dim) for t in (q, k, v))
    # eager: a 4-D mask, with which the CPU kernel runs fused (with a 3-D one it takes its unfused
    # path, 4x slower at 196 tokens); traced: the 3-D mask, whose ONNX decomposition is sound
    out = attention(q, k, v, mask if torch.compiler.is_compiling() else mask[None], dropout_p, scale=1.0)
    return out.view(batch, heads, height, width, head_dim)


TILE = {'infer': 14, 'train': 7}
"""Query tile side of the ``'tiled'`` method, without and with gradients. A ``T x T`` tile of
queries with ``k = 7`` reads one ``(T + 6) x (T + 6)`` region of keys: 8x the products the
neighbourhoods need at ``T = 14``, 3.4x at ``T = 7``, in matrix products instead of gathers. On
2 CPU threads, DAT-T++'s stage-1 map (56x56, batch 16) takes 93 ms at T = 14 against 173 ms
gathered without gradients, and 395 ms at T = 7 against 605 ms with them, where the smaller tile
also keeps 2.4x fewer weights for backward (``benchmarks/neighborhood_attention.py``,
``docs/datpp.md``, "Which path runs when")."""


def _axis_tiles(length: int, kernel_size: int, dilation: int, tile: int, device: torch.device):
    """One axis of the tiled method: region starts, region length and local key/bias indices.

    Returns:
        ``(starts, region, local, bias)``: ``starts`` ``(n,)`` first key of each tile's region,
        ``region`` the common region length ``R``, ``local`` ``(n * tile, k)`` the position of each
        (padded) query's keys inside its tile's region, ``bias`` ``(n * tile, k)`` their bias rows;
        padded queries (beyond ``length``) repeat the last query's entries.
    """
    keys, bias = neighborhood_indices(length, kernel_size, dilation, device)  # (L, k)
    n = -(-length // tile)
    padded = torch.arange(n * tile, device=device).clamp(max=length - 1)
    keys, bias = keys[padded].view(n, tile, kernel_size), bias[padded].view(n, tile, kernel_size)
    first, last = keys.amin((1, 2)), keys.amax((1, 2))
    region = int((last - first).max()) + 1
    starts = torch.minimum(first, torch.full_like(first, length - region))
    local = (keys - starts[:, None, None]).view(n * tile, kernel_size)
    return starts, region, local, bias.view(n * tile, kernel_size)


def _tile_tables(size: Tuple[int, int], kernel_size: int, dilation: int, tile: int, device: torch.device):
    """Everything the tiled method needs for an ``H x W`` map (cached as :func:`_tiled_tables`).

    Returns:
        ``(rows, cols, region, slots, bias)``: ``rows`` ``(nY * R,)`` and ``cols`` ``(nX * R,)``
        the map rows / columns of every tile's key region, ``region`` ``(R_y, R_x)``, ``slots``
        ``(nY * nX, T*T, k*k)`` each query's neighbours as indices into its region's ``R_y * R_x``
        keys, ``bias`` the same shape, indices into the flattened ``(2k-1)^2`` bias table.
    """
    (height, width), k = size, kernel_size
    row_starts, row_region, row_local, row_bias = _axis_tiles(height, k, dilation, tile, device)
    col_starts, col_region, col_local, col_bias = _axis_tiles(width, k, dilation, tile, device)
    n_rows, n_cols = row_starts.numel(), col_starts.numel()
    rows = (row_starts[:, None] + torch.arange(row_region, device=device)).flatten()
    cols = (col_starts[:, None] + torch.arange(col_region, device=device)).flatten()
    # (nY, T, 1, 1, k, 1) and (1, 1, nX, T, 1, k) -> (nY, T, nX, T, k, k) -> (nY*nX, T*T, k*k)
    slots = (row_local.view(n_rows, tile, 1, 1, k, 1) * col_region + col_local.view(1, 1, n_cols, tile, 1, k))
    table = (row_bias.view(n_rows, tile, 1, 1, k, 1) * (2 * k - 1) + col_bias.view(1, 1, n_cols, tile, 1, k))

    def by_tile(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 1, 3, 4, 5).reshape(n_rows * n_cols, tile * tile, k * k)

    return rows, cols, (row_region, col_region), by_tile(slots), by_tile(table)


_tiled_tables = _cached(_tile_tables)


def _tiled_attention(q, k, v, rpb, kernel_size, dilation, dropout_p, tile=None):
    """Tiled path: each ``T x T`` tile of queries attends to the one key region that holds all its
    neighbourhoods, other keys masked; ``(B, heads, H, W, d)`` in and out.

    A region is the smallest run of rows (and of columns) holding the tile's windows,
    ``T + k - 1`` for dilation 1. The masked logits are exactly ``-inf`` and weigh nothing, so
    the result is the neighbourhood attention of every query; padded queries of a last, partial
    tile attend to their region unmasked and are cropped.
    """
    if tile is None:
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rpb))
        tile = TILE['train' if grad else 'infer']
    batch, heads, height, width, head_dim = q.shape
    rows, cols, (region_h, region_w), slots, table = _tiled_tables(
        (height, width), kernel_size, dilation, tile, q.device)
    n_rows, n_cols = rows.numel() // region_h, cols.numel() // region_w
    tiles = n_rows * n_cols
    # queries: (B, heads, H, W, d) -> padded (B, heads, nY*T, nX*T, d) -> (B, tiles*heads, T*T, d)
    pad_h, pad_w = n_rows * tile - height, n_cols * tile - width
    queries = F.pad(q, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else q
    queries = queries.reshape(batch, heads, n_rows, tile, n_cols, tile, head_dim).permute(0, 2, 4, 1, 3, 5, 6)
    queries = queries.reshape(batch, tiles * heads, tile * tile, head_dim)

    def regions(t: torch.Tensor) -> torch.Tensor:
        # (B, heads, H, W, d) -> (B, heads, nY*Ry, nX*Rx, d) -> (B, tiles*heads, Ry*Rx, d)
        t = t.index_select(2, rows).index_select(3, cols)
        t = t.view(batch, heads, n_rows, region_h, n_cols, region_w, head_dim).permute(0, 2, 4, 1, 3, 5, 6)
        return t.reshape(batch, tiles * heads, region_h * region_w, head_dim)

    # (heads, tiles, T*T, Ry*Rx): -inf outside each query's window, the bias inside
    values = q.new_zeros(()).expand(heads, tiles, tile * tile, kernel_size ** 2) if rpb is None else \
        rpb.to(q.dtype).flatten(1)[:, table]
    mask = q.new_full((heads, tiles, tile * tile, region_h * region_w), float('-inf'))
    mask = mask.scatter(3, slots.expand(heads, -1, -1, -1), values)
    if pad_h or pad_w:  # padded queries: no window, attend to the whole region (cropped below)
        padded = torch.zeros(n_rows * tile, n_cols * tile, dtype=torch.bool, device=q.device)
        padded[height:] = True
        padded[:, width:] = True
        padded = padded.view(n_rows, tile, n_cols, tile).permute(0, 2, 1, 3).reshape(tiles, tile * tile)
        mask = mask.masked_fill(padded[None, :, :, None], 0.)
    mask = mask.transpose(0, 1).reshape(1, tiles * heads, tile * tile, region_h * region_w)
    out = attention(queries, regions(k), regions(v), mask, dropout_p, scale=1.0)
    # (B, tiles*heads, T*T, d) -> (B, heads, nY*T, nX*T, d) -> crop
    out = out.view(batch, n_rows, n_cols, heads, tile, tile, head_dim).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.reshape(batch, heads, n_rows * tile, n_cols * tile, head_dim)
    return out[:, :, :height, :width] if pad_h or pad_w else out


def neighborhood_attention_method(size: Tuple[int, int], kernel_size: int, device: torch.device) -> str:
    """The method :func:`neighborhood_attention` picks for an ``(H, W)`` map: ``'dense'`` on small maps,
    beyond them ``'tiled'`` on the CPU and ``'neighborhood'`` elsewhere (the tiled method is untimed on GPUs) and
    while torch.compile or torch.export trace."""
    per_neighbour = DENSE_TOKENS_PER_KEY['cpu' if device.type == 'cpu' else 'other']
    if size[0] * size[1] <= per_neighbour * kernel_size ** 2:
        return 'dense'
    # the tiled method sizes its key regions from index tables, which tracing cannot do symbolically
    tiled = device.type == 'cpu' and fast_paths_enabled() and not torch.compiler.is_compiling()
    return 'tiled' if tiled else 'neighborhood'


def neighborhood_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: Optional[torch.Tensor],
        kernel_size: int,
        dilation: int = 1,
        dropout_p: float = 0.,
        method: Optional[str] = None,
) -> torch.Tensor:
    """2D neighborhood attention, ``softmax(q . k + rpb) v`` over each query's natten window.

    Equal to :func:`neighborhood_attention_reference` (and to natten 0.14's ``natten2dqkrpb``,
    softmax, ``natten2dav``) up to float rounding, values and gradients. Three methods:

    * ``'dense'``: :func:`torch.nn.functional.scaled_dot_product_attention` over all tokens
      with an additive ``(heads, N, N)`` bias, ``-inf`` outside the windows; memory
      quadratic in ``N = H * W``, fastest on small maps.
    * ``'neighborhood'``: gathers the ``k*k`` neighbours of every query a few neighbours at a
      time, with hand-written gradients that keep only q, k, v and the ``(k*k, N, B*heads)``
      weights; memory linear in ``N`` (large maps, e.g. a detector's 200x320 stage 1).
    * ``'tiled'``: each ``T x T`` tile of queries attends densely to the one key region holding
      all its windows, ``-inf`` elsewhere (:data:`TILE`); matrix products instead of gathers,
      memory linear in ``N`` with a larger constant than the gather's.

    All sum in float32 for bfloat16 / float16 inputs and return the inputs' dtype.

    Args:
        q: queries ``(B, heads, H, W, head_dim)``, already scaled.
        k: keys, same shape.
        v: values, same shape.
        rpb: relative position bias ``(heads, 2k-1, 2k-1)``, or None.
        kernel_size: odd window size ``k``.
        dilation: spacing of the keys (dilated NA).
        dropout_p: dropout on the attention weights (pass 0 in evaluation).
        method: ``'dense'``, ``'neighborhood'``, ``'tiled'`` or None for
            :func:`neighborhood_attention_method`'s choice (dense on small maps, see
            :data:`DENSE_TOKENS_PER_KEY`, tiled beyond them on the CPU).

    Returns:
        ``(B, heads, H, W, head_dim)``.
    """
    _check_inputs(q, k, v, rpb, kernel_size, dilation)
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or None (choose by map size), got {method!r}")
    if counting_flops():
        return _counted_attention(q, k, v, rpb, kernel_size, dilation)
    if method is None:
        method = neighborhood_attention_method(q.shape[2:4], kernel_size, q.device)
    if method == 'dense':
        return _dense_attention(q, k, v, rpb, kernel_size, dilation, dropout_p)
    if method == 'tiled':
        return _tiled_attention(q, k, v, rpb, kernel_size, dilation, dropout_p)
    return _gathered_attention(q, k, v, rpb, kernel_size, dilation, dropout_p)


def _counted_attention(q, k, v, rpb, kernel_size, dilation):
    """The attention as two batched matrix products over each query's ``k*k`` gathered neighbours, the form
    a FLOP counter counts as what neighborhood attention computes: ``H W k^2 d`` MACs per head for ``q . k``
    and as many for the weighted sum of ``v`` (the dense path would count ``(H W)^2 d``, the gather path
    nothing). Same values as the other paths; used only while counting."""
    batch, heads, height, width, head_dim = q.shape
    keys, bias = _tables((height, width), kernel_size, dilation, q.device)  # (k*k, N) each
    flat = [t.reshape(batch, heads, height * width, head_dim) for t in (q, k, v)]
    neighbour_keys, neighbour_values = (t[:, :, keys.t()] for t in flat[1:])  # (B, heads, N, k*k, d)
    logits = (flat[0].unsqueeze(-2) @ neighbour_keys.transpose(-1, -2)).squeeze(-2)  # (B, heads, N, k*k)
    if rpb is not None:
        logits = logits + rpb.flatten(1)[:, bias.t()].to(logits.dtype)  # (heads, N, k*k)
    out = (logits.softmax(-1).unsqueeze(-2) @ neighbour_values).squeeze(-2)  # (B, heads, N, d)
    return out.view(batch, heads, height, width, head_dim)


class NeighborhoodAttention2D(nn.Module):
    """The neighborhood attention block of DAT++ (the ``'N'`` blocks), as in the official code.

    Reproduces LeapLabTHU/DAT ``models/nat.py`` (natten 0.14's module as adapted by DAT++):
    same arguments in the same order, same parameters (``qkv``, ``rpb``, ``proj``), so official
    state dicts load by key. Input and output are channels-first ``(B, C, H, W)`` like the
    official module's (which returns ``(x, None, None)``; this one returns ``x``). Queries are
    scaled by ``head_dim ** -0.5`` before ``q . k``; attention dropout acts on the
    ``k*k`` weights.

    A map with a side shorter than the window ``k * dilation`` is zero-padded at the bottom and
    right up to the window *before* the qkv projection, so the padded tokens carry the qkv
    bias and take part as keys and values of the real queries near them, then the output is
    cropped back, as in the official module.

    Args:
        dim: channels ``C``, a multiple of ``num_heads``.
        kernel_size: odd window size ``k`` (natten's CUDA kernels take 3 to 13; any odd size works here).
        num_heads: attention heads.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        dilation: key spacing; None means 1, ``'adaptive'`` picks ``max(min(H, W) // k, 1)``
            per input (the official module does that for any string).
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            num_heads: int,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            dilation: Optional[Union[int, str]] = None,
    ):
        super().__init__()
        _check_kernel_and_dilation(kernel_size, 1)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be a positive multiple of num_heads {num_heads}")
        if isinstance(dilation, str):
            if dilation != 'adaptive':
                raise ValueError(f"dilation must be None, an integer >= 1 or 'adaptive', got {dilation!r}")
        else:
            dilation = 1 if dilation is None else dilation
            _check_kernel_and_dilation(kernel_size, dilation)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.qkv = nn.Linear(dim, dim * 3)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=.02)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def dilation_for(self, size: Tuple[int, int]) -> int:
        """The dilation used on an ``(H, W)`` map (fixed, or ``'adaptive'``'s choice)."""
        if self.dilation == 'adaptive':
            return max(min(size) // self.kernel_size, 1)
        return self.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        dilation = self.dilation_for((h, w))
        window = self.kernel_size * dilation
        x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        pad_h, pad_w = max(window - h, 0), max(window - w, 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zeros at the bottom / right, before the projection
        hp, wp = h + pad_h, w + pad_w
        # (B, Hp, Wp, 3C) -> (B, Hp, Wp, 3, heads, d) -> 3 x (B, heads, Hp, Wp, d)
        q, k, v = self.qkv(x).reshape(b, hp, wp, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        dropout_p = self.attn_drop.p if self.training else 0.
        out = neighborhood_attention(q * self.scale, k, v, self.rpb, self.kernel_size, dilation, dropout_p)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, hp, wp, c)  # (B, heads, Hp, Wp, d) -> (B, Hp, Wp, C)
        if pad_h or pad_w:
            out = out[:, :h, :w]
        out = self.proj_drop(self.proj(out))
        return out.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def extra_repr(self) -> str:
        return f'kernel_size={self.kernel_size}, num_heads={self.num_heads}, dilation={self.dilation}'
