"""The image a figure is drawn on: a file or a scikit-image photo, preprocessed as the model sees it."""
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config

from ...data.images import read_image
from ...errors import optional

__all__ = ['SAMPLE_PHOTOS', 'load_image', 'preprocess']

SAMPLE_PHOTOS = ('chelsea', 'astronaut', 'coffee', 'rocket')  # RGB photos in skimage.data


def load_image(path: Optional[str] = None, sample: str = 'chelsea') -> Image.Image:
    """The image at ``path`` as RGB, or the scikit-image photo ``sample`` when ``path`` is None.

    Grayscale, palette and high-bit-depth images become RGB; transparent pixels are shown over
    white (:func:`deformvit.data.images.to_rgb`).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not an image Pillow can read, or ``sample`` is unknown.
    """
    if path is not None:
        return read_image(path)
    if sample not in SAMPLE_PHOTOS:
        raise ValueError(f'unknown sample photo {sample!r}; expected one of {", ".join(SAMPLE_PHOTOS)}')
    data = optional('skimage.data', 'The sample photos (or pass --image PATH)', package='skimage')
    return Image.fromarray(getattr(data, sample)())


def preprocess(image: Image.Image, model: nn.Module, size: Optional[int] = None) -> Tuple[torch.Tensor, np.ndarray]:
    """timm's eval transform of ``model`` (resize by ``crop_pct``, center crop, normalise).

    Args:
        image: an RGB image of any size.
        model: the model whose ``pretrained_cfg`` gives interpolation, crop and mean/std.
        size: input side (default: the model's ``input_size``).

    Returns:
        ``(x, display)``: the ``(1, 3, S, S)`` input and the same crop as an ``(S, S, 3)`` float
        array in ``[0, 1]``; input pixel ``(i, j)`` is display pixel ``(i, j)``.
    """
    if model.in_chans != 3:
        raise ValueError(f'the model takes {model.in_chans} input channels; visualize feeds RGB images (3)')
    minimum = getattr(model, 'min_input_size', 1)
    if size is not None and size < minimum:
        raise ValueError(f'input size {size} is smaller than the {minimum}x{minimum} minimum of this model')
    config = resolve_data_config({'input_size': (3, size, size)} if size else {}, model=model)
    x = create_transform(**config)(image).unsqueeze(0)  # (1, 3, S, S)
    mean = torch.tensor(config['mean']).view(3, 1, 1)
    std = torch.tensor(config['std']).view(3, 1, 1)
    display = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # (3, S, S) -> (S, S, 3)
    return x, display
