"""deformvit: deformable-attention vision transformers (DAT) as timm models.

``import deformvit`` registers ``dat_tiny``, ``dat_small``, ``dat_base`` and ``dat_base_384``
with ``timm.create_model``.
"""
from . import models
from .checkpoint import UnsafeCheckpointError, load_state_dict_file, save_safetensors
from .complexity import count_macs, count_parameters
from .models.dat import DAT, SamplingPoints

__version__ = '0.1.0'
__all__ = [
    'DAT',
    'SamplingPoints',
    'UnsafeCheckpointError',
    'count_macs',
    'count_parameters',
    'load_state_dict_file',
    'save_safetensors',
]
