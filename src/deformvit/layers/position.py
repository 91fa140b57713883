"""Relative position biases.

* Window attention: the Swin table ``B_hat`` of size ``(2Wh-1)(2Ww-1) x heads`` indexed by
  integer displacements inside a window (Swin Transformer Sec. 3.2, used by DAT's local and
  shift-window blocks).
* Deformable attention: the same kind of table, one ``(2H-1) x (2W-1)`` plane per head,
  *interpolated* at the continuous displacements between queries and deformed keys,
  ``phi(B_hat; R)`` of DAT Eq. (9).
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from .fast import fast_paths_enabled
from .sampling import bilinear_grid_sample

__all__ = [
    'deformable_relative_position_bias',
    'relative_position_index',
    'resize_fixed_position_bias',
    'resize_relative_position_table',
]


def relative_position_index(window_size: Tuple[int, int]) -> torch.Tensor:
    """Index into a ``(2Wh-1)(2Ww-1)`` table for every (query, key) pair of a window.

    Returns:
        ``(Wh*Ww, Wh*Ww)`` long tensor.
    """
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2) as (dy, dx)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def deformable_relative_position_bias(
        table: torch.Tensor,
        query_points: torch.Tensor,
        key_points: torch.Tensor,
        n_groups: int,
) -> torch.Tensor:
    """Deformable relative position bias ``phi(B_hat; R)`` of DAT Eq. (9).

    The displacement ``R`` between a query and a deformed key is taken in normalised
    coordinates, halved so that it lies in ``[-1, 1]``, and the per-head table is sampled
    there bilinearly. Because displacements are normalised, a table built for one feature
    map size serves any other: it is read as a continuous function of the displacement.

    Args:
        table: ``(heads, Th, Tw)`` bias table.
        query_points: ``(Nq, 2)`` query positions ``(y, x)`` in ``[-1, 1]``, shared by every map, or
            ``(B * n_groups, Nq, 2)``, one set per map (queries that move, as in EAPT's whole-window
            deformation).
        key_points: ``(B * n_groups, Nk, 2)`` deformed key positions ``(y, x)``.
        n_groups: offset groups ``G``; heads ``heads / G * g ... `` share group ``g``'s keys.

    Returns:
        ``(B, heads, Nq, Nk)`` bias in ``table.dtype``. Pass float32 points: the displacements
        are then exact, and a float16 / bfloat16 table is read in float32 on the CPU
        (:func:`deformvit.layers.bilinear_grid_sample`).
    """
    if _lean_bias(table, query_points, key_points):
        return _DeformableBias.apply(table, query_points, key_points, n_groups)
    return _bias(table, query_points, key_points, n_groups)


def _bias(table: torch.Tensor, query_points: torch.Tensor, key_points: torch.Tensor, n_groups: int) -> torch.Tensor:
    """The bias of :func:`deformable_relative_position_bias` as plain operators (autograd keeps the displacements)."""
    batch, nk = key_points.shape[0] // n_groups, key_points.shape[1]
    bias = bilinear_grid_sample(_per_group(table, n_groups, batch), _displacement(query_points, key_points),
                                align_corners=True)
    return bias.reshape(batch, table.shape[0], bias.shape[-2], nk)  # (B*G, h/G, Nq, Nk) -> (B, heads, Nq, Nk)


def _displacement(query_points: torch.Tensor, key_points: torch.Tensor) -> torch.Tensor:
    """Half the query-key displacements, ``(B*G, Nq, Nk, 2)`` in grid_sample's ``(x, y)`` order."""
    queries = query_points if query_points.dim() == 3 else query_points[None]
    # (1 or B*G, Nq, 2) - (B*G, Nk, 2) -> (B*G, Nq, Nk, 2)
    return (queries.flip(-1)[:, :, None, :] - key_points.flip(-1)[:, None, :, :]).mul_(0.5)


def _per_group(table: torch.Tensor, n_groups: int, batch: int) -> torch.Tensor:
    """``(heads, Th, Tw)`` -> ``(B*G, heads/G, Th, Tw)``: each map's group reads its heads' planes."""
    heads, th, tw = table.shape
    per_group = table.reshape(n_groups, heads // n_groups, th, tw)
    return per_group.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(batch * n_groups, heads // n_groups, th, tw)


def _lean_bias(table: torch.Tensor, query_points: torch.Tensor, key_points: torch.Tensor) -> bool:
    """Whether :class:`_DeformableBias` computes the bias: gradients wanted, float32 / float64 throughout."""
    tensors = (table, query_points, key_points)
    return (fast_paths_enabled() and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting()
            and all(t.dtype == table.dtype for t in tensors) and table.dtype in (torch.float32, torch.float64))


class _DeformableBias(torch.autograd.Function):
    """:func:`deformable_relative_position_bias` with a backward that recomputes the displacements.

    The composite form keeps the ``(B*G, Nq, Nk, 2)`` displacements for ``grid_sample``'s
    backward: half as large as the attention weights themselves. This form keeps only the table
    and the points and rebuilds the displacements in backward (one subtraction); values and
    gradients are those of the composite form (tests/test_fast_paths.py).
    """

    @staticmethod
    def forward(ctx, table, query_points, key_points, n_groups):
        ctx.save_for_backward(table, query_points, key_points)
        ctx.n_groups = n_groups
        return _bias(table, query_points, key_points, n_groups)

    @staticmethod
    def backward(ctx, grad_bias):
        table, query_points, key_points = ctx.saved_tensors
        need_table, need_queries, need_keys, _ = ctx.needs_input_grad
        n_groups = ctx.n_groups
        batch, nk = key_points.shape[0] // n_groups, key_points.shape[1]
        per_group = _per_group(table, n_groups, batch)
        displacement = _displacement(query_points, key_points)
        grad_bias = grad_bias.reshape(batch * n_groups, -1, grad_bias.shape[-2], nk)
        # interpolation 0: bilinear, padding 0: zeros
        grad_table, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_bias, per_group, displacement, 0, 0, True, [need_table, need_queries or need_keys])
        del displacement
        if need_table:
            grad_table = grad_table.view(batch, *table.shape).sum(0)  # (B*G, h/G, Th, Tw) -> (heads, Th, Tw)
        grad_queries = grad_keys = None
        if need_queries or need_keys:
            grad_grid = grad_grid.flip(-1).mul_(0.5)  # back to (y, x), through the halving
            if need_keys:
                grad_keys = -grad_grid.sum(1)  # (B*G, Nk, 2)
            if need_queries:
                grad_queries = grad_grid.sum(2)  # (B*G, Nq, 2)
                if query_points.dim() == 2:  # (Nq, 2), shared by every map
                    grad_queries = grad_queries.sum(0)
                elif query_points.shape[0] != grad_queries.shape[0]:  # (1, Nq, 2)
                    grad_queries = grad_queries.sum(0, keepdim=True)
        return grad_table if need_table else None, grad_queries, grad_keys, None


def resize_relative_position_table(table: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a relative position table to ``size`` (its spatial extent).

    Accepts the Swin layout ``((2Wh-1)(2Ww-1), heads)`` (square source assumed) and the
    deformable layout ``(heads, Th, Tw)``; returns the same layout at the new size.
    """
    if table.ndim == 2:
        n, heads = table.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f'relative position table of {n} rows is not square; cannot resize it')
        if (side, side) == tuple(size):
            return table
        planes = table.t().reshape(1, heads, side, side)
        planes = F.interpolate(planes.float(), size=size, mode='bicubic', align_corners=False)
        return planes.reshape(heads, -1).t().to(table.dtype)
    if tuple(table.shape[1:]) == tuple(size):
        return table
    planes = F.interpolate(table[None].float(), size=size, mode='bicubic', align_corners=False)
    return planes[0].to(table.dtype)


def resize_fixed_position_bias(
        table: torch.Tensor,
        table_query_size: Tuple[int, int],
        table_key_size: Tuple[int, int],
        query_size: Tuple[int, int],
        key_size: Tuple[int, int],
) -> torch.Tensor:
    """Resample a fixed (query x key) bias table to other grid sizes (bilinear, separably).

    Args:
        table: ``(heads, Hq0*Wq0, Hk0*Wk0)``.

    Returns:
        ``(heads, Hq*Wq, Hk*Wk)``.
    """
    heads = table.shape[0]
    (hq0, wq0), (hk0, wk0) = table_query_size, table_key_size
    (hq, wq), (hk, wk) = query_size, key_size
    t = table.reshape(heads * hq0 * wq0, 1, hk0, wk0)
    if (hk0, wk0) != (hk, wk):
        t = F.interpolate(t, size=(hk, wk), mode='bilinear', align_corners=False)
    # (heads, Nq0, Nk) -> (heads * Nk, 1, Hq0, Wq0)
    t = t.reshape(heads, hq0 * wq0, hk * wk).transpose(1, 2).reshape(heads * hk * wk, 1, hq0, wq0)
    if (hq0, wq0) != (hq, wq):
        t = F.interpolate(t, size=(hq, wq), mode='bilinear', align_corners=False)
    return t.reshape(heads, hk * wk, hq * wq).transpose(1, 2)
