"""Window partitioning for local and shift-window attention (Swin Transformer Sec. 3.2).

Feature maps are channels-last, ``(B, H, W, C)``. Maps that are not a multiple of the
window are padded at the bottom/right; :func:`window_region_mask` keeps the padding out of
every real token's attention, so padding then cropping changes nothing for real tokens.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['pad_to_multiple', 'window_partition', 'window_region_mask', 'window_reverse']

MASK_VALUE = -100.0  # the value the Swin and DAT releases add to masked logits


def pad_to_multiple(x: torch.Tensor, multiple: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``(B, H, W, C)`` at the bottom/right to multiples of ``multiple``."""
    _, h, w, _ = x.shape
    pad_h = (multiple[0] - h % multiple[0]) % multiple[0]
    pad_w = (multiple[1] - w % multiple[1]) % multiple[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def window_partition(x: torch.Tensor, window_size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C) -> (B * nW, Wh * Ww, C)``; H and W must be multiples of the window."""
    b, h, w, c = x.shape
    wh, ww = window_size
    x = x.view(b, h // wh, wh, w // ww, ww, c)  # (B, H/Wh, Wh, W/Ww, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * rows * cols, Wh, Ww, C) -> (B, rows * Wh, cols * Ww, C)``."""
    _, wh, ww, c = windows.shape
    rows, cols = grid
    x = windows.view(-1, rows, cols, wh, ww, c).permute(0, 1, 3, 2, 4, 5)  # (B, rows, Wh, cols, Ww, C)
    return x.reshape(-1, rows * wh, cols * ww, c)


def _shift_regions(size: int, window: int, shift: int) -> torch.Tensor:
    """Region label (0, 1, 2) of each position along one axis of a cyclically shifted map."""
    if shift == 0:
        return torch.zeros(size, dtype=torch.long)
    position = torch.arange(size)
    return (position >= size - window).long() + (position >= size - shift).long()


def window_region_mask(
        padded_size: Tuple[int, int],
        valid_size: Tuple[int, int],
        window_size: Tuple[int, int],
        shift_size: Tuple[int, int],
        device: torch.device,
) -> Optional[torch.Tensor]:
    """Additive attention mask for (shifted) windows over a padded map.

    Two tokens of a window may attend to each other only when they come from the same
    region of the cyclically shifted map (Swin Sec. 3.2) and are both real or both
    padding. The mask is given in the shifted frame, where attention is computed.

    Args:
        padded_size: ``(Hp, Wp)``, multiples of the window.
        valid_size: ``(H, W)`` of the unpadded map.
        window_size: ``(Wh, Ww)``.
        shift_size: ``(sh, sw)`` cyclic shift, ``(0, 0)`` for plain windows.
        device: where to build the mask.

    Returns:
        ``(nW, Wh*Ww, Wh*Ww)`` mask of 0 and -100, or None when nothing needs masking.

    Masks are cached per sizes and device, except while torch.compile or torch.export trace
    the model: a mask made there belongs to the trace (a fake tensor under torch.export) and
    must never be returned to a later eager call.
    """
    if tuple(padded_size) == tuple(valid_size) and tuple(shift_size) == (0, 0):
        return None
    if torch.compiler.is_compiling():
        return _region_mask(padded_size, valid_size, window_size, shift_size, device)
    return _cached_region_mask(padded_size, valid_size, window_size, shift_size, device)


def _region_mask(padded_size, valid_size, window_size, shift_size, device) -> torch.Tensor:
    """The mask of :func:`window_region_mask` (arguments as there), always built."""
    (hp, wp), (h, w), (wh, ww), (sh, sw) = padded_size, valid_size, window_size, shift_size
    # Swin's three regions per axis of the shifted map: [0, -window), [-window, -shift), [-shift, end)
    row_region = _shift_regions(hp, wh, sh)
    col_region = _shift_regions(wp, ww, sw)
    # a token of the shifted frame at (i, j) came from ((i + sh) % Hp, (j + sw) % Wp)
    rows = (torch.arange(hp) + sh) % hp
    cols = (torch.arange(wp) + sw) % wp
    is_pad = (rows[:, None] >= h) | (cols[None, :] >= w)
    labels = (row_region[:, None] * 3 + col_region[None, :]) * 2 + is_pad.long()
    windows = window_partition(labels[None, :, :, None], window_size).squeeze(-1)  # (nW, N)
    mask = (windows[:, None, :] != windows[:, :, None]).float() * MASK_VALUE
    return mask.to(device)


_cached_region_mask = functools.lru_cache(maxsize=64)(_region_mask)
