"""Semantic FPN and UperNet on any deformvit (or timm) backbone.

The two decoders of DAT Table 5 (EAPT Table VI uses UperNet), configured as
mmsegmentation's, which the papers use:

- Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019): an FPN of
  256 channels on the four stages, then per level a chain of 3x3 conv-norm-ReLU layers of 128
  channels with 2x bilinear upsampling until stride 4 (one layer for P2 and P3, two for P4,
  three for P5), summed, and a 1x1 classifier.
- UperNet (Xiao et al., "Unified Perceptual Parsing", ECCV 2018): pyramid pooling (scales 1,
  2, 3, 6) on the last stage, an FPN of 512 channels, the four levels fused at stride 4, and
  a 1x1 classifier; plus the auxiliary FCN head on stage 3 (256 channels, loss weight 0.4)
  used during training. The decoder is segmentation_models_pytorch's ``UPerNetDecoder``.

Logits are upsampled bilinearly to the input size. In training mode with an auxiliary head,
``forward`` returns ``{'out': logits, 'aux': aux_logits}``; otherwise the logits tensor.
"""
import math
from typing import Dict, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from timm.layers import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork

from .necks import create_backbone

__all__ = ['DECODERS', 'SemanticFPNDecoder', 'Segmentor', 'build_segmentor']

DECODERS = ('semantic_fpn', 'upernet')


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True))


class SemanticFPNDecoder(nn.Module):
    """FPN + per-level upsampling heads summed at the finest level (Kirillov et al. 2019, Fig. 3).

    Args:
        in_channels: channels of the backbone levels, finest first (strides ``strides``).
        strides: output strides of the levels; each level is upsampled to ``strides[0]``.
        fpn_channels: FPN width (256).
        channels: width of the upsampling heads and of the output (128).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], fpn_channels: int = 256,
                 channels: int = 128):
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in in_channels)
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            n_up = int(round(math.log2(stride / strides[0])))
            layers = []
            for k in range(max(1, n_up)):
                layers.append(_conv_bn_relu(fpn_channels if k == 0 else channels, channels))
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


class _UPerNet(nn.Module):
    """segmentation_models_pytorch's UPerNet decoder over four backbone levels."""

    def __init__(self, in_channels: Sequence[int], channels: int = 512):
        super().__init__()
        # the decoder reads levels [stride 1, 2, 4, 8, 16, 32] and skips the first two
        self.decoder = UPerNetDecoder([0, 0, *in_channels], encoder_depth=5, decoder_channels=channels)
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decoder([None, None, *features])


class Segmentor(nn.Module):
    """Backbone -> decoder -> dropout + 1x1 classifier -> bilinear upsampling to the input size.

    Args:
        backbone: ``features_only`` model returning four levels (strides 4-32).
        decoder: ``'semantic_fpn'`` or ``'upernet'``.
        num_classes: classes predicted per pixel.
        channels: decoder width (default 128 for Semantic FPN, 512 for UperNet).
        auxiliary_head: add the FCN head on the third level (training only).
        dropout: dropout before the classifier (0.1).
        fpn_channels: FPN width of Semantic FPN (256); UperNet's FPN is ``channels`` wide.
    """

    def __init__(self, backbone: nn.Module, decoder: str, num_classes: int, channels: Optional[int] = None,
                 auxiliary_head: bool = False, dropout: float = 0.1, fpn_channels: int = 256):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f'unknown decoder {decoder!r}; expected one of {", ".join(DECODERS)}')
        in_channels = backbone.feature_info.channels()
        strides = backbone.feature_info.reduction()
        if len(in_channels) != 4:
            raise ValueError(f'{decoder} needs four backbone levels, the backbone returns {len(in_channels)}')
        self.backbone = backbone
        if decoder == 'semantic_fpn':
            self.decoder = SemanticFPNDecoder(in_channels, strides, fpn_channels, channels or 128)
        else:
            self.decoder = _UPerNet(in_channels, channels=channels or 512)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(self.decoder.out_channels, num_classes, 1))
        self.auxiliary = nn.Sequential(
            _conv_bn_relu(in_channels[2], 256), nn.Dropout2d(dropout), nn.Conv2d(256, num_classes, 1),
        ) if auxiliary_head else None
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        size = x.shape[-2:]
        features = self.backbone(x)
        logits = F.interpolate(self.classifier(self.decoder(features)), size=size, mode='bilinear',
                               align_corners=False)
        if self.auxiliary is None or not self.training:
            return logits
        aux = F.interpolate(self.auxiliary(features[2]), size=size, mode='bilinear', align_corners=False)
        return {'out': logits, 'aux': aux}


def build_segmentor(
        decoder: str = 'upernet',
        backbone: str = 'dat_tiny',
        num_classes: int = 150,
        pretrained_backbone: Optional[str] = None,
        drop_path_rate: float = 0.0,
        channels: Optional[int] = None,
        auxiliary_head: Optional[bool] = None,
        fpn_channels: int = 256,
        backbone_kwargs: Optional[Dict] = None,
) -> Segmentor:
    """A :class:`Segmentor` on ``backbone``.

    Args:
        decoder: ``'semantic_fpn'`` or ``'upernet'``.
        backbone: registered model name.
        num_classes: classes predicted per pixel (150 for ADE20K).
        pretrained_backbone: checkpoint file of the classification backbone.
        drop_path_rate: stochastic depth of the backbone (DAT Sec. 4.3: 0.3 for T and S, 0.5 for B).
        channels: decoder width; None for the papers' (128 / 512).
        auxiliary_head: None follows mmsegmentation (UperNet has one, Semantic FPN not).
        fpn_channels: FPN width of Semantic FPN.
        backbone_kwargs: further arguments of the backbone.

    Returns:
        The segmentor; ``model.config`` holds the arguments that rebuild it, ``model.mean`` and
        ``model.std`` the input normalisation of the backbone.
    """
    if auxiliary_head is None:
        auxiliary_head = decoder == 'upernet'
    body = create_backbone(backbone, (4, 8, 16, 32), pretrained_backbone, drop_path_rate, **(backbone_kwargs or {}))
    model = Segmentor(body, decoder, num_classes, channels, auxiliary_head, fpn_channels=fpn_channels)
    cfg = timm.models.get_pretrained_cfg(backbone)
    model.config = dict(decoder=decoder, backbone=backbone, num_classes=num_classes, channels=channels,
                        auxiliary_head=auxiliary_head, fpn_channels=fpn_channels,
                        backbone_kwargs=dict(backbone_kwargs or {}))
    model.mean = tuple(cfg.mean) if cfg else (0.485, 0.456, 0.406)  # the backbone's input normalisation
    model.std = tuple(cfg.std) if cfg else (0.229, 0.224, 0.225)
    return model
