"""Scaled dot-product attention with an additive bias, fused or explicit, and the switches
inspection tools turn on attention modules.

The fused path (``fused=True``) picks the fastest exact kernel for the call; the explicit
path (``fused=False``) writes out DAT Eq. (2)/(9), ``softmax(q k^T / sqrt(d) + B) v``, with
autograd's own gradients, and is the oracle the fused path is tested against. The fused path
calls :func:`torch.nn.functional.scaled_dot_product_attention`, except on the CPU (and on meta,
so that memory measured there is the CPU's) in float32 / float64, where two cases go faster
another way (``docs/benchmarks.md``, "Fast paths"):

* gradients through the bias (DAT's learned position-bias tables) or a small logits matrix
  (``Nq * Nk <= SMALL_ATTENTION``, e.g. 7x7 windows): :class:`_LeanAttention`, explicit products
  with a hand-written backward that keeps only ``q``, ``k``, ``v`` and the softmax weights.
  PyTorch's CPU kernel takes its unfused "math" path whenever the bias needs a gradient, which
  also keeps scaled copies of ``q`` and ``k`` and runs a "safe" softmax (a check of every row for
  ``-inf``); its fused kernel, used otherwise, is slower than explicit products on small matrices;
* inference on a small logits matrix: the same explicit products, in place, no autograd.

Attention modules expose up to three switches, all off-by-default attributes:
``fused_attn`` (timm's name: the fused path, or the explicit one), ``record_sampling`` (keep
where the keys were sampled in ``last_sampling``) and ``record_attention`` (keep the softmax
weights in ``last_attention``). :func:`attention_switches` is the one way to flip them.
"""
import contextlib
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .fast import fast_paths_enabled

__all__ = ['attention', 'attention_switches', 'attention_weights']

# largest Nq * Nk for which the explicit products beat the fused CPU kernel (2 threads,
# docs/benchmarks.md, "Fast paths")
SMALL_ATTENTION = 128 * 128


def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        dropout_p: float = 0.,
        fused: bool = True,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T / sqrt(d) + bias) v``.

    Args:
        q: queries, ``(B, heads, Nq, d)``.
        k: keys, ``(B, heads, Nk, d)``.
        v: values, ``(B, heads, Nk, d)``.
        bias: additive logits bias broadcastable to ``(B, heads, Nq, Nk)`` (position bias,
            masks), or None.
        dropout_p: attention dropout probability (applied only when > 0).
        fused: the fastest exact path for the call (see the module's docstring); False runs the
            explicit reference.
        scale: factor of the logits, ``1 / sqrt(d)`` when None (1.0 for queries scaled already).

    Returns:
        ``(B, heads, Nq, d)``.
    """
    if fused:
        path = _cpu_path(q, k, v, bias, dropout_p)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if path == 'lean':
            return _LeanAttention.apply(q, k, v, bias, scale)
        if path == 'inplace':
            return _explicit_inplace(q, k, v, bias, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    weights = attention_weights(q, k, bias, scale)
    if dropout_p > 0.:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def attention_weights(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None) -> torch.Tensor:
    """The attention probabilities ``softmax(q k^T / sqrt(d) + bias)`` of :func:`attention`.

    Shapes as in :func:`attention`; returns ``(B, heads, Nq, Nk)``, each row summing to 1.
    """
    logits = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)  # (B, heads, Nq, Nk)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def counting_flops() -> bool:
    """Whether torch's FLOP counter (``deformvit.count_macs``) is watching: its dispatch mode is on the stack.

    Layers then take the paths whose operators the counter prices as the papers do (the fused
    attention call rather than the CPU fast paths' products).
    """
    if torch.compiler.is_compiling():  # traced graphs (torch.compile, torch.export) take the usual paths
        return False
    return any(type(mode).__name__ == '_FlopCounterMode' for mode in _get_current_dispatch_mode_stack())


def _cpu_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
              dropout_p: float) -> str:
    """Which kernel :func:`attention`'s fused path runs: ``'lean'``, ``'inplace'`` or ``'sdpa'``."""
    if (not fast_paths_enabled() or q.device.type not in ('cpu', 'meta') or dropout_p > 0.
            or torch.compiler.is_compiling()
            or torch.jit.is_scripting() or counting_flops()
            or q.dtype not in (torch.float32, torch.float64)
            or any(t.dtype != q.dtype for t in (k, v))
            or (bias is not None and bias.dtype != q.dtype)):
        return 'sdpa'
    small = q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        return 'lean' if small or (bias is not None and bias.requires_grad) else 'sdpa'
    return 'inplace' if small else 'sdpa'


def _weights(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + bias)`` in one buffer: the bias added and the softmax taken in place."""
    logits = torch.matmul(q * scale if scale != 1. else q, k.transpose(-2, -1))
    if bias is not None:
        logits = logits.add_(bias) if torch.broadcast_shapes(logits.shape, bias.shape) == logits.shape \
            else logits + bias
    return torch.softmax(logits, -1, out=logits)


def _explicit_inplace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                      scale: float) -> torch.Tensor:
    """Inference form of the explicit path: one weights buffer, then the product."""
    return torch.matmul(_weights(q, k, bias, scale), v)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dimensions its tensor of ``shape`` was broadcast along."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = [i for i in range(grad.dim()) if i < lead or (shape[i - lead] == 1 and grad.shape[i] != 1)]
    return grad.sum(dims, keepdim=True).reshape(shape)


class _LeanAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + bias) v`` with a hand-written backward (CPU training fast path).

    Forward keeps ``q``, ``k``, ``v`` (views of one projection, as a rule) and the softmax weights
    ``P``, nothing else; backward is ``dV = P^T dO``, ``dS = P * (dP - rowsum(P * dP))`` with
    ``dP = dO V^T`` (softmax's backward, computed in place in ``dP``), ``dBias = dS`` summed over
    the bias's broadcast dimensions, ``dQ = dS K / sqrt(d)`` and ``dK = dS^T Q / sqrt(d)``. Equal
    to the explicit path's autograd gradients up to float rounding (tests/test_fast_paths.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        weights = _weights(q, k, bias, scale)
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale = scale
        ctx.bias_shape = None if bias is None else bias.shape
        return torch.matmul(weights, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, weights = ctx.saved_tensors
        need_q, need_k, need_v, need_bias, _ = ctx.needs_input_grad
        grad_v = _sum_to(torch.matmul(weights.transpose(-2, -1), grad_out), v.shape) if need_v else None
        grad_logits = torch.matmul(grad_out, v.transpose(-2, -1)).mul_(weights)  # P * dP
        grad_logits.addcmul_(weights, grad_logits.sum(-1, keepdim=True), value=-1.)  # - P * rowsum(P * dP)
        grad_q = _sum_to(torch.matmul(grad_logits, k).mul_(ctx.scale), q.shape) if need_q else None
        grad_k = _sum_to(torch.matmul(grad_logits.transpose(-2, -1), q).mul_(ctx.scale), k.shape) if need_k else None
        grad_bias = _sum_to(grad_logits, ctx.bias_shape) if need_bias else None
        return grad_q, grad_k, grad_v, grad_bias, None


_RECORDS = {'record_sampling': 'last_sampling', 'record_attention': 'last_attention'}


@contextlib.contextmanager
def attention_switches(
        model: nn.Module,
        fused: Optional[bool] = None,
        record_sampling: bool = False,
        record_attention: bool = False,
) -> Iterator[List[nn.Module]]:
    """Switch the attention modules of ``model`` for the duration of a block.

    Args:
        model: any module; every submodule with the switch is changed.
        fused: set ``fused_attn`` (None leaves it).
        record_sampling: make modules that sample keys keep the positions in ``last_sampling``.
        record_attention: make modules that can keep their softmax weights keep them in
            ``last_attention`` (they take their explicit path while recording).

    Yields:
        The modules whose switches were changed.

    On exit every switch is back to what it was and the records are dropped, so the model
    returns to its default path whatever happened inside the block.
    """
    wanted = {'fused_attn': fused, 'record_sampling': record_sampling or None,
              'record_attention': record_attention or None}
    wanted = {name: value for name, value in wanted.items() if value is not None}
    saved = []
    for module in model.modules():
        changes = {name: value for name, value in wanted.items() if hasattr(module, name)}
        if changes:
            saved.append((module, {name: getattr(module, name) for name in changes}))
            for name, value in changes.items():
                setattr(module, name, value)
    try:
        yield [module for module, _ in saved]
    finally:
        for module, previous in saved:
            for name, value in previous.items():
                setattr(module, name, value)
                if name in _RECORDS:
                    setattr(module, _RECORDS[name], None)
