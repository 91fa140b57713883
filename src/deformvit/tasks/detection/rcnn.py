"""Faster R-CNN (Ren et al., NeurIPS 2015) and Mask R-CNN (He et al., ICCV 2017) as in DAT Table 4:
mmdetection's configurations in Swin Transformer's settings, on torchvision's models.

The FPN reads all four stages (P2-P5) and adds P6 by max-pooling; one anchor size per level
(32-512) and three aspect ratios; RoIAlign 7x7 boxes into two 1024-wide fully connected layers,
and for Mask R-CNN 14x14 masks into four 3x3 convolutions, a deconvolution and 28x28 masks.
"""
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..necks import PyramidFeatures
from .base import Detector

__all__ = ['FasterRCNNDetector', 'MaskRCNNDetector']


class _RCNN(Detector):
    """The two-stage frameworks' shared assembly and cost parts."""

    @classmethod
    def assemble(cls, body: nn.Module, num_classes: int, fpn_channels: int, anchor_sizes: Tuple[int, ...],
                 representation_size: int, transform: Dict, **detector_kwargs) -> nn.Module:
        features = PyramidFeatures(body, fpn_channels, LastLevelMaxPool())
        heads = dict(
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5),
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),  # on 7x7 RoIAlign features
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1))
        if cls.masks:  # four 3x3 convolutions of 256 channels, a deconvolution, 28x28 masks
            heads['mask_predictor'] = MaskRCNNPredictor(256, 256, num_classes + 1)
        return cls(features, **heads, **transform, **detector_kwargs)

    def cost_parts(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> Dict[str, Callable]:
        parts, pyramid = self._pyramid_parts(x)
        levels = list(pyramid.values())
        h, w = x.shape[-2:]
        boxes = self._cost_boxes(x, proposals)
        roi_heads = self.roi_heads

        def heads() -> None:
            self.rpn.head(levels)
            pooled = roi_heads.box_roi_pool(pyramid, [boxes], [(h, w)])
            roi_heads.box_predictor(roi_heads.box_head(pooled))
            if self.has_masks():
                pooled = roi_heads.mask_roi_pool(pyramid, [boxes[:mask_rois]], [(h, w)])
                roi_heads.mask_predictor(roi_heads.mask_head(pooled))
        return dict(parts, head=heads)


class FasterRCNNDetector(_RCNN, FasterRCNN):
    """torchvision's Faster R-CNN over P2-P6 of a deformvit (or timm) backbone; build with :meth:`build`."""


class MaskRCNNDetector(_RCNN, MaskRCNN):
    """torchvision's Mask R-CNN over P2-P6 of a deformvit (or timm) backbone; build with :meth:`build`."""
    masks = True
