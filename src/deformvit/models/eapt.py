"""EAPT: Efficient Attention Pyramid Transformer.

Paper sections implemented here:

* Sec. III-A, Eq. (1)-(3): Deformable Attention (:class:`DeformableWindowAttention`):
  attention inside non-overlapping windows whose keys and values (``deform='keys_values'``) or
  whole windows (``deform='window'``) are read, by bilinear interpolation, at the window's
  positions moved by learned, bounded offsets ``(o_x, o_y) = Dense(Conv(W_f))`` and clamped to
  the map by the boundary kernel C.
* Sec. III-B, Eq. (4)-(5), Fig. 3: the En-DeC module (:class:`EnDeC`): channel
  compression, convolutional encoding to the map of windows, then down to one cell
  (``endec_mode='global'``) and transposed-convolution decoding back, added to the attention
  information for communication among all windows.
* Sec. III-C, Eq. (9)-(13): the MCMD position encoding (:class:`deformvit.layers.MCMD`),
  added to the attention input, its amplitude ``a_ij`` read from the input image's patches
  (:func:`patch_means`; ``mcmd_amplitude``).
* Sec. IV-A, Table II, Table III: the four-stage pyramid (:class:`EAPT`) and the
  ``eapt_small``, ``eapt_medium``, ``eapt_large`` and ``eapt_medium_384`` configurations.
* Sec. IV-C, Table VII, Table VIII, Fig. 4: every ablation is a constructor argument.

No code accompanies the paper. Where its text is ambiguous the choice made here, and the
argument that changes it, is recorded in ``docs/eapt.md`` next to the equation it concerns.

Feature maps are channels-last ``(B, H, W, C)`` inside the network; ``features_only`` and
:meth:`EAPT.forward_intermediates` return ``(B, C, H, W)``. Any input of at least 32x32
pixels works: maps are padded to the patch, window and downsampling grids, the padding is
kept out of attention, and outputs are cropped back. Key positions are float32 in every
precision; a model cast to bfloat16 or float16 runs on the CPU too, its bilinear reads made in
float32 (:func:`deformvit.layers.bilinear_grid_sample`).
"""
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from ..checkpoint import unwrap_state_dict
from ..layers import (
    MCMD,
    FloaterEncoding,
    LearnedEmbedding,
    PreNormBlock,
    SinusoidalEncoding,
    attention,
    bilinear_grid_sample,
    counting_flops,
    deformable_relative_position_bias,
    fast_paths_enabled,
    pad_to_multiple,
    resize_relative_position_table,
    window_partition,
    window_region_mask,
    window_reverse,
)
from ._pyramid import PyramidBackbone, build_pyramid, per_stage, pyramid_cfg

__all__ = ['EAPT']

POSITION_ENCODINGS = ('mcmd', 'sinusoidal', 'embedding', 'relative', 'floater', 'none')
# what Deformable Attention reads at the moved positions (docs/eapt.md, "Which features deform")
DEFORMED_FEATURES = ('keys_values', 'window')
# MLP expansion: the paper does not state it; each variant's ratio is the one on which the paper's
# own counts of that variant agree: Table III's parameters and FLOPs for S and M (and Table V's
# HTC+++ size for M), Table V's HTC+++ sizes for L (docs/eapt.md, "MLP ratio")
MLP_RATIO_S = 3.5
MLP_RATIO_M = 4.75
MLP_RATIO_L = 4.0


def _position_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``(height, width, 2)`` float32 ``(y, x)`` coordinates of every map position."""
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(rows, cols, indexing='ij'), dim=-1)


class WindowOffsetNetwork(nn.Module):
    """``(o_y, o_x) = b * tanh(Dense(Conv(W_f)))``: one offset per window position (EAPT Sec. III-A).

    ``Conv`` is a depthwise ``k x k`` convolution over each window's features (zero
    padding at the window border), ``Dense`` a fully connected layer from the ``C``
    channels of a position to its two offsets, and ``b * tanh`` the value constraint
    ``|o| <= b`` with ``b`` the broaden size of Fig. 4, in feature-map positions.

    Args:
        dim: channels ``C``.
        kernel_size: ``k``.
        broaden_size: ``b`` (> 0).

    Both layers are linear, so ``Dense(Conv(.))`` is one ``k x k`` convolution from ``C`` channels
    to 2, of weight ``W_dense[o, c] * W_conv[c, :, :]`` and bias ``W_dense b_conv + b_dense``; with
    ``fused`` (class attribute, default True) it runs as that convolution, which skips the
    ``C``-channel intermediate map and the memory its backward would keep (the FLOP counter still
    sees the two layers, the MACs of Table III). The parameters stay the two layers';
    ``fused = False`` runs them one after the other (the same values up to float rounding,
    tests/test_fast_paths.py).
    """

    fused = True

    def __init__(self, dim: int, kernel_size: int, broaden_size: float):
        super().__init__()
        self.broaden_size = broaden_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        self.dense = nn.Linear(dim, 2)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """``(B*nW, Wh, Ww, C)`` window features -> ``(B*nW, Wh, Ww, 2)`` float32 ``(o_y, o_x)``."""
        if self.fused and fast_paths_enabled() and not counting_flops() and not any(
                m._forward_hooks or m._forward_pre_hooks for m in (self.conv, self.dense)):
            weight = self.dense.weight[:, :, None, None] * self.conv.weight[:, 0]  # (2, C, k, k)
            bias = self.dense.bias + self.dense.weight @ self.conv.bias
            offsets = F.conv2d(windows.permute(0, 3, 1, 2), weight, bias, 1, self.conv.padding)  # (B*nW, 2, Wh, Ww)
            return offsets.permute(0, 2, 3, 1).float().tanh() * self.broaden_size
        x = self.conv(windows.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B*nW, Wh, Ww, C)
        return self.dense(x).float().tanh() * self.broaden_size


class EnDeC(nn.Module):
    """Encode-Decode Communication module (EAPT Sec. III-B, Eq. (4)-(5), Fig. 3).

    ``V' = ConV(V, c')`` compresses the channels with a 1x1 convolution (a per-position
    linear layer), ``V'' = ConV(V', c'')`` encodes ``V'`` with a ``k x k`` convolution of
    stride ``s`` to an ``H/s x W/s`` map of ``c''`` channels, and ``V''' = DeConV(V'', c')``
    decodes it with the matching transposed convolution back to ``H x W x c'`` (Eq. (5)).

    ``mode='global'`` (the default) performs the convolution "as many times as needed, and the
    same rules apply to the decode architecture" (Sec. III-B): one shared ``3 x 3`` convolution
    of stride 2 (``c'' -> c''``, padding 1) halves the ``H/s x W/s`` map, rounding up, until it
    is ``1 x 1``, and one shared ``3 x 3`` transposed convolution of stride 2 doubles it back,
    level by level, to the exact size of the level it mirrors. Every output position then
    depends on every input position, at any map size and with a fixed parameter count.
    ``mode='local'`` encodes and decodes once: an output hears from the ``5 x 5`` strides
    around it only.

    Eq. (4)-(5) are convolutions only; no nonlinearity and no skip connection is inserted. Maps
    that are not a multiple of ``s`` are zero-padded at the bottom/right and the result is
    cropped.

    Args:
        dim: input channels ``c``.
        compressed: ``c'`` (Table II).
        encoded: ``c''`` (Table II).
        kernel_size: ``k`` of the encoder and decoder; ``k - s`` must be even and >= 0.
        stride: ``s``.
        mode: ``'global'`` (encode down to ``1 x 1``) or ``'local'`` (encode once).
    """
    MODES = ('global', 'local')

    def __init__(self, dim: int, compressed: int, encoded: int, kernel_size: int, stride: int, mode: str = 'global'):
        super().__init__()
        if stride < 1 or kernel_size < stride or (kernel_size - stride) % 2:
            raise ValueError(f'En-DeC kernel {kernel_size} and stride {stride}: need stride >= 1 and '
                             'kernel - stride even and >= 0 so that decoding restores the input size')
        if dim % compressed:
            raise ValueError(f'En-DeC compresses {dim} channels to {compressed}; c must be a multiple of c\' '
                             'so that each compressed channel is added to c / c\' attention channels')
        if mode not in self.MODES:
            raise ValueError(f'En-DeC mode {mode!r} is not one of {self.MODES}')
        self.stride = stride
        self.mode = mode
        padding = (kernel_size - stride) // 2
        self.compress = nn.Linear(dim, compressed)
        self.encode = nn.Conv2d(compressed, encoded, kernel_size, stride, padding)
        if mode == 'global':  # new names, so that 'local' keeps the state-dict keys of the one-level module
            self.encode_halving = nn.Conv2d(encoded, encoded, 3, 2, 1)
            self.decode_doubling = nn.ConvTranspose2d(encoded, encoded, 3, 2, 1)
        self.decode = nn.ConvTranspose2d(encoded, compressed, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, c)`` -> ``(B, H, W, c')``."""
        return self.communicate(self.compress(x))

    def communicate(self, compressed: torch.Tensor) -> torch.Tensor:
        """Encode and decode the compressed map ``V'``: ``(B, H, W, c')`` -> ``(B, H, W, c')``."""
        _, h, w, _ = compressed.shape
        v = compressed.permute(0, 3, 1, 2)  # (B, H, W, c') -> (B, c', H, W)
        pad_h, pad_w = -h % self.stride, -w % self.stride
        if pad_h or pad_w:
            v = F.pad(v, (0, pad_w, 0, pad_h))
        v = self.encode(v)  # V'': (B, c', Hp, Wp) -> (B, c'', Hp/s, Wp/s)
        if self.mode == 'global':
            level_sizes = []
            while v.shape[-2] > 1 or v.shape[-1] > 1:  # a Python loop over static shapes (exports unrolled)
                level_sizes.append(v.shape[-2:])
                v = self.encode_halving(v)  # (B, c'', h, w) -> (B, c'', ceil(h/2), ceil(w/2))
            for size in reversed(level_sizes):
                v = self.decode_doubling(v, output_size=size)  # (B, c'', ceil(h/2), ceil(w/2)) -> (B, c'', h, w)
        v = self.decode(v)  # V''': (B, c'', Hp/s, Wp/s) -> (B, c', Hp, Wp)
        return v[:, :, :h, :w].permute(0, 2, 3, 1)


class DeformableWindowAttention(nn.Module):
    """EAPT attention: window attention over deformed windows, En-DeC and a position encoding.

    For a ``(B, H, W, C)`` input ``f`` (the block's normalised features):

    1. ``f <- f + P_f`` with the position encoding ``P`` (Eq. (13)); ``'relative'`` instead
       adds a relative position bias to the logits.
    2. The map is split into ``Wh x Ww`` windows. Each window position ``(l_y, l_x)`` gets an
       offset from :class:`WindowOffsetNetwork` (``|o| <= b``), the moved position
       ``L = l + o`` (Eq. (1)) is clamped into the map by the boundary kernel C (Eq. (2)), and
       the features there are read by bilinear interpolation (Eq. (3)). With
       ``deform='keys_values'`` the window's keys and values are projected from these reads
       and its queries from the window positions; with ``deform='window'`` the whole window
       moves: queries, keys and values are all projected from the one read, and the output of
       the query read at ``C(l + o)`` is written back at ``l``. Either way a window has
       ``Wh * Ww`` queries and keys, so attention costs what plain window attention costs.
    3. Attention inside each window, Eq. (6) / (13). Keys whose window position ``l`` is
       padding are masked; a relative position bias is read at the difference of the query's
       and the key's positions (moved ones where they moved).
    4. The En-DeC output (``c'`` channels, Eq. (4)-(5)) is added to the attention
       information: compressed channel ``g`` to attention channels ``[g c/c', (g+1) c/c')``,
       before the output projection.

    Args:
        dim: channels ``C``.
        num_heads: attention heads.
        window_size: window side (or ``(Wh, Ww)``).
        broaden_size: offset bound ``b`` in positions (Fig. 4); 0 turns Deformable Attention
            off (Table VII "Comp.1 -"), leaving plain window attention.
        offset_kernel_size: ``k`` of the offset network's convolution.
        deform: which features are read at the moved positions, one of
            :data:`DEFORMED_FEATURES`: ``'keys_values'`` (queries stay on the window grid) or
            ``'window'`` (queries, keys and values); see ``docs/eapt.md``.
        position_encoding: one of :data:`POSITION_ENCODINGS` (Table VIII; ``'none'`` is
            Table VII "Comp.3 -").
        feature_size: map size learned tables are built for (other sizes resample them).
        mcmd_widths: ``(c_x, c_y)`` of MCMD, in centre spacings.
        endec_channels: ``(c', c'')`` of the En-DeC module, or None to leave it out
            (Table VII "Comp.2 -").
        endec_kernel_size: En-DeC kernel (default ``3 * window``).
        endec_stride: En-DeC stride (default ``window``).
        endec_mode: ``'global'`` (encode repeatedly down to one cell, every position reaches every
            other) or ``'local'`` (encode once, the ``5 x 5`` strides around a position); see
            :class:`EnDeC`.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: Union[int, Tuple[int, int]] = 7,
            broaden_size: float = 4.,
            offset_kernel_size: int = 3,
            deform: str = 'keys_values',
            position_encoding: str = 'mcmd',
            feature_size: Tuple[int, int] = (56, 56),
            mcmd_widths: Tuple[float, float] = (1.0, 2.0),
            endec_channels: Optional[Tuple[int, int]] = None,
            endec_kernel_size: Optional[int] = None,
            endec_stride: Optional[int] = None,
            endec_mode: str = 'global',
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'{dim} channels do not split into {num_heads} heads')
        if broaden_size < 0:
            raise ValueError(f'broaden_size must be >= 0 (0 turns Deformable Attention off), got {broaden_size}')
        if deform not in DEFORMED_FEATURES:
            raise ValueError(f'deform {deform!r} is not one of {DEFORMED_FEATURES} (the features read at the '
                             'moved positions: keys and values only, or the whole window)')
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f'position_encoding {position_encoding!r} is not one of {POSITION_ENCODINGS}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = to_2tuple(window_size)
        self.broaden_size = float(broaden_size)
        self.deform = deform
        self.position_encoding = position_encoding
        self.fused_attn = use_fused_attn()
        self.attn_drop = attn_drop
        self.record_sampling = False  # keep the moved positions of the next forward in last_sampling
        self.last_sampling: Optional[Tuple[torch.Tensor, 'WindowGeometry']] = None

        if position_encoding == 'mcmd':
            self.position = MCMD(mcmd_widths)
        elif position_encoding == 'sinusoidal':
            self.position = SinusoidalEncoding()
        elif position_encoding == 'embedding':
            self.position = LearnedEmbedding(feature_size, dim)
        elif position_encoding == 'floater':
            self.position = FloaterEncoding(dim)
        else:
            self.position = None
        if position_encoding == 'relative':
            # displacements between a query and a key lie within window - 1 + ceil(b) per axis, or
            # window - 1 + ceil(2b) when both moved
            moving_ends = 2 if deform == 'window' else 1
            self.relative_extent = tuple(w - 1 + math.ceil(moving_ends * self.broaden_size) for w in self.window_size)
            self.rel_pos_table = nn.Parameter(torch.zeros(num_heads, *(2 * r + 1 for r in self.relative_extent)))
            trunc_normal_(self.rel_pos_table, std=.02)

        self.offset_net = WindowOffsetNetwork(dim, offset_kernel_size, self.broaden_size) if broaden_size > 0 else None
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if endec_channels is not None:
            window = max(self.window_size)
            self.endec = EnDeC(dim, endec_channels[0], endec_channels[1],
                               endec_kernel_size or 3 * window, endec_stride or window, endec_mode)
        else:
            self.endec = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def deformable(self) -> bool:
        """Whether features are read at moved positions (False with ``broaden_size`` 0)."""
        return self.offset_net is not None

    def recorded_points(self) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int], bool]:
        """The key positions ``C(l + o)`` recorded by the last forward with ``record_sampling``, on the map.

        Each window position ``l`` reads its key and value (with ``deform='window'`` its query
        too) at ``C(l + o)``; the positions are laid back on the stage's map, one group.

        Returns:
            ``(points, reference, feature_size, align_corners)``: ``(B, 1, H, W, 2)`` key positions
            and the positions ``l`` they moved from, ``(y, x)`` in ``[-1, 1]`` with
            ``align_corners=True`` over the ``feature_size`` map (the fields of
            :class:`~deformvit.SamplingPoints`).
        """
        if self.last_sampling is None:
            raise RuntimeError('no recorded key positions: run a forward pass with record_sampling on '
                               '(PyramidBackbone.forward_sampling_points does)')
        positions, geometry = self.last_sampling  # (B, nW, N, 2)
        (h, w), device = geometry.size, positions.device
        positions = geometry.reverse(positions.flatten(0, 1).view(-1, *geometry.window, 2))[:, :h, :w]  # (B, H, W, 2)
        scale = torch.tensor([max(h - 1, 1), max(w - 1, 1)], dtype=torch.float32, device=device)
        reference = _position_grid(h, w, device) / scale * 2 - 1
        points = (positions / scale * 2 - 1)[:, None]
        return points, reference.expand_as(points), (h, w), True

    def effective_window(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """The window used on a ``size`` map: a map smaller than the window is one window."""
        return tuple(min(w, s) for w, s in zip(self.window_size, size))

    def key_positions(self, windows: torch.Tensor, geometry: 'WindowGeometry') -> torch.Tensor:
        """Deformed, clamped key positions ``C(l + o)`` of Eq. (1)-(2) (query positions too with ``deform='window'``).

        Args:
            windows: ``(B*nW, Wh, Ww, C)`` window features.
            geometry: the windows' layout over the map.

        Returns:
            ``(B*nW, Wh*Ww, 2)`` float32 ``(y, x)`` positions in ``[0, H-1] x [0, W-1]``.
        """
        bnw, wh, ww, _ = windows.shape
        base = window_partition(_position_grid(*geometry.padded_size, windows.device)[None], (wh, ww))  # l: (nW, N, 2)
        offsets = self.offset_net(windows).view(-1, base.shape[0], wh * ww, 2)  # o: (B, nW, N, 2)
        limit = torch.tensor([geometry.size[0] - 1, geometry.size[1] - 1], device=windows.device, dtype=torch.float32)
        positions = torch.minimum(torch.clamp(base + offsets, min=0.), limit)  # C(l + o), 0-based
        return positions.view(bnw, wh * ww, 2)

    def _relative_bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Per-head bias of the query-key displacements, read from the table bilinearly.

        Args:
            query_positions: ``(B*nW, N, 2)`` query positions ``(y, x)`` in map coordinates.
            key_positions: ``(B*nW, N, 2)`` key positions ``(y, x)`` in map coordinates.

        Returns:
            ``(B*nW, heads, N, N)``.
        """
        # deformable_relative_position_bias reads the table at half the difference of its
        # arguments; scaling by 2 / extent puts a displacement of `extent` at the table edge
        scale = 2 / torch.tensor(self.relative_extent, device=key_positions.device, dtype=torch.float32)
        return deformable_relative_position_bias(self.rel_pos_table, query_positions * scale, key_positions * scale, 1)

    def _encode(self, x: torch.Tensor, geometry: 'WindowGeometry',
                amplitude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``f + P_f`` (Eq. (13)) for ``(B*nW, Wh, Ww, C)`` windows; padding stays zero.

        ``amplitude``: MCMD's ``a_ij`` per position, ``(B*nW, Wh, Ww, 1)``; None: the mean of ``x``.
        """
        (h, w), c = geometry.size, x.shape[-1]
        table = self.position.table(h, w, c, x.device, x.dtype)  # (H, W, C)
        table = geometry.partition(pad_to_multiple(table[None], geometry.window))  # (nW, Wh, Ww, C)
        windows = x.unflatten(0, (-1, table.shape[0]))  # (B, nW, Wh, Ww, C)
        if self.position.data_driven:  # MCMD: f + a_ij (G_x + G_y), with a_ij of Eq. (12)
            amplitude = windows.mean(dim=-1, keepdim=True) if amplitude is None else amplitude.view(
                windows.shape[:-1] + (1,))
            return torch.addcmul(windows, amplitude, table).flatten(0, 1)
        return (windows + table).flatten(0, 1)

    def forward(self, x: torch.Tensor, geometry: 'WindowGeometry',
                amplitude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B*nW, Wh, Ww, C)`` windows of a map laid out by ``geometry`` -> the same shape.

        ``amplitude``: MCMD's ``a_ij`` per position, ``(B*nW, Wh, Ww, 1)`` (:class:`EAPTBlock` says where
        it comes from); None: the mean of ``x`` over its channels.
        """
        bnw, wh, ww, c = x.shape
        heads, d, n = self.num_heads, self.head_dim, wh * ww
        num_windows = geometry.num_windows
        if geometry.is_padded:  # padding reads as zeros, as if padded after the norm
            x = (x.unflatten(0, (-1, num_windows)) * geometry.valid_mask(x.device, x.dtype)).flatten(0, 1)
        if self.position is not None:
            x = self._encode(x, geometry, amplitude)

        positions = None  # C(l + o), where `moved` is read
        moved = x.view(bnw, n, c)  # the features keys and values (and with deform='window' queries) come from
        if self.offset_net is not None:
            positions = self.key_positions(x, geometry)  # (B*nW, N, 2)
            if self.record_sampling:
                self.last_sampling = (positions.detach().unflatten(0, (-1, num_windows)), geometry)
            # Eq. (3): bilinear reads of the (unpadded) map at the clamped positions
            (h, w) = geometry.size
            spatial = geometry.reverse(x)[:, :h, :w].permute(0, 3, 1, 2)  # (B, C, H, W), channels-last memory
            scale = torch.tensor([max(h - 1, 1), max(w - 1, 1)], device=x.device, dtype=torch.float32)
            grid = (positions / scale * 2 - 1).flip(-1).view(-1, num_windows, n, 2)  # float32, (x, y) order
            moved = bilinear_grid_sample(spatial, grid, align_corners=True)  # (B, C, nW, N)
            moved = moved.permute(0, 2, 3, 1).reshape(bnw, n, c)
        # the query read at C(l + o) answers for l: the output stays on the window grid
        queries = moved if self.deform == 'window' else x.view(bnw, n, c)
        q = self.q(queries).view(bnw, n, heads, d).transpose(1, 2)  # (B*nW, N, C) -> (B*nW, heads, N, d)
        # (B*nW, N, 2C) -> 2 x (B*nW, heads, N, d)
        k, v = self.kv(moved).view(bnw, n, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)

        bias = None
        if geometry.is_padded:  # keys on padding are kept out of attention
            mask = window_region_mask(geometry.padded_size, geometry.size, geometry.window, (0, 0), x.device)
            bias = mask.to(q.dtype).repeat(bnw // num_windows, 1, 1)[:, None]  # (B*nW, 1, N, N)
        if self.position_encoding == 'relative':
            window_grid = window_partition(_position_grid(*geometry.padded_size, x.device)[None], geometry.window)
            window_grid = window_grid.repeat(bnw // num_windows, 1, 1)  # l: (nW, N, 2) -> (B*nW, N, 2)
            key_at = window_grid if positions is None else positions
            query_at = key_at if self.deform == 'window' else window_grid
            relative = self._relative_bias(query_at, key_at).to(q.dtype)
            bias = relative if bias is None else bias + relative

        out = attention(q, k, v, bias, self.attn_drop if self.training else 0., self.fused_attn)
        out = out.transpose(1, 2).reshape(bnw, wh, ww, c)  # (B*nW, heads, N, d) -> (B*nW, Wh, Ww, C)
        if self.endec is not None:
            (h, w) = geometry.size
            compressed = geometry.reverse(self.endec.compress(x))[:, :h, :w]  # V': (B, H, W, c')
            communication = geometry.partition(pad_to_multiple(self.endec.communicate(compressed), geometry.window))
            # each compressed channel is added to c / c' consecutive channels of the attention information
            out = (out.unflatten(-1, (communication.shape[-1], -1)) + communication[..., None]).flatten(-2)
        return self.proj_drop(self.proj(out))


class WindowGeometry(NamedTuple):
    """How a stage's ``(B, H, W, C)`` map is held as ``(B*nW, Wh, Ww, C)`` windows.

    A stage has no shifted windows, so it partitions its (padded) map once and every block
    works on the windows; attention modules use this to find positions, padding and the
    map layout for sampling and the En-DeC convolutions.
    """
    size: Tuple[int, int]
    window: Tuple[int, int]
    grid: Tuple[int, int]

    @classmethod
    def of(cls, size: Tuple[int, int], window: Tuple[int, int]) -> 'WindowGeometry':
        return cls(tuple(size), tuple(window), tuple(math.ceil(s / w) for s, w in zip(size, window)))

    @property
    def padded_size(self) -> Tuple[int, int]:
        return self.grid[0] * self.window[0], self.grid[1] * self.window[1]

    @property
    def num_windows(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def is_padded(self) -> bool:
        return self.padded_size != self.size

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hp, Wp, C)`` -> ``(B*nW, Wh, Ww, C)``."""
        return window_partition(x, self.window).view(-1, *self.window, x.shape[-1])

    def reverse(self, windows: torch.Tensor) -> torch.Tensor:
        """``(B*nW, Wh, Ww, C)`` -> ``(B, Hp, Wp, C)``."""
        return window_reverse(windows, self.grid)

    def valid_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(nW, Wh, Ww, 1)``: 1 on the map, 0 on padding."""
        valid = torch.zeros(1, *self.padded_size, 1, device=device, dtype=dtype)
        valid[:, :self.size[0], :self.size[1]] = 1
        return self.partition(valid)


# where MCMD's amplitude a_ij (Eq. (12)) is read: docs/eapt.md, "MCMD amplitude"
MCMD_AMPLITUDES = ('patches', 'input', 'normed')


def patch_means(images: torch.Tensor, stride: int) -> torch.Tensor:
    """The mean of each ``stride x stride`` patch of ``(B, C, H, W)`` images over its pixels and channels.

    Patches follow the stem and patch merging, which pad the bottom/right of a map that is not a
    multiple of the stride: a patch that overhangs the image averages its real pixels only.

    Returns:
        ``(B, ceil(H / stride), ceil(W / stride), 1)``: Eq. (12)'s ``a_ij`` of the stage of that stride.
    """
    h, w = images.shape[-2:]
    pad = (0, -w % stride, 0, -h % stride)
    sums = F.avg_pool2d(F.pad(images.mean(1, keepdim=True), pad), stride)
    share = F.avg_pool2d(F.pad(images.new_ones(1, 1, h, w), pad), stride)  # real pixels per patch / stride^2
    return (sums / share).permute(0, 2, 3, 1)


class EAPTBlock(PreNormBlock):
    """Pre-norm block (Table II) over a stage's windows: attention and MLP with residuals.

    ``amplitude`` says where MCMD's ``a_ij`` comes from (:data:`MCMD_AMPLITUDES`): ``'patches'``,
    the input image's patches the stage gives; ``'input'``, the mean of the block's input (the
    residual stream); ``'normed'``, the mean of the attention input ``norm1(x)``.
    """

    amplitude: str = 'patches'

    def forward(self, x: torch.Tensor, geometry: WindowGeometry,
                patch_amplitude: Optional[torch.Tensor] = None) -> torch.Tensor:
        amplitude = None  # 'normed': the attention takes the mean of its own input
        if self.amplitude == 'input':
            amplitude = x.mean(-1, keepdim=True)
        elif self.amplitude == 'patches':
            amplitude = patch_amplitude
        x = x + self.drop_path1(self.attn(self.norm1(x), geometry, amplitude))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class EAPTStage(nn.Module):
    """One pyramid stage (Table II): optional 2x2 patch merging, then ``depth`` blocks.

    Downsampling between stages follows Swin Transformer, which EAPT Sec. IV-A says the
    network structure follows: timm's ``PatchMerging`` (concatenate 2x2, LayerNorm, linear).

    Args:
        dim_in: channels entering the stage.
        dim: channels of the stage.
        depth: blocks.
        downsample: start with patch merging (stages 2-4).
        attn_kwargs: arguments of :class:`DeformableWindowAttention` shared by the blocks.
        mlp_ratio, proj_drop: block settings.
        drop_path: one stochastic depth rate per block.
        mcmd_amplitude: where the blocks read MCMD's amplitude (:class:`EAPTBlock`).
    """

    def __init__(
            self,
            dim_in: int,
            dim: int,
            depth: int,
            downsample: bool,
            attn_kwargs: Dict,
            mlp_ratio: float,
            proj_drop: float,
            drop_path: Sequence[float],
            mcmd_amplitude: str = 'patches',
    ):
        super().__init__()
        if mcmd_amplitude not in MCMD_AMPLITUDES:
            raise ValueError(f'mcmd_amplitude {mcmd_amplitude!r} is not one of {MCMD_AMPLITUDES}')
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim_in, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            EAPTBlock(dim, DeformableWindowAttention(dim, **attn_kwargs), mlp_ratio, proj_drop, drop_path[i])
            for i in range(depth)
        ])
        for block in self.blocks:
            block.amplitude = mcmd_amplitude

    def forward(self, x: torch.Tensor, patch_amplitude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, H, W, C_in)`` -> ``(B, H', W', C)``; the blocks run on windows partitioned once.

        ``patch_amplitude``: ``(B, H', W', 1)`` MCMD amplitudes of the stage's positions from the
        image (:func:`patch_means`), for blocks that read them there.
        """
        x = self.downsample(x)
        _, h, w, _ = x.shape
        geometry = WindowGeometry.of((h, w), self.blocks[0].attn.effective_window((h, w)))
        x = geometry.partition(pad_to_multiple(x, geometry.window))
        if patch_amplitude is not None:
            patch_amplitude = geometry.partition(pad_to_multiple(patch_amplitude.to(x.dtype), geometry.window))
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, geometry, patch_amplitude)
            else:
                x = block(x, geometry, patch_amplitude)
        x = geometry.reverse(x)
        return x[:, :h, :w].contiguous() if geometry.is_padded else x


class EAPT(PyramidBackbone):
    """Efficient Attention Pyramid Transformer (EAPT Sec. III, Sec. IV-A, Table II).

    A 4x4 patch embedding, four stages of :class:`DeformableWindowAttention` blocks with
    patch merging between them, and a pooled linear classifier (Fig. 2, Table II).

    Args:
        img_size, in_chans, num_classes, global_pool, patch_size, drop_rate, proj_drop_rate,
            attn_drop_rate, drop_path_rate: as in :class:`PyramidBackbone` (learned position
            tables are built for ``img_size`` and resampled for other sizes).
        embed_dims: ``dim`` of the four stages (Table II).
        depths: blocks per stage (Table II).
        num_heads: ``head`` per stage (Table II).
        endec_channels: ``(c', c'')`` per stage (Table II).
        use_endec: En-DeC on/off (Table VII Comp.2).
        broaden_size: offset bound ``b`` (Fig. 4; 4 in the paper, 0 turns Deformable
            Attention off, Table VII Comp.1), scalar or per stage.
        position_encoding: ``'mcmd'`` (the paper's), ``'sinusoidal'``, ``'embedding'``,
            ``'relative'``, ``'floater'`` (Table VIII) or ``'none'`` (Table VII Comp.3).
        mcmd_widths: ``(c_x, c_y)`` of MCMD in centre spacings.
        mcmd_amplitude: where MCMD's amplitude ``a_ij`` of Eq. (12) is read (``docs/eapt.md``):
            ``'patches'`` (the paper's: the mean of the input image's patch under each position),
            ``'input'`` (the block's input before its LayerNorm) or ``'normed'`` (the attention
            input, whose per-position mean a LayerNorm starts at zero).
        window_size: attention window, scalar or per stage (7 at 224, 12 at 384).
        offset_kernel_size: kernel of the offset network's convolution.
        deform: features read at the moved positions: ``'keys_values'`` (queries stay on the
            window grid, the default) or ``'window'`` (the whole window moves); see
            ``docs/eapt.md``, "Which features deform".
        endec_kernel_size: En-DeC kernel (default 3 windows), scalar or per stage.
        endec_stride: En-DeC stride (default one window), scalar or per stage.
        endec_mode: ``'global'`` (the default: En-DeC encodes down to one cell, so every
            position hears from every other) or ``'local'`` (one encoding, the module before
            global En-DeC, with its state-dict keys), scalar or per stage; see ``docs/eapt.md``.
        mlp_ratio: MLP expansion of every block, one number (not stated by the paper; the
            variants' defaults are fitted to the paper's counts: ``docs/eapt.md``, "MLP ratio").
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (3, 3, 10, 3),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            endec_channels: Sequence[Tuple[int, int]] = ((1, 2), (2, 4), (4, 8), (8, 16)),
            use_endec: bool = True,
            broaden_size: Union[float, Sequence[float]] = 4.,
            position_encoding: str = 'mcmd',
            mcmd_widths: Tuple[float, float] = (1.0, 2.0),
            mcmd_amplitude: str = 'patches',
            window_size: Union[int, Sequence[int]] = 7,
            offset_kernel_size: int = 3,
            deform: str = 'keys_values',
            endec_kernel_size: Union[Optional[int], Sequence[Optional[int]]] = None,
            endec_stride: Union[Optional[int], Sequence[Optional[int]]] = None,
            endec_mode: Union[str, Sequence[str]] = 'global',
            mlp_ratio: float = 4.,
            patch_size: int = 4,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        num_stages = len(embed_dims)
        for name, seq in (('depths', depths), ('num_heads', num_heads), ('endec_channels', endec_channels)):
            per_stage(list(seq), num_stages, name)
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f'position_encoding {position_encoding!r} is not one of {POSITION_ENCODINGS}')
        broaden_size = per_stage(broaden_size, num_stages, 'broaden_size')
        window_size = per_stage(window_size, num_stages, 'window_size')
        endec_kernel_size = per_stage(endec_kernel_size, num_stages, 'endec_kernel_size')
        endec_stride = per_stage(endec_stride, num_stages, 'endec_stride')
        endec_mode = per_stage(endec_mode, num_stages, 'endec_mode')

        super().__init__(img_size, in_chans, num_classes, global_pool, embed_dims, patch_size)
        self.stem = PatchEmbed(
            self.img_size, patch_size, in_chans, embed_dims[0], norm_layer=nn.LayerNorm, flatten=False,
            output_fmt='NHWC', strict_img_size=False, dynamic_img_pad=True)

        def make_stage(i: int, dim_in: int, dim: int, feature_size: Tuple[int, int], drop_path) -> EAPTStage:
            attn_kwargs = dict(
                num_heads=num_heads[i],
                window_size=window_size[i],
                broaden_size=broaden_size[i],
                offset_kernel_size=offset_kernel_size,
                deform=deform,
                position_encoding=position_encoding,
                feature_size=feature_size,
                mcmd_widths=mcmd_widths,
                endec_channels=tuple(endec_channels[i]) if use_endec else None,
                endec_kernel_size=endec_kernel_size[i],
                endec_stride=endec_stride[i],
                endec_mode=endec_mode[i],
                attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate,
            )
            return EAPTStage(dim_in, dim, depths[i], i > 0, attn_kwargs, mlp_ratio, proj_drop_rate, drop_path,
                             mcmd_amplitude)

        if mcmd_amplitude not in MCMD_AMPLITUDES:
            raise ValueError(f'mcmd_amplitude {mcmd_amplitude!r} is not one of {MCMD_AMPLITUDES}')
        self.patch_amplitudes = position_encoding == 'mcmd' and mcmd_amplitude == 'patches'
        self._build_stages(depths, drop_path_rate, make_stage)
        self._build_head(drop_rate)

    def _stage_inputs(self, images: torch.Tensor) -> List[tuple]:
        """Each stage's MCMD amplitudes from the image patches under its positions (with ``'patches'``)."""
        if not self.patch_amplitudes:
            return super()._stage_inputs(images)
        means = images.mean(1, keepdim=True)  # once per forward; patch_means of one channel pools it
        return [(patch_means(means, self.patch_size * 2 ** i),) for i in range(len(self.stages))]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: EAPT) -> Dict[str, torch.Tensor]:
    """Fit a saved EAPT state dict to ``model``.

    Unwraps ``'model'`` / ``'state_dict'`` and resizes size-dependent tables to the model's
    shapes: learned embeddings (bicubic over the map) and relative position tables (bicubic
    over the displacement range), so a checkpoint trained at one image size or window
    loads into another.
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if target is not None and value.shape != target.shape:
            if key.endswith('.pos_embed'):
                value = LearnedEmbedding.resample(value, tuple(target.shape[1:3]))
            elif key.endswith('.rel_pos_table'):
                value = resize_relative_position_table(value, tuple(target.shape[1:]))
        out[key] = value
    return out


EAPT.checkpoint_filter = staticmethod(checkpoint_filter_fn)
EAPT.no_decay_names = ('rel_pos_table', 'pos_embed', 'initial')


def _create_eapt(variant: str, pretrained: bool = False, **kwargs) -> EAPT:
    return build_pyramid(EAPT, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> Dict:
    return pyramid_cfg(
        first_conv='stem.proj', paper_name='EAPT: Efficient Attention Pyramid Transformer', **kwargs)


default_cfgs = generate_default_cfgs({
    'eapt_nano.untrained': _cfg(size=32),
    'eapt_small.untrained': _cfg(),
    'eapt_medium.untrained': _cfg(),
    'eapt_large.untrained': _cfg(),
    'eapt_medium_384.untrained': _cfg(size=384),
})


@register_model
def eapt_nano(pretrained: bool = False, **kwargs) -> EAPT:
    """A narrow EAPT for small images such as 32x32 digits: every component of EAPT-S, window 4,
    broaden size 2, widths (32, 64, 128, 256). Not from the paper."""
    model_args = dict(
        img_size=32, embed_dims=(32, 64, 128, 256), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
        endec_channels=((1, 2), (1, 2), (2, 4), (4, 8)), window_size=4, broaden_size=2., mlp_ratio=4.)
    return _create_eapt('eapt_nano', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def eapt_small(pretrained: bool = False, **kwargs) -> EAPT:
    """EAPT-S of Table II (Table III: 39M parameters, 6.5 GFLOPs at 224)."""
    model_args = dict(
        embed_dims=(96, 192, 384, 768), depths=(3, 3, 10, 3), num_heads=(3, 6, 12, 24),
        endec_channels=((1, 2), (2, 4), (4, 8), (8, 16)), mlp_ratio=MLP_RATIO_S)
    return _create_eapt('eapt_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def eapt_medium(pretrained: bool = False, **kwargs) -> EAPT:
    """EAPT-M of Table II (Table III: 107M parameters, 18.3 GFLOPs at 224)."""
    model_args = dict(
        embed_dims=(128, 256, 512, 1024), depths=(3, 3, 16, 3), num_heads=(4, 8, 16, 32),
        endec_channels=((2, 4), (4, 8), (8, 16), (16, 32)), mlp_ratio=MLP_RATIO_M)
    return _create_eapt('eapt_medium', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def eapt_large(pretrained: bool = False, **kwargs) -> EAPT:
    """EAPT-L of Table II (no Table III entry; Table V's HTC+++ sizes imply a 220-230M backbone)."""
    model_args = dict(
        embed_dims=(192, 384, 768, 1536), depths=(3, 3, 16, 3), num_heads=(6, 12, 24, 48),
        endec_channels=((4, 8), (8, 16), (16, 32), (32, 64)), mlp_ratio=MLP_RATIO_L)
    return _create_eapt('eapt_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def eapt_medium_384(pretrained: bool = False, **kwargs) -> EAPT:
    """EAPT-M at 384 with window 12 (Table III: 116M parameters, 53.6 GFLOPs)."""
    model_args = dict(
        img_size=384, embed_dims=(128, 256, 512, 1024), depths=(3, 3, 16, 3), num_heads=(4, 8, 16, 32),
        endec_channels=((2, 4), (4, 8), (8, 16), (16, 32)), mlp_ratio=MLP_RATIO_M, window_size=12)
    return _create_eapt('eapt_medium_384', pretrained=pretrained, **dict(model_args, **kwargs))
