"""What every dataset of deformvit shares: the error type, image files, image sides and lists in messages."""
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from ..errors import UsageError
from .images import try_decode_rgb

__all__ = [
    'IMAGE_EXTENSIONS', 'DatasetError', 'check_sides', 'collate_readable', 'find_images', 'first_few', 'image_files',
    'iter_images', 'keep_ratio_size', 'path_problem', 'random_int', 'refuse',
]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
MAX_LISTED = 5  # items named in an error message before "and N more"


class DatasetError(ValueError):
    """A dataset cannot be used (missing, malformed, inconsistent); the message says what was expected."""


def first_few(items: Sequence, quote: bool = False) -> str:
    """The first five items joined by commas (``repr`` of each when ``quote``), then ``and N more``."""
    listed = ', '.join(repr(item) if quote else str(item) for item in items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        listed += f' and {len(items) - MAX_LISTED} more'
    return listed


def path_problem(path: str, folder: bool) -> Optional[str]:
    """What is wrong with ``path`` where a folder (or a file) is expected: ``'does not exist'``,
    ``'is not a directory'`` or ``'is not a file'``; None when nothing is."""
    if os.path.isdir(path) if folder else os.path.isfile(path):
        return None
    if not os.path.exists(path):
        return 'does not exist'
    return 'is not a directory' if folder else 'is not a file'


def check_sides(name: str, sides: Sequence[int], meaning: str) -> Tuple[int, int]:
    """``sides`` as two ints when both are positive whole numbers of pixels.

    Args:
        name: what the sides are, for the message (``'scale'``, ``'crop'``).
        sides: the two values given.
        meaning: what the two values are, with an example: ``'the (long, short) sides of the resize, e.g.
            (2048, 512)'``.

    Raises:
        UsageError: not two values, or a value that is not a positive whole number.
    """
    sides = tuple(sides)
    if len(sides) != 2 or not all(isinstance(side, (int, float)) and not isinstance(side, bool) and side >= 1
                                  and side == int(side) for side in sides):
        raise UsageError(f'{name} {sides} is not two positive whole numbers of pixels; expected {meaning}')
    return int(sides[0]), int(sides[1])


def refuse(problems: Sequence, what: str, expected: str) -> None:
    """Raise ``DatasetError('<count> <what>: <the first few problems>; <expected>')`` when there are problems."""
    if problems:
        raise DatasetError(f'{len(problems)} {what}: {first_few(problems)}; {expected}')


def collate_readable(batch: Sequence[Optional[Tuple[Any, Any]]],
                     combine: Callable[[List[Tuple[Any, Any]]], Tuple[Any, Any]]) -> Tuple[Any, Any, int]:
    """Collate ``(input, target)`` samples, dropping the ``None`` of unreadable files.

    Returns:
        ``(inputs, targets, skipped)``: ``combine`` of the readable samples and the number dropped;
        ``(None, None, skipped)`` when every sample was unreadable.
    """
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    inputs, targets = combine(kept)
    return inputs, targets, skipped


def find_images(folder: str) -> List[str]:
    """Sorted paths of the files below ``folder`` (recursively) with an image extension."""
    paths = []
    for directory, _, files in os.walk(folder):
        paths.extend(os.path.join(directory, name) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(paths)


def image_files(inputs: Sequence[str]) -> List[str]:
    """The image files named by ``inputs``: files as given, folders searched recursively, each file
    once (a file named twice, or by a file and by its folder, is listed where it first appears).

    Raises:
        FileNotFoundError: an input is neither a file nor a folder.
        DatasetError: the inputs hold no image files.
    """
    files, seen = [], set()
    for item in inputs:
        if os.path.isdir(item):
            found = find_images(item)
        elif os.path.isfile(item):
            found = [item]
        else:
            raise FileNotFoundError(f'{item} is neither an image file nor a folder')
        for path in found:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                files.append(path)
    if not files:
        raise DatasetError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {", ".join(inputs)}')
    return files


def iter_images(inputs: Sequence[str]) -> Iterator[Tuple[str, Optional[Image.Image], Optional[str]]]:
    """``(path, RGB PIL image, None)`` for each image file of ``inputs`` (files or folders, see
    :func:`image_files`); ``(path, None, reason)`` for a file that cannot be read, the reason in one line
    (``'not a readable image (...)'``, ``'too large to decode (...)'``).

    Raises:
        FileNotFoundError: an input is neither a file nor a folder.
        DatasetError: the inputs hold no image files.
    """
    for path in image_files(inputs):
        yield (path, *try_decode_rgb(path))


def random_int(low: int, high: int) -> int:
    """An integer drawn uniformly from [low, high] (both included) with torch's global RNG."""
    return int(torch.randint(low, high + 1, ()).item())


def keep_ratio_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """The largest ``(height, width)`` of the same aspect whose long side is at most max(scale) and short side
    at most min(scale) (mmcv's ``rescale`` rule, sides rounded half up)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)
