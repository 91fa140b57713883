"""Inference of a segmentor over whole images, sliding windows, several scales and flips.

The test protocols of DAT Table 5 and EAPT Table VI (mmsegmentation's): whole-image or
sliding-window inference, single-scale or multi-scale + flip (Table 5's dagger column), with
the softmax outputs averaged and resized to the annotation's resolution.
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.common import check_sides
from ...errors import UsageError

__all__ = ['MULTI_SCALE_RATIOS', 'check_inference', 'segment_logits']

MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmsegmentation's ADE20K multi-scale test


def check_inference(mode: str, crop: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341),
                    scales: Sequence[float] = (1.0,)) -> None:
    """Raise :class:`~deformvit.errors.UsageError` (a ``ValueError``) for settings :func:`segment_logits`
    cannot take: an unknown ``mode``, a ``crop`` or ``stride`` that is not two positive whole numbers, a
    ratio of ``scales`` that is not positive. Callers run it before loading any data."""
    if mode not in ('whole', 'slide'):
        raise UsageError(f"mode must be 'whole' or 'slide', got {mode!r}")
    check_sides('crop', crop, 'the (height, width) of the sliding window, e.g. (512, 512)')
    check_sides('stride', stride, 'the (vertical, horizontal) step between windows, e.g. (341, 341)')
    if not scales or not all(ratio > 0 for ratio in scales):
        raise UsageError(f'scales {tuple(scales)} are not positive resize ratios; expected ratios > 0, e.g. (1.0,) '
                         f'or {MULTI_SCALE_RATIOS}')


def _sliding_logits(model: nn.Module, x: torch.Tensor, num_classes: int, crop: Sequence[int],
                    stride: Sequence[int]) -> torch.Tensor:
    """Logits of overlapping ``crop`` windows, ``stride`` apart, averaged where they overlap."""
    _, _, h, w = x.shape
    crop_h, crop_w = min(crop[0], h), min(crop[1], w)
    rows = max(h - crop_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - crop_w + stride[1] - 1, 0) // stride[1] + 1
    logits = x.new_zeros(x.shape[0], num_classes, h, w)
    counts = x.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            top, left = min(r * stride[0], h - crop_h), min(c * stride[1], w - crop_w)  # the last windows end at the border
            logits[:, :, top:top + crop_h, left:left + crop_w] += model(x[:, :, top:top + crop_h, left:left + crop_w])
            counts[:, :, top:top + crop_h, left:left + crop_w] += 1
    return logits / counts


@torch.no_grad()
def segment_logits(
        model: nn.Module,
        x: torch.Tensor,
        out_size: Sequence[int],
        mode: str = 'whole',
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crop: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
) -> torch.Tensor:
    """Class probabilities ``(B, K, *out_size)`` of normalised images ``x`` (B, 3, h, w).

    Args:
        model: a segmentor in eval mode (logits at its input size).
        out_size: resolution of the result (the annotation's).
        mode: ``'whole'`` (one pass over the image) or ``'slide'`` (``crop`` windows ``stride`` apart).
        scales: the image is resized by each ratio (bilinear) and the softmax outputs averaged.
        flip: also average the horizontally flipped image's outputs.
        crop, stride: ``'slide'`` only: ``(height, width)`` of the windows and the step between them.

    Raises:
        UsageError: settings :func:`check_inference` refuses.
    """
    check_inference(mode, crop, stride, scales)
    probabilities = None
    for scale in scales:
        size = [max(32, round(s * scale)) for s in x.shape[-2:]]
        scaled = x if scale == 1.0 else F.interpolate(x, size=size, mode='bilinear', align_corners=False)
        for flipped in (False, True) if flip else (False,):
            inp = scaled.flip(-1) if flipped else scaled
            logits = model(inp) if mode == 'whole' else _sliding_logits(model, inp, model.num_classes, crop, stride)
            logits = logits.flip(-1) if flipped else logits
            p = F.interpolate(logits.float(), size=tuple(out_size), mode='bilinear', align_corners=False).softmax(1)
            probabilities = p if probabilities is None else probabilities + p
    return probabilities / (len(scales) * (2 if flip else 1))
