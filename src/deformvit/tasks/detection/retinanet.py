"""RetinaNet (Lin et al., ICCV 2017) as in DAT Table 3: mmdetection's configuration in Swin
Transformer's settings, on torchvision's ``RetinaNet``.

The FPN reads stages 2-4 (C3-C5, strides 8-32) and adds P6 and P7 computed from C5
(``LastLevelP6P7``), i.e. levels P3-P7; anchors of 32-512 pixels, three scales per octave and
three aspect ratios per level; the four-convolution heads without normalisation.
"""
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..necks import PyramidFeatures
from .base import Detector

__all__ = ['RetinaNetDetector']


def _anchors(base_sizes: Sequence[int]) -> AnchorGenerator:
    # three scales per octave (2^0, 2^(1/3), 2^(2/3)) of each level's base size
    sizes = tuple(tuple(round(s * 2 ** (k / 3)) for k in range(3)) for s in base_sizes)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class RetinaNetDetector(Detector, RetinaNet):
    """torchvision's RetinaNet over P3-P7 of a deformvit (or timm) backbone; build with :meth:`build`."""
    strides = (8, 16, 32)

    @classmethod
    def assemble(cls, body: nn.Module, num_classes: int, fpn_channels: int, anchor_sizes: Tuple[int, ...],
                 representation_size: int, transform: Dict, **detector_kwargs) -> 'RetinaNetDetector':
        c5 = body.feature_info.channels()[-1]
        features = PyramidFeatures(body, fpn_channels, LastLevelP6P7(c5, fpn_channels))
        return cls(features, num_classes + 1, anchor_generator=_anchors(anchor_sizes), **transform, **detector_kwargs)

    def cost_parts(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> Dict[str, Callable]:
        parts, pyramid = self._pyramid_parts(x)
        levels = list(pyramid.values())
        return dict(parts, head=lambda: self.head(levels))
