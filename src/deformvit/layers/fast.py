"""One switch for every fast path of the package (docs/benchmarks.md, "Fast paths").

Each fast path computes what its reference path computes, with the same parameters, and has a
switch of its own (``Mlp.lean``, ``fused_attn``, ...); :func:`fast_paths` turns them all off at
once, for measurements of the plain formulation (DAT Table 8 compares the memory of two attention
mechanisms under one implementation) or to rule them out when a result looks wrong.
"""
import contextlib
from typing import Iterator

__all__ = ['fast_paths', 'fast_paths_enabled']

_enabled = True


def fast_paths_enabled() -> bool:
    """Whether the fast paths may run (True unless inside ``fast_paths(False)``)."""
    return _enabled


@contextlib.contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Turn every fast path on or off for the duration of a block (not thread-local).

    Off, attention's fused path is ``F.scaled_dot_product_attention`` alone, the deformable bias,
    MLPs and convolutional FFNs keep what autograd keeps, DAT's downsampling runs its convolution,
    EAPT's offset network its two layers, and neighborhood attention never picks the tiled method.
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f'fast_paths takes True or False, got {enabled!r}')
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous
