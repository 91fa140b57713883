"""Parameter and multiply-accumulate counts, in the convention of the papers' tables.

MACs follow fvcore, which DAT's classification tables use: one MAC per multiply-add of matrix products
and convolutions (biases free), ``5 x numel`` for an affine LayerNorm, ``4 x numel`` of
the output for bilinear sampling and interpolation; element-wise activations, softmax and
additions are free. Attention computed by ``F.scaled_dot_product_attention`` counts as its
two matrix products. The detection and segmentation tables of both papers were counted by
mmcv, which counts modules only; ``convention='modules'`` reproduces that (see
docs/dense-prediction.md).
"""
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision  # noqa: F401  (registers torch.ops.torchvision, whose deform_conv2d is counted)
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ['CONVENTIONS', 'count_macs', 'count_macs_of', 'count_parameters', 'framework_macs']

aten = torch.ops.aten


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as index tables and masks are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# FlopCounterMode counts FLOPs = 2 x MACs for products; these formulas return 2 x the fvcore
# MACs of the other counted ops so that one division by 2 gives fvcore's total.
def _layer_norm(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input_shape) * (5 if weight_shape is not None else 4)


def _bilinear_sample(*args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * _numel(out_shape[0] if isinstance(out_shape, (tuple, list)) and isinstance(out_shape[0], (tuple, list)) else out_shape)


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _deform_conv(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # a convolution's products: each output element sums (C_in / groups) x kh x kw taps (the bilinear
    # reads of the shifted taps are not counted, as no convolution counter counts its im2col)
    return 2 * _numel(out_shape) * _numel(weight_shape[1:])


_FVCORE_EXTRA = {
    aten.native_layer_norm: _layer_norm,
    aten.grid_sampler_2d: _bilinear_sample,
    aten.upsample_bilinear2d: _bilinear_sample,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    torch.ops.torchvision.deform_conv2d: _deform_conv,  # RepPoints' deformable convolutions, a module in mmcv too
}


def _free(*args, **kwargs) -> int:
    return 0


# mmcv's counter (mmdetection / mmsegmentation ``get_flops``, behind the detection and
# segmentation tables of both papers) hooks modules only: the products of attention and the
# bilinear sampling that models compute with functions are not counted.
_MODULE_ONLY = {**_FVCORE_EXTRA, **{op: _free for op in (
    aten.grid_sampler_2d, aten.bmm, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention)}}
CONVENTIONS = {'fvcore': _FVCORE_EXTRA, 'modules': _MODULE_ONLY}


@torch.no_grad()
def count_macs_of(run: Callable[[], object], convention: str = 'fvcore') -> Tuple[int, Dict[str, int]]:
    """MACs of everything ``run()`` computes: ``(total, {module name: MACs})``.

    Args:
        run: computes the forward pass to count.
        convention: ``'fvcore'`` (every product, as the classification tables) or
            ``'modules'`` (as mmcv, behind the detection and segmentation tables: the
            attention products and bilinear sampling computed by functions are free).

    The module names are those of the modules called inside ``run`` (qualified from the
    outermost one that ``run`` calls, e.g. ``'backbone.body'``).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f'convention must be one of {sorted(CONVENTIONS)}, got {convention!r}')
    counter = FlopCounterMode(display=False, custom_mapping=CONVENTIONS[convention])
    with counter:
        run()
    per_module = {
        name.split('.', 1)[1]: sum(counts.values()) // 2
        for name, counts in counter.get_flop_counts().items() if '.' in name  # drop 'Global' and the root
    }
    return counter.get_total_flops() // 2, per_module


@torch.no_grad()
def count_macs(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        by_module: bool = False,
        convention: str = 'fvcore',
) -> int | Tuple[int, Dict[str, int]]:
    """Multiply-accumulates of one forward pass on a ``(1, *input_size)`` input.

    Args:
        model: the network (evaluated in eval mode; its mode is restored).
        input_size: ``(C, H, W)``.
        by_module: also return the MACs of every submodule, by qualified name
            (``'stages.2'``, ``'stages.2.blocks.1.attn'``, ...).
        convention: ``'fvcore'`` or ``'modules'`` (see :func:`count_macs_of`).

    Returns:
        Total MACs, or ``(total, {module name: MACs})``.
    """
    param = next(model.parameters())
    x = torch.randn(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        total, per_module = count_macs_of(lambda: model(x), convention)
    finally:
        model.train(was_training)
    return (total, per_module) if by_module else total


@torch.no_grad()
def framework_macs(model: nn.Module, size: Sequence[int] = (800, 1280), convention: str = 'fvcore',
                   **part_kwargs) -> Dict[str, int]:
    """MACs of a detection or segmentation framework on one ``size`` (H, W) image, part by part.

    The framework names its parts (``model.cost_parts(x, **part_kwargs)``: backbone, neck and
    heads of a detector, backbone and head of a segmentor); each is counted in ``convention``
    (:func:`count_macs_of`; ``'modules'`` is mmcv's, behind DAT Tables 3-5 and EAPT Table VI).

    Returns:
        MACs by part name, and their sum as ``'total'``.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.randn(1, 3, *size, device=param.device, dtype=param.dtype)
        parts = model.cost_parts(x, **part_kwargs)
        macs = {name: count_macs_of(part, convention)[0] for name, part in parts.items()}
    finally:
        model.train(was_training)
    return dict(macs, total=sum(macs.values()))
