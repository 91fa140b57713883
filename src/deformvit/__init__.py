"""deformvit: deformable-attention vision transformers (DAT, EAPT) as timm models.

``import deformvit`` registers ``dat_tiny``, ``dat_small``, ``dat_base``, ``dat_base_384``, the
DAT++ ``datpp_*`` models, ``eapt_small``, ``eapt_medium``, ``eapt_large`` and ``eapt_medium_384``
(and the small ``dat_nano`` / ``eapt_nano``) with ``timm.create_model``; ``pretrained=True``
downloads a released model's official weights once into timm's cache (:mod:`deformvit.hub`).
``deformvit.load_model`` builds any model, detector or segmentor from a name or a weights file
(:mod:`deformvit.tasks.loading`).
"""
from . import models  # noqa: F401  (registers the models with timm)
from .checkpoint import UnsafeCheckpointError, load_state_dict_file, save_safetensors
from .layers import SamplingPoints
from .models import DAT, EAPT
from .tools.complexity import count_macs, count_parameters

from .version import __version__  # noqa: F401  (deformvit.__version__)

__all__ = [
    'DAT',
    'EAPT',
    'SamplingPoints',
    'UnsafeCheckpointError',
    'count_macs',
    'count_parameters',
    'load_model',
    'load_state_dict_file',
    'save_safetensors',
]


def __getattr__(name: str):
    if name == 'load_model':  # imported on first use: the tasks bring torchvision's detection models
        from .tasks.loading import load_model
        return load_model
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
