"""What several detection frameworks share besides their assignment: the checks of their options, which
raise :class:`~deformvit.errors.UsageError` naming the value and what was expected, the loss normaliser
averaged over the processes of a distributed run (mmdetection's ``reduce_mean``), and which locations lie
on an image rather than on the padding batching adds (mmdetection's valid flags)."""
import math
from typing import Callable, Sequence, Tuple

import torch
import torch.distributed as dist

from ...errors import UsageError

__all__ = ['check_choice', 'check_integer', 'check_number', 'check_numbers', 'check_sequence', 'inside_own_padding',
           'mean_over_processes']


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f'{name} {value!r} is not one of {", ".join(choices)}')
    return value


def check_integer(name: str, value, expected: str, valid: Callable[[int], bool] = lambda v: v >= 1) -> int:
    """``value`` when it is a whole number (not a bool) that is ``valid`` (by default, at least 1)."""
    if not isinstance(value, int) or isinstance(value, bool) or not valid(value):
        raise UsageError(f'{name} {value!r}: expected {expected}')
    return value


def check_number(name: str, value, expected: str, valid: Callable[[float], bool]) -> float:
    """``value`` as a float when it is a number (not a bool) that is ``valid``."""
    if not _is_number(value) or not valid(value):
        raise UsageError(f'{name} {value!r}: expected {expected}')
    return float(value)


def check_sequence(name: str, value, expected: str) -> list:
    """``value`` as a list when it is a sequence other than a string."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise UsageError(f'{name} {value!r}: expected {expected}')
    return list(value)


def check_numbers(name: str, value, expected: str, valid: Callable[[float], bool]) -> Tuple[float, ...]:
    """``value`` as a tuple of floats when it is a sequence of numbers, each ``valid``."""
    values = check_sequence(name, value, expected)
    if not all(_is_number(v) and valid(v) for v in values):
        raise UsageError(f'{name} {value!r}: expected {expected}')
    return tuple(float(v) for v in values)


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the processes when torch.distributed is initialised (itself otherwise)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def inside_own_padding(centres: torch.Tensor, image_size: Tuple[int, int], size_divisible: int) -> torch.Tensor:
    """(N,) bool: the ``centres`` (N, 2) ``x, y`` that lie on the image of ``image_size`` padded on its own to a
    multiple of ``size_divisible``, not on the padding that batching with larger images adds."""
    height, width = (math.ceil(s / size_divisible) * size_divisible for s in image_size)
    return (centres[:, 0] < width) & (centres[:, 1] < height)
