"""Reading image files as RGB: for datasets, None for a file that cannot be decoded (with the
reason, for a report); for a user's image, an error that says what was wrong."""
import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ['decode_rgb', 'read_image', 'to_rgb', 'try_decode_rgb']


def _why_unreadable(error: Exception) -> str:
    """What a Pillow failure says about the file, in one line: ``'not a readable image (...)'`` or, for
    a header that claims more pixels than Pillow decodes, ``'too large to decode (...)'``."""
    detail = ' '.join(str(error).split()).rstrip('.') or type(error).__name__
    if isinstance(error, Image.DecompressionBombError):
        return f'too large to decode ({detail})'
    return f'not a readable image ({detail})'


def try_decode_rgb(path: str) -> Tuple[Optional[Image.Image], Optional[str]]:
    """``(image, None)``: the image at ``path`` decoded in full and converted to RGB; or
    ``(None, reason)`` when it cannot be read: zero bytes, truncated, not an image, missing, or a
    header claiming more pixels than Pillow decodes (``Image.DecompressionBombError``, raised
    before any pixel is read). ``reason`` is one line, e.g. ``'too large to decode (Image size
    (3600000000 pixels) exceeds limit of 178956970 pixels, ...)'``."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB'), None  # decodes every byte: truncated files raise here
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, _why_unreadable(error)


def decode_rgb(path: str) -> Optional[Image.Image]:
    """The image of :func:`try_decode_rgb`, or None when it cannot be read: the datasets skip and count such files."""
    return try_decode_rgb(path)[0]


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
        ValueError: the file is not an image Pillow can read, or its header claims more pixels
            than Pillow decodes (a decompression bomb, or a photo too large to open).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no image file at {path}')
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise ValueError(f'{path} is {_why_unreadable(err)}; expected an image Pillow agrees to decode (its '
                         'Image.MAX_IMAGE_PIXELS guards against decompression bombs); downscale it') from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f'{path} is {_why_unreadable(err)}; expected a file Pillow reads '
                         '(PNG, JPEG, BMP, TIFF, ...)') from err
