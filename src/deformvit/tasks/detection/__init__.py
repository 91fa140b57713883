"""Detection frameworks on any deformvit (or timm) backbone, by name.

:data:`DETECTORS` maps each name to its framework (a torchvision detector with the
:class:`~deformvit.tasks.detection.base.Detector` interface); :func:`build_detector` builds one.
A new framework is a module of this package and its line in the table.
"""
from typing import Dict, Type

import torch.nn as nn

from ..base import registered
from .atss import ATSSDetector
from .base import Detector
from .cascade import CascadeMaskRCNNDetector
from .htc import HTCDetector, HTCPlusPlusDetector
from .rcnn import FasterRCNNDetector, MaskRCNNDetector
from .reppoints import RepPointsV2Detector
from .retinanet import RetinaNetDetector
from .sparse_rcnn import SparseRCNNDetector

__all__ = ['DETECTORS', 'Detector', 'build_detector', 'detector_class']

DETECTORS: Dict[str, Type[Detector]] = {
    'retinanet': RetinaNetDetector,  # DAT Table 3
    'faster_rcnn': FasterRCNNDetector,
    'mask_rcnn': MaskRCNNDetector,  # DAT Table 4a
    'cascade_mask_rcnn': CascadeMaskRCNNDetector,  # DAT Table 4b, EAPT Table IV
    'htc': HTCDetector,
    'htc++': HTCPlusPlusDetector,  # Swin Transformer's HTC++, EAPT Table V (HTC++ / HTC+++)
    'atss': ATSSDetector,  # EAPT Table IV
    'reppoints_v2': RepPointsV2Detector,  # EAPT Table IV
    'sparse_rcnn': SparseRCNNDetector,  # EAPT Tables IV and VII
}


def detector_class(name: str) -> Type[Detector]:
    """The framework registered as ``name`` (``ValueError`` for an unknown one)."""
    return registered(DETECTORS, name, 'detector')


def build_detector(name: str = 'mask_rcnn', backbone: str = 'dat_tiny', num_classes: int = 80, **kwargs) -> nn.Module:
    """The detector ``name`` (one of :data:`DETECTORS`) on ``backbone``; ``kwargs`` as in
    :meth:`Detector.build`. ``model.config`` holds ``detector=name`` and the arguments that rebuild it."""
    model = detector_class(name).build(backbone=backbone, num_classes=num_classes, **kwargs)
    model.config = dict(detector=name, **model.config)
    return model
