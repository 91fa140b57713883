"""DAT: Vision Transformer with Deformable Attention.

Xia, Pan, Song, Li and Huang, CVPR 2022. Paper sections implemented here:

* Sec. 3.2, Eq. (6)-(9): deformable multi-head attention (:class:`DeformableAttention`) with
  its offset network, offset groups, offset range factor and deformable relative position
  bias.
* Sec. 3.3, Fig. 3, Table 1: the four-stage pyramid of local / shift-window / deformable
  blocks (:class:`DAT`) and the ``dat_tiny``, ``dat_small``, ``dat_base`` configurations.
* Sec. 4.4, Table 6-7, Fig. 4 and Appendix A, Table 8: every ablation is a constructor
  argument; ``docs/dat.md`` maps each table row to arguments.

Feature maps are channels-last ``(B, H, W, C)`` inside the network; ``features_only`` and
:meth:`DAT.forward_intermediates` return ``(B, C, H, W)``. Any input of at least
``patch_size * 2 ** 3`` pixels per side works: maps are padded to the patch, window and
downsampling grids and cropped back, and reference grids, shift masks and position biases are
built for the actual size. Sampling positions are float32 in every precision; a model cast to
bfloat16 or float16 runs on the CPU too, its bilinear reads made in float32
(:func:`deformvit.layers.bilinear_grid_sample`).

Checkpoints of the official release (``{'model': state_dict}``) load through
:func:`checkpoint_filter_fn`, which renames keys, drops derived buffers and resizes position
tables; :func:`infer_dat_variant` names the released model a state dict belongs to.
"""
import contextlib
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from ..checkpoint import unwrap_state_dict
from ..layers import (
    PreNormBlock,
    attention,
    attention_weights,
    bilinear_grid_sample,
    deformable_relative_position_bias,
    fast_paths_enabled,
    pad_to_multiple,
    reference_points,
    relative_position_index,
    resize_fixed_position_bias,
    resize_relative_position_table,
    sample_bilinear,
    window_region_mask,
)
from ._pyramid import PyramidBackbone, build_pyramid, official_source, per_stage, pyramid_cfg

__all__ = ['DAT', 'infer_dat_variant']

BLOCK_TYPES = {
    'L': 'local window attention (Swin W-MSA)',
    'S': 'shift-window attention (Swin SW-MSA)',
    'D': 'deformable attention (DAT Sec. 3.2)',
    'P': 'spatial-reduction attention (PVT SRA, DAT Table 6 row P)',
    'M': 'Deformable-DETR attention with K keys per query (DAT Appendix A, Table 8)',
}
POSITION_BIASES = ('none', 'relative', 'fixed', 'dwconv')


def _conv_out(size: int, kernel: int, stride: int) -> int:
    """Output length of a convolution with ``padding = kernel // 2``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


class Stem(nn.Module):
    """Patch embedding: ``k x k`` convolution with stride ``s`` and LayerNorm (DAT Fig. 3).

    The paper's stem is a non-overlapping 4x4 / stride 4 convolution; ``overlapping=True``
    gives the 7x7 / stride 4 convolutional patch embedding of Appendix B (DAT-T*).
    Inputs are padded at the bottom/right to a multiple of the stride.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, overlapping: bool = False):
        super().__init__()
        self.patch_size = patch_size
        if overlapping:
            self.conv = nn.Conv2d(in_chans, dim, 2 * patch_size - 1, patch_size, patch_size - 1)
        else:
            self.conv = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.patch_size, -w % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.conv(x).permute(0, 2, 3, 1)  # (B, C, H/4, W/4) -> (B, H/4, W/4, C)
        return self.norm(x)


class Downsample(nn.Module):
    """2x2 / stride-2 convolution without bias, then LayerNorm (DAT Sec. 3.3).

    ``overlapping=True`` uses the 3x3 / stride-2 convolution of Appendix B. Odd sizes are
    padded at the bottom/right.

    The 2x2 / stride-2 convolution is a linear layer over each 2x2 patch's ``4C`` values, and
    runs as one (``as_linear``, default True): the channels-last map is regrouped by patch and
    multiplied by the convolution's weight laid out as ``(C', 2 * 2 * C)``. The parameter stays
    the convolution's (the release's checkpoint layout); the result is the convolution's up to
    float rounding, and its backward avoids the CPU convolution's slow weight gradient.
    """

    as_linear = True

    def __init__(self, dim_in: int, dim_out: int, overlapping: bool = False):
        super().__init__()
        if overlapping:
            self.conv = nn.Conv2d(dim_in, dim_out, 3, 2, 1, bias=False)
        else:
            self.conv = nn.Conv2d(dim_in, dim_out, 2, 2, bias=False)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))  # (B, H, W, C): pad W then H at the end
        linear = self.as_linear and fast_paths_enabled() and self.conv.kernel_size == (2, 2)
        if linear and not self.conv._forward_hooks:
            b, hp, wp, c = x.shape
            # (B, H, W, C) -> (B, H/2, W/2, 2, 2, C) -> (B, H/2, W/2, 4C), patch values in (dy, dx, c) order
            patches = x.reshape(b, hp // 2, 2, wp // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
            patches = patches.reshape(b, hp // 2, wp // 2, 4 * c)
            weight = self.conv.weight.permute(0, 2, 3, 1).reshape(self.conv.out_channels, 4 * c)  # (C', dy, dx, c)
            return self.norm(F.linear(patches, weight))
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H/2, W/2, C')
        return self.norm(x)


class WindowAttention(nn.Module):
    """Local (W-MSA) or shift-window (SW-MSA) attention with relative position bias.

    The blocks ``L`` and ``S`` of DAT Table 1 (from Swin Transformer Sec. 3.2). Maps that are
    not a multiple of the window are padded and the padding is masked out; the shift is
    ``ceil(window / 2)``, as in the DAT release.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side (or ``(Wh, Ww)``).
        shift: cyclically shift the map by half a window before partitioning.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: Union[int, Tuple[int, int]] = 7,
            shift: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = to_2tuple(window_size)
        self.shift_size = tuple(math.ceil(w / 2) for w in self.window_size) if shift else (0, 0)
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer('relative_position_index', relative_position_index(self.window_size), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def _relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        return bias.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = pad_to_multiple(x, self.window_size)
        hp, wp = x.shape[1:3]
        if self.shift_size != (0, 0):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        (wh, ww), heads = self.window_size, self.num_heads
        rows, cols = hp // wh, wp // ww
        num_windows, n = rows * cols, wh * ww
        # one copy partitions windows and splits heads:
        # (B, Hp, Wp, 3C) -> (B, rows, Wh, cols, Ww, 3, heads, d) -> 3 x (B, nW*heads, N, d)
        qkv = self.qkv(x).view(b, rows, wh, cols, ww, 3, heads, self.head_dim)
        q, k, v = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b, num_windows * heads, n, self.head_dim)
        bias = self._relative_position_bias()  # (heads, N, N)
        mask = window_region_mask((hp, wp), (h, w), self.window_size, self.shift_size, x.device)
        if mask is None:
            bias = bias.repeat(num_windows, 1, 1)  # (nW*heads, N, N)
        else:
            bias = (mask.to(bias.dtype)[:, None] + bias[None]).reshape(num_windows * heads, n, n)
        out = attention(q, k, v, bias[None], self.attn_drop if self.training else 0., self.fused_attn)
        # (B, rows, cols, heads, Wh, Ww, d) -> (B, rows, Wh, cols, Ww, heads, d) -> (B, Hp, Wp, C)
        out = out.view(b, rows, cols, heads, wh, ww, self.head_dim).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
        out = self.proj_drop(self.proj(out))
        if self.shift_size != (0, 0):
            out = torch.roll(out, shifts=self.shift_size, dims=(1, 2))
        return out[:, :h, :w].contiguous() if (hp, wp) != (h, w) else out


class OffsetNetwork(nn.Sequential):
    """``theta_offset`` of DAT Fig. 2(b): depthwise ``k x k`` conv (stride ``r``), LayerNorm,
    GELU and a 1x1 conv without bias to 2 channels ``(dy, dx)`` (DAT Sec. 3.2). ``padding`` defaults to
    ``k // 2``."""

    def __init__(self, channels: int, kernel_size: int, stride: int, padding: Optional[int] = None):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv_dw = nn.Conv2d(channels, channels, kernel_size, stride, padding, groups=channels)
        self.norm = LayerNorm2d(channels, eps=1e-5)  # nn.LayerNorm's eps, as the release
        self.act = nn.GELU()
        self.conv_proj = nn.Conv2d(channels, 2, 1, bias=False)


class DeformableAttention(nn.Module):
    """Deformable multi-head attention, DAT Sec. 3.2, Eq. (6)-(9).

    Queries ``q = x W_q`` feed the offset network, which moves a uniform grid of
    reference points ``p`` (one per ``r x r`` cell) by ``Delta p = s * tanh(theta(q))``;
    keys and values are projected from the features bilinearly sampled at ``p + Delta p``
    (Eq. (7)-(8)), shared by all queries and split into ``G`` offset groups. Attention logits
    get the deformable relative position bias ``phi(B_hat; R)`` (Eq. (9)).

    Args:
        dim: channels ``C``.
        num_heads: heads ``M``; a multiple of ``n_groups``.
        n_groups: offset groups ``G`` (Table 1 "groups").
        feature_size: map size the position tables are built for (the stage's size at the
            model's ``img_size``); other sizes interpolate the tables.
        offset_range_factor: ``s``. Offsets are ``s * tanh(.)`` key-grid cells / 2 on each side,
            i.e. each point ranges over an ``s x s`` region (Sec. 3.2, Fig. 4); ``s = 0`` gives
            zero offsets; None leaves offsets unbounded.
        offset_kernel_size: ``k`` of the depthwise convolution (9/7/5/3 by stage).
        offset_stride: ``r``, the reference grid's downsampling factor (``H_G = H / r``).
        use_offsets: False samples at the reference points (Table 6 "Offsets ✗").
        position_bias: ``'relative'`` (deformable relative bias, Eq. (9)), ``'fixed'``
            (a learned bias per query-key pair), ``'dwconv'`` (depthwise 3x3 conv on ``q``
            added to the output, as in CSWin) or ``'none'`` (Table 6 "Pos. Embed").
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
        sample_align_corners: grid convention of the bilinear sampling (the release uses
            True; see ``docs/dat.md``).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            n_groups: int,
            feature_size: Tuple[int, int],
            offset_range_factor: Optional[float] = 2.,
            offset_kernel_size: int = 5,
            offset_stride: int = 1,
            use_offsets: bool = True,
            position_bias: str = 'relative',
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sample_align_corners: bool = True,
    ):
        super().__init__()
        if num_heads % n_groups:
            raise ValueError(f'num_heads ({num_heads}) must be a multiple of n_groups ({n_groups})')
        if position_bias not in POSITION_BIASES:
            raise ValueError(f'position_bias {position_bias!r} is not one of {POSITION_BIASES}')
        if offset_range_factor is not None and offset_range_factor < 0:
            raise ValueError(f'offset_range_factor must be >= 0 or None, got {offset_range_factor}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.n_groups = n_groups
        self.group_channels = dim // n_groups
        self.feature_size = tuple(feature_size)
        self.offset_range_factor = offset_range_factor
        self.offset_kernel_size = offset_kernel_size
        self.offset_stride = offset_stride
        self.position_bias = position_bias
        self.sample_align_corners = sample_align_corners
        self.fused_attn = use_fused_attn()
        self.attn_drop = attn_drop
        self.record_sampling = False  # keep the sampled points of the next forward in last_sampling
        self.last_sampling: Optional[Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]] = None
        self.record_attention = False  # keep the softmax weights of the next forward in last_attention
        self.last_attention: Optional[torch.Tensor] = None

        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.offset_net = OffsetNetwork(self.group_channels, offset_kernel_size, offset_stride) if use_offsets else None

        h, w = self.feature_size
        if position_bias == 'relative':
            self.rel_pos_table = nn.Parameter(torch.zeros(num_heads, 2 * h - 1, 2 * w - 1))
            trunc_normal_(self.rel_pos_table, std=.01)
        elif position_bias == 'fixed':
            keys = self.key_grid_size(self.feature_size)
            self.fixed_pos_bias = nn.Parameter(torch.zeros(num_heads, h * w, keys[0] * keys[1]))
            trunc_normal_(self.fixed_pos_bias, std=.01)
        elif position_bias == 'dwconv':
            self.dwc_pe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    deformable = True  # samples its keys at computed points (PyramidBackbone.deformable_blocks)

    def recorded_points(self) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int], bool]:
        """The points recorded by the last forward with ``record_sampling``, per offset group.

        Returns:
            ``(points, reference, feature_size, align_corners)``: ``(B, G, Hk, Wk, 2)`` deformed
            points and their references in ``[-1, 1]`` over the ``feature_size`` input map (the
            fields of :class:`~deformvit.SamplingPoints`).
        """
        if self.last_sampling is None:
            raise RuntimeError('no recorded sampling points: run a forward pass with record_sampling on '
                               '(PyramidBackbone.forward_sampling_points does)')
        points, reference, feature_size = self.last_sampling
        hk, wk = points.shape[1:3]
        points = points.reshape(-1, self.n_groups, hk, wk, 2)  # (B*G, Hk, Wk, 2) -> (B, G, Hk, Wk, 2)
        return points, reference.expand_as(points), feature_size, self.sample_align_corners

    @staticmethod
    def query_points(height: int, width: int, device: torch.device) -> torch.Tensor:
        """Where the relative position bias (Eq. (9)) places the query pixels: ``(H, W, 2)`` ``(y, x)`` in
        ``[-1, 1]``, the reference grid of the query map."""
        return reference_points(height, width, device)

    def key_grid_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """Reference grid ``H_G x W_G`` for a ``size`` query map."""
        return tuple(_conv_out(s, self.offset_kernel_size, self.offset_stride) for s in size)

    def sampling_points(self, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deformed points ``p + Delta p`` (Eq. (7)) and references ``p`` from the queries.

        Args:
            q: ``(B, H, W, C)`` projected queries.

        Returns:
            ``(points, reference)``: ``(B*G, Hk, Wk, 2)`` and ``(Hk, Wk, 2)``, ``(y, x)``, in
            float32 whatever the compute precision, so that positions stay exact under AMP.
        """
        b, h, w, _ = q.shape
        hk, wk = self.key_grid_size((h, w))
        reference = reference_points(hk, wk, q.device)
        if self.offset_net is None:
            return reference.expand(b * self.n_groups, hk, wk, 2), reference
        # (B, H, W, C) -> (B*G, C/G, H, W) -> (B*G, 2, Hk, Wk) -> (B*G, Hk, Wk, 2)
        q_groups = q.permute(0, 3, 1, 2).reshape(b * self.n_groups, self.group_channels, h, w)
        offset = self.offset_net(q_groups).permute(0, 2, 3, 1).float()
        if self.offset_range_factor is not None:
            # s * tanh(.) in units of the key grid: 1/Hk, 1/Wk of the normalised range
            offset_range = torch.tensor([1.0 / hk, 1.0 / wk], device=q.device)
            offset = offset.tanh() * offset_range * self.offset_range_factor
        return reference + offset, reference

    def _fixed_bias(self, query_size: Tuple[int, int], key_size: Tuple[int, int]) -> torch.Tensor:
        return resize_fixed_position_bias(
            self.fixed_pos_bias, self.feature_size, self.key_grid_size(self.feature_size), query_size, key_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q = self.proj_q(x)  # (B, H, W, C)
        points, reference = self.sampling_points(q)
        hk, wk = points.shape[1:3]
        num_keys = hk * wk
        if self.record_sampling:
            self.last_sampling = (points.detach(), reference.detach(), (h, w))

        # Eq. (7)-(8): (B, H, W, C) -> (B*G, C/G, H, W) sampled at (B*G, Hk, Wk) points
        x_groups = x.permute(0, 3, 1, 2).reshape(b * self.n_groups, self.group_channels, h, w)
        x_sampled = sample_bilinear(x_groups, points, self.sample_align_corners)  # (B*G, C/G, Hk, Wk)
        x_sampled = x_sampled.reshape(b, c, num_keys).transpose(1, 2)  # (B, Ns, C)

        # Eq. (6): (B, N, C) -> (B, heads, N, d)
        k = self.proj_k(x_sampled).view(b, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.proj_v(x_sampled).view(b, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        q_heads = q.reshape(b, h * w, self.num_heads, self.head_dim).transpose(1, 2)

        bias = None
        if self.position_bias == 'relative':
            queries = self.query_points(h, w, x.device).reshape(h * w, 2)
            bias = deformable_relative_position_bias(
                self.rel_pos_table, queries, points.reshape(b * self.n_groups, num_keys, 2), self.n_groups)
            bias = bias.to(q_heads.dtype)
        elif self.position_bias == 'fixed':
            bias = self._fixed_bias((h, w), (hk, wk))[None].to(q_heads.dtype)  # (1, heads, HW, Ns)

        if self.record_attention:  # explicit path, keeping the weights for DAT Figs. 5 and 7
            weights = attention_weights(q_heads, k, bias)  # (B, heads, HW, Ns)
            self.last_attention = weights.detach()
            out = F.dropout(weights, self.attn_drop, self.training) @ v
        else:
            out = attention(q_heads, k, v, bias, self.attn_drop if self.training else 0., self.fused_attn)
        out = out.transpose(1, 2).reshape(b, h, w, c)  # (B, heads, HW, d) -> (B, H, W, C)
        if self.position_bias == 'dwconv':
            out = out + self.dwc_pe(q.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj_out(out))


class DeformableDetrAttention(nn.Module):
    """Single-scale deformable attention of Deformable DETR, DAT Appendix A, Eq. (11).

    Each query predicts ``K`` sampling offsets per head around its own location and their
    weights ``A = softmax(W_att x)`` by linear projections (no query-key dot products):
    ``z_q = sum_k A_qk W_v phi(x; p_q + Delta p_qk)``. The sampling offsets start as a
    centred square grid of ``K`` points, one pixel apart.

    Args:
        dim: channels.
        num_heads: heads ``M``.
        num_points: keys per query ``K`` (Table 8 "#Key").
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, num_points: int, proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_points = num_points
        self.value_proj = nn.Linear(dim, dim)
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_points)
        self.output_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        side = math.ceil(math.sqrt(self.num_points))
        steps = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
        grid_y, grid_x = torch.meshgrid(steps, steps, indexing='ij')
        grid = torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2)[:self.num_points]  # (K, 2) as (dx, dy)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.repeat(self.num_heads, 1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        heads, points = self.num_heads, self.num_points
        # (B, H, W, C) -> (B*heads, d, H, W)
        value = self.value_proj(x).view(b, h, w, heads, self.head_dim).permute(0, 3, 4, 1, 2)
        value = value.reshape(b * heads, self.head_dim, h, w)
        # query locations in grid_sample's (x, y) coordinates, pixel centres; float32 like DAT's points
        queries = reference_points(h, w, x.device).flip(-1).reshape(1, h * w, 1, 1, 2)
        pixel = torch.tensor([2.0 / w, 2.0 / h], device=x.device)
        offsets = self.sampling_offsets(x).float().view(b, h * w, heads, points, 2) * pixel
        grid = (queries + offsets).permute(0, 2, 1, 3, 4).reshape(b * heads, h * w, points, 2)
        sampled = bilinear_grid_sample(value, grid, align_corners=False)  # (B*heads, d, HW, K)
        weights = self.attention_weights(x).view(b, h * w, heads, points).softmax(-1)
        weights = weights.permute(0, 2, 1, 3).reshape(b * heads, 1, h * w, points)
        out = (sampled * weights).sum(-1)  # (B*heads, d, HW)
        out = out.view(b, heads * self.head_dim, h, w).permute(0, 2, 3, 1)  # -> (B, H, W, C)
        return self.proj_drop(self.output_proj(out))


class SpatialReductionAttention(nn.Module):
    """Spatial-reduction attention of PVT (Sec. 3.3 of PVT), DAT Table 6 row "P".

    Keys and values come from the map reduced by an ``R x R`` / stride ``R`` convolution and
    LayerNorm; sizes that are not multiples of ``R`` are floored, as in PVT.

    Args:
        dim: channels.
        num_heads: heads.
        sr_ratio: reduction ratio ``R`` (1: no reduction).
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = use_fused_attn()
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q = self.q(x).reshape(b, h * w, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, HW, d)
        if self.sr is not None:
            x = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (B, H/R, W/R, C)
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, kv[0], kv[1], None, self.attn_drop if self.training else 0., self.fused_attn)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, h, w, c)))


DATBlock = PreNormBlock  # DAT Eq. (4)-(5)


class DATStage(nn.Module):
    """One pyramid stage: optional downsampling, then blocks as listed by ``spec``.

    Args:
        dim_in: channels entering the stage.
        dim: channels of the stage.
        spec: one letter per block, see :data:`BLOCK_TYPES` (e.g. ``'LDLDLD'``).
        downsample: start with a stride-2 :class:`Downsample` (stages 2-4).
        overlapping_downsample: 3x3 downsampling convolution (Appendix B).
        num_heads, window_size, n_groups, feature_size, offset_range_factor,
        offset_kernel_size, offset_stride, use_offsets, position_bias: see
            :class:`WindowAttention` and :class:`DeformableAttention`.
        ddetr_points: keys per query of ``'M'`` blocks.
        sr_ratio: reduction ratio of ``'P'`` blocks.
        sample_align_corners: grid convention of ``'D'`` blocks' sampling.
        mlp_ratio, proj_drop, attn_drop: block settings.
        drop_path: one stochastic depth rate per block.
    """

    def __init__(
            self,
            dim_in: int,
            dim: int,
            spec: str,
            downsample: bool,
            overlapping_downsample: bool,
            num_heads: int,
            window_size: int,
            n_groups: int,
            feature_size: Tuple[int, int],
            offset_range_factor: Optional[float],
            offset_kernel_size: int,
            offset_stride: int,
            use_offsets: bool,
            position_bias: str,
            ddetr_points: int,
            sr_ratio: int,
            sample_align_corners: bool,
            mlp_ratio: float,
            proj_drop: float,
            attn_drop: float,
            drop_path: Sequence[float],
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim_in, dim, overlapping_downsample) if downsample else nn.Identity()

        def make_attention(kind: str) -> nn.Module:
            if kind in 'LS':
                return WindowAttention(dim, num_heads, window_size, kind == 'S', attn_drop, proj_drop)
            if kind == 'D':
                return DeformableAttention(
                    dim, num_heads, n_groups, feature_size, offset_range_factor, offset_kernel_size,
                    offset_stride, use_offsets, position_bias, attn_drop, proj_drop, sample_align_corners)
            if kind == 'P':
                return SpatialReductionAttention(dim, num_heads, sr_ratio, attn_drop, proj_drop)
            return DeformableDetrAttention(dim, num_heads, ddetr_points, proj_drop)

        self.blocks = nn.Sequential(*[
            DATBlock(dim, make_attention(kind), mlp_ratio, proj_drop, drop_path[i]) for i, kind in enumerate(spec)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DAT(PyramidBackbone):
    """Deformable Attention Transformer (DAT Sec. 3.3, Fig. 3, Table 1).

    Args:
        img_size, in_chans, num_classes, global_pool, patch_size, drop_rate, proj_drop_rate,
            attn_drop_rate, drop_path_rate: as in :class:`PyramidBackbone` (position tables are
            built for ``img_size`` and interpolated for other sizes).
        embed_dims: channels ``C`` of the four stages.
        depths: blocks per stage (``2 N_i`` of Table 1).
        num_heads: heads per stage.
        stage_spec: one string per stage, a letter per block (:data:`BLOCK_TYPES`);
            overrides ``deformable_stages``. E.g. Table 6 row P is
            ``('PP', 'PP', 'LDLDLD', 'LD')``.
        deformable_stages: stages (0-based) made of alternating local and deformable blocks;
            the others alternate local and shift-window blocks (Table 7).
        window_size: local-attention window, scalar or per stage.
        groups: offset groups ``G`` per stage.
        offset_range_factor: ``s`` (Fig. 4), scalar or per stage; None: unbounded offsets.
        offset_kernel_size: offset network kernel per stage (9/7/5/3 in the release).
        offset_stride: reference grid factor ``r``, scalar or per stage.
        use_offsets: deformable offsets on/off (Table 6 "Offsets").
        position_bias: ``'relative'`` / ``'fixed'`` / ``'dwconv'`` / ``'none'`` (Table 6).
        ddetr_points: keys per query of Deformable-DETR blocks ``'M'``, scalar or per stage
            (Table 8).
        sr_ratios: spatial-reduction ratios of PVT blocks ``'P'`` per stage.
        mlp_ratio: MLP expansion.
        conv_patch_embed: overlapping convolutional stem and downsampling (Appendix B, DAT-T*).
        sample_align_corners: grid convention of deformable sampling (see ``docs/dat.md``).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            stage_spec: Optional[Sequence[str]] = None,
            deformable_stages: Sequence[int] = (2, 3),
            window_size: Union[int, Sequence[int]] = 7,
            groups: Sequence[int] = (1, 2, 3, 6),
            offset_range_factor: Union[Optional[float], Sequence[Optional[float]]] = 2.,
            offset_kernel_size: Sequence[int] = (9, 7, 5, 3),
            offset_stride: Union[int, Sequence[int]] = (4, 2, 1, 1),
            use_offsets: bool = True,
            position_bias: str = 'relative',
            ddetr_points: Union[int, Sequence[int]] = 16,
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            mlp_ratio: float = 4.,
            patch_size: int = 4,
            conv_patch_embed: bool = False,
            sample_align_corners: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        num_stages = len(embed_dims)
        if stage_spec is None:
            stage_spec = [('LD' if i in deformable_stages else 'LS') * depths[i] for i in range(num_stages)]
            stage_spec = [spec[:depths[i]] for i, spec in enumerate(stage_spec)]
        stage_spec = [''.join(spec) for spec in per_stage(list(stage_spec), num_stages, 'stage_spec')]
        for spec in stage_spec:
            unknown = set(spec) - set(BLOCK_TYPES)
            if unknown or not spec:
                raise ValueError(f'stage_spec entry {spec!r} must be a non-empty string of {sorted(BLOCK_TYPES)}')
        if position_bias not in POSITION_BIASES:
            raise ValueError(f'position_bias {position_bias!r} is not one of {POSITION_BIASES}')
        for name, seq in (('depths', depths), ('num_heads', num_heads), ('groups', groups)):
            per_stage(list(seq), num_stages, name)
        for dim, heads, n_groups in zip(embed_dims, num_heads, groups):
            if dim % heads or heads % n_groups:
                raise ValueError(f'stage of {dim} channels, {heads} heads, {n_groups} groups: '
                                 'channels must divide by heads and heads by groups')
        window_size = per_stage(window_size, num_stages, 'window_size')
        offset_range_factor = per_stage(offset_range_factor, num_stages, 'offset_range_factor')
        offset_stride = per_stage(offset_stride, num_stages, 'offset_stride')
        ddetr_points = per_stage(ddetr_points, num_stages, 'ddetr_points')
        sr_ratios = per_stage(list(sr_ratios), num_stages, 'sr_ratios')
        offset_kernel_size = per_stage(list(offset_kernel_size), num_stages, 'offset_kernel_size')

        super().__init__(img_size, in_chans, num_classes, global_pool, embed_dims, patch_size)
        self.stage_spec = tuple(stage_spec)
        self.stem = Stem(in_chans, embed_dims[0], patch_size, conv_patch_embed)

        def make_stage(i: int, dim_in: int, dim: int, feature_size: Tuple[int, int], drop_path) -> DATStage:
            return DATStage(
                dim_in=dim_in,
                dim=dim,
                spec=stage_spec[i],
                downsample=i > 0,
                overlapping_downsample=conv_patch_embed,
                num_heads=num_heads[i],
                window_size=window_size[i],
                n_groups=groups[i],
                feature_size=feature_size,
                offset_range_factor=offset_range_factor[i],
                offset_kernel_size=offset_kernel_size[i],
                offset_stride=offset_stride[i],
                use_offsets=use_offsets,
                position_bias=position_bias,
                ddetr_points=ddetr_points[i],
                sr_ratio=sr_ratios[i],
                sample_align_corners=sample_align_corners,
                mlp_ratio=mlp_ratio,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path,
            )

        self._build_stages([len(spec) for spec in stage_spec], drop_path_rate, make_stage)
        self._build_head(drop_rate)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        PyramidBackbone._init_weights(module)
        if isinstance(module, DeformableDetrAttention):
            module.reset_parameters()


def _official_key(key: str) -> Optional[str]:
    """Map one key of the official release layout to ours (None: derived buffer, dropped)."""
    parts = key.split('.')
    if parts[-1] in ('relative_position_index', 'attn_mask', 'reference', 'q_grid'):
        return None
    if parts[0] == 'patch_proj':
        return ('stem.conv.' if parts[1] == '0' else 'stem.norm.') + parts[-1]
    if parts[0] == 'down_projs':
        stage = int(parts[1]) + 1
        return f'stages.{stage}.downsample.' + ('conv.' if parts[2] == '0' else 'norm.') + parts[-1]
    if parts[0] == 'cls_norm':
        return 'norm.' + parts[-1]
    if parts[0] == 'cls_head':
        return 'head.fc.' + parts[-1]
    if parts[0] != 'stages':
        return key
    stage, kind, index, rest = parts[1], parts[2], int(parts[3]), parts[4:]
    if kind == 'layer_norms':
        return f'stages.{stage}.blocks.{index // 2}.norm{index % 2 + 1}.{rest[-1]}'
    if kind == 'mlps':
        fc = {'linear1': 'fc1', 'linear2': 'fc2'}[rest[-2]]
        return f'stages.{stage}.blocks.{index}.mlp.{fc}.{rest[-1]}'
    if kind == 'attns':
        prefix = f'stages.{stage}.blocks.{index}.attn.'
        if rest[0] == 'conv_offset':
            layer = {'0': 'conv_dw', '1': 'norm', '3': 'conv_proj'}[rest[1]]
            return prefix + f'offset_net.{layer}.{rest[-1]}'
        if rest[0] == 'proj_qkv':
            return prefix + 'qkv.' + rest[-1]
        return prefix + '.'.join(rest)  # proj_q/k/v/out, position tables: resolved by the caller
    return key


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DAT) -> Dict[str, torch.Tensor]:
    """Convert an official DAT release state dict (or ours) to this model's layout.

    Unwraps ``'model'`` / ``'state_dict'``, drops derived buffers (relative position
    indices, attention masks), renames keys, turns 1x1-conv projections into linear weights
    and resizes position tables to the model's sizes.
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    official = 'patch_proj.0.weight' in state_dict or 'cls_head.weight' in state_dict
    out = {}
    for key, value in state_dict.items():
        if official:
            key = _official_key(key)
            if key is None:
                continue
            prefix, name = key.rsplit('.', 1)
            if prefix.endswith('.proj_out') and prefix[:-len('proj_out')] + 'proj.weight' in own:
                key = prefix[:-len('proj_out')] + 'proj.' + name  # window attention's output projection
            elif prefix.endswith('.rpe_table'):  # depthwise-conv position encoding
                key = prefix[:-len('rpe_table')] + 'dwc_pe.' + name
            elif name == 'rpe_table':
                targets = [prefix + '.' + t for t in ('rel_pos_table', 'fixed_pos_bias')]
                key = next((t for t in targets if t in own), key)
        elif key.endswith(('relative_position_index', 'attn_mask')):
            continue
        if key in own:
            target = own[key]
            if key.endswith('relative_position_bias_table') and value.shape != target.shape:
                side = int(round(target.shape[0] ** 0.5))
                value = resize_relative_position_table(value, (side, side))
            elif key.endswith('rel_pos_table') and value.shape != target.shape:
                value = resize_relative_position_table(value, tuple(target.shape[1:]))
            elif value.ndim == 4 and target.ndim == 2 and value.shape[2:] == (1, 1):
                value = value.flatten(1)  # 1x1 conv (C_out, C_in, 1, 1) -> linear (C_out, C_in)
        out[key] = value
    return out


_RELEASED_VARIANTS = {
    # (stem channels, stage-3 depth, local window): model name
    (96, 6, 7): 'dat_tiny',
    (96, 18, 7): 'dat_small',
    (128, 18, 7): 'dat_base',
    (128, 18, 12): 'dat_base_384',
}


# DAT++ (the official repository's 2023 release): first-stage width -> model name. ``datpp_base_384`` has
# the same keys and shapes as ``datpp_base`` (its position tables stay sized for 224): it is named explicitly.
_RELEASED_DATPP_VARIANTS = {64: 'datpp_tiny', 96: 'datpp_small', 128: 'datpp_base'}


def is_datpp_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict (official layout or ours) is a DAT++ one and not DAT's v1, read from its keys: a
    local perception unit, a convolutional FFN's depthwise convolution or a neighborhood attention bias (``rpb``).
    Both releases share the stem and stage names, widths and depths, so those do not tell them apart."""
    for key in state_dict:
        if '.local_perception_units.' in key or '.lpu.' in key or key.endswith('.rpb') or '.dwc.' in key:
            return True
    return False


def _infer_datpp_variant(state_dict: Dict[str, torch.Tensor]) -> str:
    first_norms = ('stages.0.layer_norms.0.norm.weight', 'stages.0.blocks.0.norm1.weight')  # official, ours
    norm = next((v for k, v in state_dict.items() if k.endswith(first_norms)), None)
    if norm is None:
        raise ValueError('a DAT++ state dict without stages.0.layer_norms.0.norm.weight (official layout) or '
                         'stages.0.blocks.0.norm1.weight (deformvit layout); expected one of them')
    width = norm.shape[0]
    if width not in _RELEASED_DATPP_VARIANTS:
        raise ValueError(f'a DAT++ model with first-stage width {width} is not one of the released ones '
                         f'(64, 96, 128: datpp_tiny, datpp_small, datpp_base); name it explicitly (--model)')
    return _RELEASED_DATPP_VARIANTS[width]


def infer_dat_variant(state_dict: Dict[str, torch.Tensor]) -> str:
    """Name of the released DAT or DAT++ model a state dict (official or ours) belongs to.

    DAT++ files (:func:`is_datpp_state_dict`) are told apart from v1 ones by their keys, then named by
    their first-stage width; a ``datpp_base_384`` file reads as ``datpp_base`` (same architecture).

    Raises:
        ValueError: the layout matches none of ``dat_tiny``, ``dat_small``, ``dat_base``,
            ``dat_base_384``, ``datpp_tiny``, ``datpp_small``, ``datpp_base``.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_datpp_state_dict(state_dict):
        return _infer_datpp_variant(state_dict)
    if 'patch_proj.0.weight' in state_dict:  # official layout
        stem = state_dict['patch_proj.0.weight'].shape[0]
        depth = len({k.split('.')[3] for k in state_dict if k.startswith('stages.2.attns.')})
        table = state_dict.get('stages.0.attns.0.relative_position_bias_table')
    elif 'stem.conv.weight' in state_dict:
        stem = state_dict['stem.conv.weight'].shape[0]
        depth = len({k.split('.')[3] for k in state_dict if k.startswith('stages.2.blocks.')})
        table = state_dict.get('stages.0.blocks.0.attn.relative_position_bias_table')
    else:
        raise ValueError('not a DAT state dict: it has neither patch_proj.0.weight (official layout) '
                         'nor stem.conv.weight (deformvit layout)')
    window = int(round(((table.shape[0] ** 0.5) + 1) / 2)) if table is not None else 7
    key = (stem, depth, window)
    if key not in _RELEASED_VARIANTS:
        raise ValueError(f'a DAT model with stem width {stem}, {depth} stage-3 blocks and window {window} is not '
                         f'one of the released ones; name it explicitly (--model)')
    return _RELEASED_VARIANTS[key]


def check_release_layout(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Refuse, before loading, weights of another DAT release or released size than ``model``'s.

    A DAT++ file for a DAT (v1) model or the reverse is told by its keys (:func:`is_datpp_state_dict`),
    another size (T/S/B) by :func:`infer_dat_variant`; either is a ValueError naming both. A model at
    384 takes its 224 counterpart's weights (the size-dependent tables are resized), and a file that is
    no DAT model's, or a layout of no released size (``dat_nano``, other widths), passes on to the
    shape checks of loading.
    """
    state_dict = unwrap_state_dict(state_dict)
    v1_stems = ('patch_proj.0.weight', 'stem.conv.weight')  # official layout, ours (also under 'backbone.')
    file_pp = is_datpp_state_dict(state_dict)
    if not file_pp and not any(k.endswith(v1_stems) for k in state_dict):
        return
    own = model.state_dict()
    model_pp = is_datpp_state_dict(own)
    found = expected = None
    with contextlib.suppress(ValueError):
        found = infer_dat_variant(state_dict)
    with contextlib.suppress(ValueError):
        expected = infer_dat_variant(own)
    if file_pp == model_pp and (found is None or expected is None or _stripped(found) == _stripped(expected)):
        return
    release = {True: 'DAT++', False: 'DAT (v1)'}
    asked = getattr(model, 'pretrained_cfg', {}).get('architecture') or expected or type(model).__name__
    if found:
        holds = f'{found} weights ({release[file_pp]})'
        use = (f"create {found} to load them (timm.create_model('{found}', pretrained=True, "
               'pretrained_cfg_overlay=dict(file=PATH)))')
    else:
        holds = f'{release[file_pp]} weights'
        examples = 'datpp_tiny, datpp_small' if file_pp else 'dat_tiny, dat_small'
        use = f'load them into a {release[file_pp]} model ({examples}, ...)'
    raise ValueError(f'{path} holds {holds}, not {asked} ones ({release[model_pp]}): {use}, or pass {asked} weights.')


def _stripped(variant: str) -> str:
    """The architecture of a released variant: ``*_384`` models are their 224 ones at another size."""
    return variant[:-len('_384')] if variant.endswith('_384') else variant


DAT.checkpoint_filter = staticmethod(checkpoint_filter_fn)
DAT.check_weights_layout = check_release_layout
DAT.no_decay_names = ('relative_position_bias_table', 'rel_pos_table', 'fixed_pos_bias')


def _create_dat(variant: str, pretrained: bool = False, **kwargs) -> DAT:
    return build_pyramid(DAT, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> Dict:
    return pyramid_cfg(
        first_conv='stem.conv', paper_ids='arXiv:2201.00520',
        paper_name='Vision Transformer with Deformable Attention', **kwargs)


default_cfgs = generate_default_cfgs({
    'dat_nano.untrained': _cfg(size=32),
    # the official release (CVPR 2022); top-1 as its README reports it
    'dat_tiny.in1k': _cfg(**official_source('1367349deefc48efa650', 82.0, 'DAT')),
    'dat_small.in1k': _cfg(**official_source('f04b18081e3e4606adb7', 83.7, 'DAT')),
    'dat_base.in1k': _cfg(**official_source('a8d2a9645d454120b635', 84.0, 'DAT')),
    'dat_base_384.in1k': _cfg(size=384, **official_source('cf6a6b543cd64e0d8e43', 84.8, 'DAT')),
})


@register_model
def dat_nano(pretrained: bool = False, **kwargs) -> DAT:
    """A narrow DAT (2.3M parameters, 12 MMACs at 32x32) for small images such as 32x32 digits: every block type
    of DAT-T, window 4, widths (32, 64, 128, 256). Not from the paper."""
    model_args = dict(
        img_size=32, embed_dims=(32, 64, 128, 256), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
        groups=(1, 1, 2, 4), window_size=4)
    return _create_dat('dat_nano', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dat_tiny(pretrained: bool = False, **kwargs) -> DAT:
    """DAT-T of Table 1: 28.3M parameters, 4.6 GMACs at 224 (Table 2, 6)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), groups=(1, 2, 3, 6))
    return _create_dat('dat_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dat_small(pretrained: bool = False, **kwargs) -> DAT:
    """DAT-S of Table 1: 50M parameters, 9.0 GMACs at 224 (Table 2)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), groups=(1, 2, 3, 6))
    return _create_dat('dat_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dat_base(pretrained: bool = False, **kwargs) -> DAT:
    """DAT-B of Table 1: 88M parameters, 15.8 GMACs at 224 (Table 2)."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), groups=(1, 2, 4, 8))
    return _create_dat('dat_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dat_base_384(pretrained: bool = False, **kwargs) -> DAT:
    """DAT-B fine-tuned at 384 with window 12: 88M parameters, 49.8 GMACs (Table 2)."""
    model_args = dict(
        img_size=384, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
        groups=(1, 2, 4, 8), window_size=12)
    return _create_dat('dat_base_384', pretrained=pretrained, **dict(model_args, **kwargs))
