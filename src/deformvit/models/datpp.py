"""DAT++: Spatially Dynamic Vision Transformer with Deformable Attention.

Xia, Pan, Song, Li and Huang, arXiv:2309.01430 (2023). Implemented here, faithful to the
official release (LeapLabTHU/DAT, ``models/dat.py`` / ``models/nat.py`` at b580702 and
``models/dat_blocks.py`` at 2f31405) so that its checkpoints load by key:

* the deformable multi-head attention of DAT++ (:class:`DeformableAttentionPP`): an offset
  network with a per-stage kernel and stride, unscaled offsets clamped to the map
  (``offset_range_factor = -1``) and the deformable relative position bias read at the
  displacements between query pixels and deformed keys, with the release's own reference-grid
  and query-grid normalisations (``docs/datpp.md`` lists every quirk);
* neighborhood attention blocks (``'N'``, :class:`~deformvit.layers.neighborhood.NeighborhoodAttention2D`);
* the local perception unit (a residual 3x3 depthwise convolution before every block), the
  convolutional FFN (a residual 3x3 depthwise convolution on the hidden features) and the
  overlapping convolutional stem and downsampling layers;
* the released ``datpp_tiny`` / ``datpp_small`` / ``datpp_base`` / ``datpp_base_384`` models.

Feature maps are channels-last ``(B, H, W, C)`` inside the network; any input of at least
32x32 works (the stem and downsampling convolutions round sizes up, the position-bias tables
are read at normalised displacements, so their size never depends on the input's). Official
checkpoints (``{'model': state_dict}``) load through :func:`checkpoint_filter_fn`.
"""
import re
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from ..checkpoint import unwrap_state_dict
from ..layers import Mlp
from ..layers.mlp import lean_applies
from ..layers.neighborhood import NeighborhoodAttention2D
from ._pyramid import PyramidBackbone, build_pyramid, official_source, per_stage, pyramid_cfg
from .dat import DeformableAttention, OffsetNetwork, check_release_layout
from .dat import _official_key as dat_official_key

__all__ = ['DATPlusPlus', 'dense_level_norms']

BLOCK_TYPES = {
    'N': 'neighborhood attention (NAT, natten 0.14 semantics)',
    'D': 'deformable multi-head attention of the DAT++ release',
}


def release_reference_points(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Reference points of the DAT++ release, ``(i + 0.5) / (H - 1) * 2 - 1``.

    The release places the key grid at cell centres but normalises by ``H - 1`` (the
    ``align_corners=True`` convention of its sampler), so the grid sits half a pixel to the
    bottom-right and its last row and column lie outside ``[-1, 1]`` (clamped later). A grid of
    one row or column gives ``+inf`` there, which the clamp turns into ``+1``.

    Returns:
        ``(height, width, 2)`` float32 tensor of ``(y, x)``.
    """
    ys = torch.linspace(0.5, height - 0.5, height, device=device) / (height - 1.0) * 2 - 1
    xs = torch.linspace(0.5, width - 0.5, width, device=device) / (width - 1.0) * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack((grid_y, grid_x), dim=-1)


def release_query_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Query positions of the release's relative position bias, ``i / (H - 1) * 2 - 1``.

    Pixel centres in the ``align_corners=True`` convention. The release divides by zero on a
    one-pixel axis (NaN); here that axis' queries sit at ``0``, the centre of the range.

    Returns:
        ``(height, width, 2)`` float32 tensor of ``(y, x)``.
    """
    def axis(length: int) -> torch.Tensor:
        if length == 1:
            return torch.zeros(1, device=device)
        return torch.arange(length, device=device, dtype=torch.float32) / (length - 1.0) * 2 - 1

    grid_y, grid_x = torch.meshgrid(axis(height), axis(width), indexing='ij')
    return torch.stack((grid_y, grid_x), dim=-1)


class Stem(nn.Module):
    """Overlapping convolutional stem of DAT++: two 3x3 / stride-2 convolutions with LayerNorm
    and a GELU between them (``use_conv_patches`` of the release). Output is channels-last.

    Args:
        in_chans: input channels.
        dim: output channels (half of them after the first convolution).
    """

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1)
        self.norm1 = LayerNorm2d(dim // 2, eps=1e-5)  # nn.LayerNorm's eps, as the release
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, 2, 1)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))  # (B, 3, H, W) -> (B, C/2, H/2, W/2)
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))  # -> (B, H/4, W/4, C)


class Downsample(nn.Module):
    """3x3 / stride-2 convolution without bias, then LayerNorm (the release's ``down_projs``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C', ceil(H/2), ceil(W/2))
        return self.norm(x.permute(0, 2, 3, 1))


class ConvMlp(nn.Module):
    """Convolutional FFN of DAT++ (``TransformerMLPWithConv``): Linear, ``h + DWConv3x3(h)``,
    GELU, Linear, on channels-last maps.

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels.
        drop: dropout after the first and second linear layers.

    ``lean`` (class attribute, default True): in training, keep only the input and ``fc1``'s
    output for backward and recompute the convolution and the GELU there (:class:`_LeanConvMlp`),
    as :class:`deformvit.layers.Mlp` does for its GELU: autograd would keep three hidden-size
    maps per block. Values and gradients are the plain path's, which runs where the lean one
    cannot (dropout between the layers, autocast, half precision, hooks, tracing).
    """

    lean = True

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.drop1 = nn.Dropout(drop)
        self.dwc = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if lean_applies(self, x, (self.fc1, self.dwc, self.act, self.fc2)):
            return self.drop2(_LeanConvMlp.apply(x, self.fc1.weight, self.fc1.bias, self.dwc.weight, self.dwc.bias,
                                                 self.fc2.weight, self.fc2.bias))
        x = self.drop1(self.fc1(x))
        x = x + self.dwc(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv on (B, C4, H, W)
        return self.drop2(self.fc2(self.act(x)))


def _depthwise(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h + DWConv3x3(h)`` of :class:`ConvMlp` on a channels-last ``(B, H, W, C4)`` map."""
    conv = F.conv2d(hidden.permute(0, 3, 1, 2), weight, bias, 1, 1, 1, weight.shape[0])
    return hidden + conv.permute(0, 2, 3, 1)


class _LeanConvMlp(torch.autograd.Function):
    """``fc2(gelu(a + DWConv(a)))``, ``a = fc1(x)``, keeping ``x`` and ``a`` for backward only.

    Backward recomputes ``z = a + DWConv(a)`` and ``gelu(z)``, then takes the chain rule by
    hand: ``dW2 = dY^T gelu(z)``, ``dZ = gelu'(z) * dY W2``, the convolution's gradients from
    ``dZ`` (``torch.ops.aten.convolution_backward``), ``dA = dZ + DWConv^T(dZ)``, ``dW1 = dA^T x``
    and ``dX = dA W1``: autograd's gradients of the plain path (tests/test_fast_paths.py).
    """

    @staticmethod
    def forward(ctx, x, weight1, bias1, conv_weight, conv_bias, weight2, bias2):
        hidden = F.linear(x, weight1, bias1)
        out = F.linear(F.gelu(_depthwise(hidden, conv_weight, conv_bias)), weight2, bias2)
        ctx.save_for_backward(x, hidden, weight1, conv_weight, conv_bias, weight2)
        ctx.has_bias = (bias1 is not None, conv_bias is not None, bias2 is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, weight1, conv_weight, conv_bias, weight2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_cw, need_cb, need_w2, need_b2 = ctx.needs_input_grad
        channels = hidden.shape[-1]
        mixed = _depthwise(hidden, conv_weight, conv_bias)  # z, recomputed
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w2 = grad_out.t().mm(F.gelu(mixed.view(-1, channels))) if need_w2 else None
        grad_b2 = grad_out.sum(0) if need_b2 and ctx.has_bias[2] else None
        grad_mixed = grad_out.mm(weight2)
        torch.ops.aten.gelu_backward.grad_input(grad_mixed, mixed.view(-1, channels), grad_input=grad_mixed)
        del mixed
        grad_mixed = grad_mixed.view(hidden.shape)
        grad_conv_in, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
            grad_mixed.permute(0, 3, 1, 2), hidden.permute(0, 3, 1, 2), conv_weight,
            [channels] if ctx.has_bias[1] else None, [1, 1], [1, 1], [1, 1], False, [0, 0], channels,
            [True, need_cw, need_cb and ctx.has_bias[1]])
        grad_hidden = grad_conv_in.permute(0, 2, 3, 1).add_(grad_mixed).reshape(-1, channels)  # dA = dZ + DWConv^T dZ
        del grad_mixed, grad_conv_in
        grad_w1 = grad_hidden.t().mm(x.reshape(-1, x.shape[-1])) if need_w1 else None
        grad_b1 = grad_hidden.sum(0) if need_b1 and ctx.has_bias[0] else None
        grad_x = grad_hidden.mm(weight1).view(x.shape) if need_x else None
        return grad_x, grad_w1, grad_b1, grad_cw, grad_cb, grad_w2, grad_b2


class NeighborhoodAttentionNHWC(NeighborhoodAttention2D):
    """:class:`~deformvit.layers.neighborhood.NeighborhoodAttention2D` on channels-last maps
    (same parameters, so the release's ``'N'`` blocks load by key)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C) in and out


class DeformableAttentionPP(DeformableAttention):
    """Deformable multi-head attention as released with DAT++ (``DAttentionBaseline``): DAT's
    :class:`~deformvit.models.dat.DeformableAttention` with the release's offset network, point
    ranges and grids.

    The queries ``q = x W_q`` of each offset group feed the offset network, which gives one
    offset per cell of a stride-``r`` key grid; keys and values are projected from ``x``
    sampled bilinearly (``align_corners=True``) at the deformed points. With
    ``offset_range_factor < 0`` (all released models) the offsets are used as they come and
    the points are clamped to ``[-1, 1]``; with ``s >= 0`` they are ``s * tanh(.)`` times
    ``1 / (Hk - 1)`` and not clamped. The references are :func:`release_reference_points`;
    the logits get the relative position bias read bilinearly from a ``(heads, 2H0-1, 2W0-1)``
    table at half the normalised displacement between each query pixel
    (:func:`release_query_grid`) and each deformed key.

    Args:
        dim: channels ``C``.
        num_heads: heads, a multiple of ``n_groups``.
        n_groups: offset groups ``G``.
        table_size: ``(H0, W0)``, the stage's map size at the release's ``img_size`` (224 for
            every released model, 384 included): the bias table's size.
        offset_range_factor: ``s``; negative means unscaled offsets and clamped points.
        offset_kernel_size: ``k`` of the offset network's depthwise convolution.
        offset_stride: ``r``, the key grid's stride.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            n_groups: int,
            table_size: Tuple[int, int],
            offset_range_factor: float = -1.,
            offset_kernel_size: int = 3,
            offset_stride: int = 1,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        if num_heads % n_groups or dim % num_heads:
            raise ValueError(f'{dim} channels, {num_heads} heads, {n_groups} groups: channels must divide by '
                             'heads and heads by groups')
        super().__init__(dim, num_heads, n_groups, table_size, None, offset_kernel_size, offset_stride,
                         attn_drop=attn_drop, proj_drop=proj_drop, sample_align_corners=True)
        self.offset_range_factor = offset_range_factor
        # the release pads the depthwise convolution by k // 2, or not at all when k equals the stride
        padding = 0 if offset_kernel_size == offset_stride else offset_kernel_size // 2
        self.offset_net = OffsetNetwork(self.group_channels, offset_kernel_size, offset_stride, padding)

    query_points = staticmethod(release_query_grid)

    def recorded_points(self) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int], bool]:
        """As DAT's, with the references clamped to ``[-1, 1]`` (the release's own lie outside it)."""
        points, reference, feature_size, align_corners = super().recorded_points()
        return points, reference.clamp(-1., 1.), feature_size, align_corners

    def sampling_points(self, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deformed key points and their references from the queries ``(B, H, W, C)``.

        Returns:
            ``(points, reference)``: ``(B*G, Hk, Wk, 2)`` and ``(Hk, Wk, 2)``, ``(y, x)``, float32.
        """
        b, h, w, _ = q.shape
        # (B, H, W, C) -> (B*G, C/G, H, W) -> (B*G, 2, Hk, Wk) -> (B*G, Hk, Wk, 2)
        q_groups = q.permute(0, 3, 1, 2).reshape(b * self.n_groups, self.group_channels, h, w)
        offset = self.offset_net(q_groups).permute(0, 2, 3, 1).float()
        hk, wk = offset.shape[1:3]
        reference = release_reference_points(hk, wk, q.device)
        if self.offset_range_factor >= 0:
            offset_range = torch.tensor([1.0 / (hk - 1.0), 1.0 / (wk - 1.0)], device=q.device)
            return reference + offset.tanh() * offset_range * self.offset_range_factor, reference
        return (reference + offset).clamp(-1., 1.), reference


class DATPlusPlusBlock(nn.Module):
    """One DAT++ block: ``x + LPU(x)``, then pre-norm attention and convolutional FFN residuals,
    both with the same stochastic-depth rate.

    Args:
        dim: channels.
        attn: attention module on channels-last maps.
        mlp_ratio: FFN expansion.
        proj_drop: dropout in the FFN.
        drop_path: stochastic depth rate.
        use_lpu: add the local perception unit (3x3 depthwise convolution).
        use_dwc_mlp: convolutional FFN (else Linear-GELU-Linear).
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4., proj_drop: float = 0.,
                 drop_path: float = 0., use_lpu: bool = True, use_dwc_mlp: bool = True):
        super().__init__()
        self.lpu = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim) if use_lpu else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        if use_dwc_mlp:
            self.mlp = ConvMlp(dim, hidden, proj_drop)
        else:
            self.mlp = Mlp(dim, hidden, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lpu is not None:
            x = x + self.lpu(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv on (B, C, H, W)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DATPlusPlusStage(nn.Module):
    """Optional stride-2 :class:`Downsample`, then one block per letter of ``spec``.

    Args:
        dim_in: channels entering the stage.
        dim: channels of the stage.
        spec: one letter per block (:data:`BLOCK_TYPES`).
        downsample: start with a :class:`Downsample` (stages 2-4).
        num_heads, n_groups, table_size, offset_range_factor, offset_kernel_size, offset_stride:
            see :class:`DeformableAttentionPP`.
        nat_kernel_size: window of the ``'N'`` blocks.
        use_lpu, use_dwc_mlp, mlp_ratio: see :class:`DATPlusPlusBlock`.
        proj_drop, attn_drop: dropouts.
        drop_path: one stochastic depth rate per block.
    """

    def __init__(self, dim_in: int, dim: int, spec: str, downsample: bool, num_heads: int, n_groups: int,
                 table_size: Tuple[int, int], offset_range_factor: float, offset_kernel_size: int,
                 offset_stride: int, nat_kernel_size: int, use_lpu: bool, use_dwc_mlp: bool, mlp_ratio: float,
                 proj_drop: float, attn_drop: float, drop_path: Sequence[float]):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim_in, dim) if downsample else nn.Identity()

        def make_attention(kind: str) -> nn.Module:
            if kind == 'N':
                return NeighborhoodAttentionNHWC(dim, nat_kernel_size, num_heads, attn_drop, proj_drop)
            return DeformableAttentionPP(dim, num_heads, n_groups, table_size, offset_range_factor,
                                         offset_kernel_size, offset_stride, attn_drop, proj_drop)

        self.blocks = nn.Sequential(*[
            DATPlusPlusBlock(dim, make_attention(kind), mlp_ratio, proj_drop, drop_path[i], use_lpu, use_dwc_mlp)
            for i, kind in enumerate(spec)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DATPlusPlus(PyramidBackbone):
    """DAT++ (Xia et al. 2023): a four-stage pyramid of neighborhood (``'N'``) and deformable
    (``'D'``) attention blocks with local perception units, convolutional FFNs and an
    overlapping convolutional stem.

    Args:
        img_size, in_chans, num_classes, global_pool, drop_rate, proj_drop_rate,
            attn_drop_rate, drop_path_rate: as in :class:`PyramidBackbone`. ``img_size`` sizes
            the deformable blocks' bias tables (``img_size // 4 // 2**i`` per stage, as in the
            release; every released model, 384 included, uses 224); any input size works.
        embed_dims: channels of the four stages (the stem outputs ``embed_dims[0]``).
        stage_spec: one string per stage, a letter per block (:data:`BLOCK_TYPES`).
        num_heads: heads per stage.
        groups: offset groups per stage.
        offset_range_factor: per stage; negative (the release's ``-1``) gives unscaled, clamped offsets.
        offset_kernel_size: offset-network kernel per stage (the release's ``ksizes``).
        offset_stride: key-grid stride per stage (the release's ``strides``).
        nat_kernel_size: neighborhood window per stage (``nat_ksizes``).
        use_lpu: local perception units, per stage.
        use_dwc_mlp: convolutional FFNs, per stage.
        mlp_ratio: FFN expansion (``expansion``).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            stage_spec: Sequence[str] = ('ND', 'NDND', 'ND' * 9, 'DD'),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            groups: Sequence[int] = (1, 2, 4, 8),
            offset_range_factor: Union[float, Sequence[float]] = -1.,
            offset_kernel_size: Sequence[int] = (9, 7, 5, 3),
            offset_stride: Sequence[int] = (8, 4, 2, 1),
            nat_kernel_size: Union[int, Sequence[int]] = 7,
            use_lpu: Union[bool, Sequence[bool]] = True,
            use_dwc_mlp: Union[bool, Sequence[bool]] = True,
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        num_stages = len(embed_dims)
        stage_spec = [''.join(spec) for spec in per_stage(list(stage_spec), num_stages, 'stage_spec')]
        for spec in stage_spec:
            if not spec or set(spec) - set(BLOCK_TYPES):
                raise ValueError(f'stage_spec entry {spec!r} must be a non-empty string of {sorted(BLOCK_TYPES)}')
        num_heads = per_stage(list(num_heads), num_stages, 'num_heads')
        groups = per_stage(list(groups), num_stages, 'groups')
        offset_range_factor = per_stage(offset_range_factor, num_stages, 'offset_range_factor')
        offset_kernel_size = per_stage(list(offset_kernel_size), num_stages, 'offset_kernel_size')
        offset_stride = per_stage(list(offset_stride), num_stages, 'offset_stride')
        nat_kernel_size = per_stage(nat_kernel_size, num_stages, 'nat_kernel_size')
        use_lpu = per_stage(use_lpu, num_stages, 'use_lpu')
        use_dwc_mlp = per_stage(use_dwc_mlp, num_stages, 'use_dwc_mlp')

        super().__init__(img_size, in_chans, num_classes, global_pool, embed_dims, 4)
        self.stage_spec = tuple(stage_spec)
        self.stem = Stem(in_chans, embed_dims[0])

        def make_stage(i: int, dim_in: int, dim: int, feature_size: Tuple[int, int], drop_path) -> DATPlusPlusStage:
            table_size = tuple(s // self.patch_size // 2 ** i for s in self.img_size)  # floor, as the release
            return DATPlusPlusStage(
                dim_in, dim, stage_spec[i], i > 0, num_heads[i], groups[i], table_size, offset_range_factor[i],
                offset_kernel_size[i], offset_stride[i], nat_kernel_size[i], use_lpu[i], use_dwc_mlp[i],
                mlp_ratio, proj_drop_rate, attn_drop_rate, drop_path)

        self._build_stages([len(spec) for spec in stage_spec], drop_path_rate, make_stage)
        self._build_head(drop_rate)


def _official_key(key: str) -> Optional[str]:
    """Map one key of the DAT++ release layout to ours (None: a derived buffer, dropped).

    The release keeps DAT's names (down-projections, layer norms, offset networks, classifier:
    :func:`deformvit.models.dat._official_key`); its own are the two-convolution stem, the local
    perception units, the convolutional FFN and the position table read at deformed points.
    """
    parts = key.split('.')
    if parts[0] == 'patch_proj':
        return {'0': 'stem.conv1.', '1': 'stem.norm1.', '3': 'stem.conv2.', '4': 'stem.norm2.'}[parts[1]] + parts[-1]
    if parts[0] == 'stages' and len(parts) > 4:
        stage, kind, index, rest = parts[1], parts[2], int(parts[3]), parts[4:]
        if kind == 'local_perception_units':
            return f'stages.{stage}.blocks.{index}.lpu.{rest[-1]}'
        if kind == 'mlps':
            layer = {'linear1': 'fc1', 'linear2': 'fc2', 'dwc': 'dwc', 'chunk': None}[rest[0]]
            if layer is None:  # plain MLP: chunk.linear1 / chunk.linear2
                layer = {'linear1': 'fc1', 'linear2': 'fc2'}[rest[1]]
            return f'stages.{stage}.blocks.{index}.mlp.{layer}.{rest[-1]}'
        if kind == 'attns' and rest[0] == 'rpe_table':
            return f'stages.{stage}.blocks.{index}.attn.rel_pos_table'
    return dat_official_key(key)


# the backbone of a detection / segmentation checkpoint (mmdetection, mmsegmentation, deformvit's own)
DENSE_PREFIX = 'backbone.'
# per-level output norms: the official dense backbone's LayerNormProxy (``norms.i.norm.*``) and
# deformvit's PyramidFeatures / Semantic FPN LayerNorm2d (``norms.i.*``)
_LEVEL_NORM = re.compile(r'^norms\.(\d+)\.(?:norm\.)?(weight|bias)$')
# where a deformvit detector / segmentor keeps the backbone's own weights, under ``backbone.``
_BODY_PREFIXES = ('body.model.', 'body.', 'model.')
_STEMS = ('patch_proj.0.weight', 'stem.conv1.weight')  # official layout, ours


def _split_dense(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], bool]:
    """``(backbone, level_norms, dense)`` of a state dict.

    A dense-prediction state dict (any ``backbone.`` key) gives its ``backbone.`` part without
    the prefix (and without the ``body.`` / ``model.`` wrappers of deformvit's own detectors and
    segmentors, whose FPN ``fpn.*`` is dropped), the per-level output norms apart as
    ``norms.{i}.{weight,bias}``, and ``dense=True``; neck and head keys are dropped. Any other
    state dict is returned as it is.
    """
    if not any(key.startswith(DENSE_PREFIX) for key in state_dict):
        return state_dict, {}, False
    backbone, level_norms = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(DENSE_PREFIX):
            continue  # neck.*, rpn_head.*, roi_head.*, bbox_head.*, decode_head.*, auxiliary_head.*, ...
        key = key[len(DENSE_PREFIX):]
        match = _LEVEL_NORM.match(key)
        if match:
            level_norms[f'norms.{match.group(1)}.{match.group(2)}'] = value
            continue
        key = next((key[len(p):] for p in _BODY_PREFIXES if key.startswith(p)), key)
        if not key.startswith('fpn.'):
            backbone[key] = value
    return backbone, level_norms, True


def dense_level_norms(checkpoint: Dict, stages: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """The per-level output norms of a detection / segmentation checkpoint, in deformvit's layout.

    The official DAT++ dense backbones (LeapLabTHU DAT-Detection / DAT-Segmentation, ``DAT`` in
    ``models/backbones/dat.py``) LayerNorm every stage output before the neck:
    ``backbone.norms.{i}.norm.{weight,bias}`` for stage ``i``. They are not weights of the
    classification backbone; in deformvit they are the LayerNorm2d of each level in
    :class:`~deformvit.tasks.necks.PyramidFeatures` (``norms.{j}``, under ``backbone.`` in a
    detector) and in the Semantic FPN decoder (``decoder.norms.{j}``), numbered by the
    backbone's outputs, not its stages: a RetinaNet reads stages 1-3 as levels 0-2.

    Args:
        checkpoint: the file's top-level dict (``{'state_dict': ...}``) or its state dict.
        stages: the stage of each output level (``[1, 2, 3]`` for strides 8-32); None: level ``i``
            is stage ``i``.

    Returns:
        ``{'norms.{j}.weight': ..., 'norms.{j}.bias': ...}`` (empty when there are none), e.g.
        ``detector.backbone.load_state_dict(dense_level_norms(ckpt, stages), strict=False)``.

    Raises:
        KeyError: the checkpoint has norms but none for one of ``stages``.
    """
    norms = _split_dense(unwrap_state_dict(checkpoint))[1]
    if not norms or stages is None:
        return norms
    return {f'norms.{level}.{p}': norms[f'norms.{stage}.{p}'] for level, stage in enumerate(stages)
            for p in ('weight', 'bias')}


def _key_summary(state_dict: Dict[str, torch.Tensor]) -> str:
    prefixes = sorted({key.split('.')[0] + '.*' for key in state_dict})
    return ', '.join(prefixes[:8]) + (' ...' if len(prefixes) > 8 else '') if prefixes else 'no tensors'


def _check_datpp_backbone(backbone: Dict[str, torch.Tensor], original: Dict[str, torch.Tensor],
                          model: nn.Module) -> None:
    """Refuse a state dict without DAT++ backbone weights, or another release's or size's
    (:func:`~deformvit.models.dat.check_release_layout`), naming what was expected."""
    check_release_layout(model, backbone, 'this checkpoint')
    if not any(k in backbone for k in _STEMS):
        raise ValueError(
            'no DAT++ backbone weights in this checkpoint: expected patch_proj.0.weight (official DAT++ '
            'classification release, {"model": state_dict}), backbone.patch_proj.0.weight (official DAT++ '
            'detection / segmentation checkpoint, {"state_dict": state_dict}) or stem.conv1.weight (deformvit); '
            f'it holds {_key_summary(original)}')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DATPlusPlus) -> Dict[str, torch.Tensor]:
    """Convert a DAT++ release state dict (or ours) to this model's layout.

    Unwraps ``'model'`` / ``'state_dict'``, drops derived buffers, renames keys and turns the
    release's 1x1-convolution projections into linear weights. Detection and segmentation
    checkpoints (official mmdetection / mmsegmentation ones, or deformvit's) give their
    ``backbone.`` part; their neck and head keys are dropped, and so are the per-level output
    norms ``backbone.norms.{i}.norm.*`` (with a warning: they belong to the neck,
    :func:`dense_level_norms`). Such a file has no classifier norm: the model keeps its own.

    Raises:
        ValueError: the state dict holds no DAT++ backbone (only neck / head keys, another
            model's) or is a DAT (v1) one.
    """
    original = unwrap_state_dict(state_dict)
    state_dict, level_norms, dense = _split_dense(original)
    _check_datpp_backbone(state_dict, original, model)
    own = model.state_dict()
    official = 'patch_proj.0.weight' in state_dict or 'cls_head.weight' in state_dict
    out = {}
    for key, value in state_dict.items():
        if official:
            key = _official_key(key)
            if key is None:
                continue
        target = own.get(key)
        if target is not None and value.ndim == 4 and target.ndim == 2 and value.shape[2:] == (1, 1):
            value = value.flatten(1)  # 1x1 conv (C_out, C_in, 1, 1) -> linear (C_out, C_in)
        out[key] = value
    if dense:
        for key in ('norm.weight', 'norm.bias'):  # the classifier's norm, not part of a dense backbone
            if key in own and key not in out:
                out[key] = own[key]
    if level_norms:
        levels = ','.join(str(i) for i in sorted({int(k.split('.')[1]) for k in level_norms}))
        warnings.warn(
            f'the per-level output norms of this detection / segmentation checkpoint (backbone.norms.{{{levels}}}) '
            'are not backbone weights and were not loaded: they are the level LayerNorms of the neck '
            '(PyramidFeatures.norms); read them with deformvit.models.datpp.dense_level_norms', stacklevel=2)
    return out


DATPlusPlus.checkpoint_filter = staticmethod(checkpoint_filter_fn)
DATPlusPlus.check_weights_layout = check_release_layout
DATPlusPlus.no_decay_names = ('rel_pos_table', 'rpb')


def _create_datpp(variant: str, pretrained: bool = False, **kwargs) -> DATPlusPlus:
    return build_pyramid(DATPlusPlus, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> Dict:
    return pyramid_cfg(
        first_conv='stem.conv1', paper_ids='arXiv:2309.01430',
        paper_name='DAT++: Spatially Dynamic Vision Transformer with Deformable Attention', **kwargs)


default_cfgs = generate_default_cfgs({
    # the official DAT++ release; top-1 as its README reports it
    'datpp_tiny.in1k': _cfg(**official_source('14c5ddae10b642e68089', 83.9, 'DAT++')),
    'datpp_small.in1k': _cfg(**official_source('4c2a76360c964fbd81d5', 84.6, 'DAT++')),
    'datpp_base.in1k': _cfg(**official_source('8e30492404d348d89f25', 84.9, 'DAT++')),
    'datpp_base_384.in1k': _cfg(size=384, **official_source('032dc804cdf44bf18bb5', 85.9, 'DAT++')),
})

_STAGE_SPEC = ('ND', 'NDND', 'ND' * 9, 'DD')
_BASE_ARGS = dict(  # datpp_base and datpp_base_384
    embed_dims=(128, 256, 512, 1024), stage_spec=_STAGE_SPEC, num_heads=(4, 8, 16, 32), groups=(2, 4, 8, 16))


@register_model
def datpp_tiny(pretrained: bool = False, **kwargs) -> DATPlusPlus:
    """DAT-T++: 23.96M parameters, 4.3 GFLOPs at 224."""
    model_args = dict(
        embed_dims=(64, 128, 256, 512), stage_spec=_STAGE_SPEC, num_heads=(2, 4, 8, 16), groups=(1, 2, 4, 8))
    return _create_datpp('datpp_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def datpp_small(pretrained: bool = False, **kwargs) -> DATPlusPlus:
    """DAT-S++: 53.13M parameters, 9.4 GFLOPs at 224."""
    model_args = dict(
        embed_dims=(96, 192, 384, 768), stage_spec=_STAGE_SPEC, num_heads=(3, 6, 12, 24), groups=(1, 2, 3, 6))
    return _create_datpp('datpp_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def datpp_base(pretrained: bool = False, **kwargs) -> DATPlusPlus:
    """DAT-B++: 93.69M parameters at 224."""
    return _create_datpp('datpp_base', pretrained=pretrained, **dict(_BASE_ARGS, **kwargs))


@register_model
def datpp_base_384(pretrained: bool = False, **kwargs) -> DATPlusPlus:
    """DAT-B++ fine-tuned at 384: the architecture of ``datpp_base``, tables kept at ``img_size`` 224."""
    return _create_datpp('datpp_base_384', pretrained=pretrained, **dict(_BASE_ARGS, **kwargs))
