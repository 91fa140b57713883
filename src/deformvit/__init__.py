"""deformvit: deformable-attention vision transformers (DAT, EAPT) as timm models.

``import deformvit`` registers ``dat_tiny``, ``dat_small``, ``dat_base``, ``dat_base_384``,
``eapt_small``, ``eapt_medium``, ``eapt_large`` and ``eapt_medium_384`` (and the small
``dat_nano`` / ``eapt_nano``) with ``timm.create_model``.
"""
from . import models
from .checkpoint import UnsafeCheckpointError, load_state_dict_file, save_safetensors
from .complexity import count_macs, count_parameters
from .models.dat import DAT, SamplingPoints
from .models.eapt import EAPT

__version__ = '0.1.0'
__all__ = [
    'DAT',
    'EAPT',
    'SamplingPoints',
    'UnsafeCheckpointError',
    'count_macs',
    'count_parameters',
    'load_state_dict_file',
    'save_safetensors',
]
