"""Model families; importing this package registers them with timm.

``import deformvit`` (or any part of it) imports this package, so ``timm.create_model`` knows
``dat_*`` and ``eapt_*`` wherever deformvit is used.
"""
from ._pyramid import PyramidBackbone, classifier_outputs
from .dat import DAT, infer_dat_variant
from .datpp import DATPlusPlus
from .eapt import EAPT

__all__ = ['DAT', 'DATPlusPlus', 'EAPT', 'PyramidBackbone', 'classifier_outputs', 'infer_dat_variant']
