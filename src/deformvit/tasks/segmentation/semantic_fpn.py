"""Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019), the decoder of
DAT Table 5's S-FPN rows, configured as mmsegmentation's.

An FPN of 256 channels on the four stages, then per level a chain of 3x3 conv-norm-ReLU layers
of 128 channels with 2x bilinear upsampling until stride 4 (one layer for P2 and P3, two for
P4, three for P5), summed.
"""
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork

from .segmentor import Decoder, conv_bn_relu

__all__ = ['SemanticFPNDecoder']


class SemanticFPNDecoder(Decoder):
    """FPN + per-level upsampling heads summed at the finest level (Kirillov et al. 2019, Fig. 3).

    Args:
        in_channels: channels of the backbone levels, finest first (strides ``strides``).
        strides: output strides of the levels; each level is upsampled to ``strides[0]``.
        channels: width of the upsampling heads and of the output (the paper's: 128).
        fpn_channels: FPN width (256).
    """
    default_channels = 128

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int = default_channels,
                 fpn_channels: int = 256):
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-5) for c in in_channels)  # nn.LayerNorm's eps
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            n_up = int(round(math.log2(stride / strides[0])))
            layers = []
            for k in range(max(1, n_up)):
                layers.append(conv_bn_relu(fpn_channels if k == 0 else channels, channels))
                if n_up:
                    layers.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = self.fpn({str(i): norm(f) for i, (norm, f) in enumerate(zip(self.norms, features))})
        out = None
        for head, level in zip(self.scale_heads, levels.values()):
            y = head(level)
            if out is None:
                out = y
            else:  # odd input sizes leave a level one pixel off after the 2x upsamplings
                out = out + (y if y.shape[-2:] == out.shape[-2:] else
                             F.interpolate(y, size=out.shape[-2:], mode='bilinear', align_corners=False))
        return out
