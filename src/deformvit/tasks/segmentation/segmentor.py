"""The segmentor every decoder of :mod:`deformvit.tasks.segmentation` runs in.

A ``features_only`` backbone, a decoder that fuses its four levels, dropout and a 1x1
classifier, and bilinear upsampling of the logits to the input size; optionally
mmsegmentation's auxiliary FCN head on the third level (training only). In training mode with
an auxiliary head, ``forward`` returns ``{'out': logits, 'aux': aux_logits}``; otherwise the
logits tensor.
"""
from typing import Callable, Dict, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Decoder', 'Segmentor', 'conv_bn_relu']


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True))


class Decoder(nn.Module):
    """A decoder fusing the backbone's levels (finest first) into one map of ``out_channels``.

    Subclasses take ``(in_channels, strides, channels, fpn_channels)`` and set the class
    attributes ``default_channels`` (their width when ``channels`` is None) and
    ``auxiliary_head`` (whether mmsegmentation trains them with the auxiliary FCN head).
    """
    default_channels: int = 256
    auxiliary_head: bool = False
    out_channels: int


class Segmentor(nn.Module):
    """Backbone -> decoder -> dropout + 1x1 classifier -> bilinear upsampling to the input size.

    Args:
        backbone: ``features_only`` model returning four levels (strides 4-32).
        decoder: a :class:`Decoder` over the backbone's levels.
        num_classes: classes predicted per pixel.
        auxiliary_head: add the FCN head on the third level (256 channels; training only).
        dropout: dropout before the classifier (0.1).
    """

    def __init__(self, backbone: nn.Module, decoder: Decoder, num_classes: int, auxiliary_head: bool = False,
                 dropout: float = 0.1):
        super().__init__()
        in_channels = backbone.feature_info.channels()
        self.backbone = backbone
        self.decoder = decoder
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(decoder.out_channels, num_classes, 1))
        self.auxiliary = nn.Sequential(
            conv_bn_relu(in_channels[2], 256), nn.Dropout2d(dropout), nn.Conv2d(256, num_classes, 1),
        ) if auxiliary_head else None
        self.num_classes = num_classes

    def decode(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Logits at ``size`` from the backbone's levels."""
        return F.interpolate(self.classifier(self.decoder(features)), size=tuple(size), mode='bilinear',
                             align_corners=False)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        size = x.shape[-2:]
        features = self.backbone(x)
        logits = self.decode(features, size)
        if self.auxiliary is None or not self.training:
            return logits
        aux = F.interpolate(self.auxiliary(features[2]), size=size, mode='bilinear', align_corners=False)
        return {'out': logits, 'aux': aux}

    def cost_parts(self, x: torch.Tensor) -> Dict[str, Callable]:
        """The computations of one inference pass on ``x``, as mmsegmentation's ``get_flops`` counts the
        segmentors of DAT Table 5: ``{'backbone', 'head'}`` (decoder, classifier and upsampling), each a
        function of no arguments; the auxiliary head is training only and not part of either."""
        features = self.backbone(x)
        return dict(backbone=lambda: self.backbone(x), head=lambda: self.decode(features, x.shape[-2:]))
