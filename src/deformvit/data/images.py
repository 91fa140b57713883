"""Reading image files as RGB: for datasets, None for a file that cannot be decoded; for a user's
image, an error that says what was wrong."""
import os
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ['decode_rgb', 'read_image', 'to_rgb']


def decode_rgb(path: str) -> Optional[Image.Image]:
    """The image at ``path`` decoded in full and converted to RGB, or None when it cannot be read
    (zero bytes, truncated, not an image): the datasets skip and count such files."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')  # decodes every byte: truncated files raise here
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... for broken files
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any Pillow image: transparency over white, high-bit-depth gray rescaled."""
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba).convert('RGB')
    if image.mode in ('I', 'F') or image.mode.startswith('I;'):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert('RGB')
    return image.convert('RGB')


def read_image(path: str) -> Image.Image:
    """The image at ``path``, decoded in full and converted to RGB by :func:`to_rgb`.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not an image Pillow can read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no image file at {path}')
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f'{path} is not a readable image ({err}); expected a file Pillow reads '
                         '(PNG, JPEG, BMP, TIFF, ...)') from err
