"""Transformer MLP (DAT Eq. (5)): Linear, GELU, Linear.

Parameter names (``fc1``, ``fc2``) follow timm's ``Mlp``. When no gradient is needed the
GELU runs in place on the hidden activations, which saves allocating the block's largest
tensor (4x the channels) once per block; it does not when ``fc1`` carries forward hooks,
which then see the pre-activation values they expect.

In training, the hidden activations are the largest tensors a block keeps for its backward:
autograd keeps both ``fc1``'s output (for the GELU's gradient) and the GELU's output (for
``fc2``'s weight gradient). :class:`_LeanMlp` keeps the first only and recomputes the GELU in
backward, one element-wise pass. For DAT-T at batch 16 that is 350 MiB less kept for backward
(1900 to 1550 MiB), and faster steps, since allocating fresh memory costs the CPU about as much as
the pass (docs/benchmarks.md, "Fast paths"); ``Mlp.lean = False`` turns it off.
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast import fast_paths_enabled

__all__ = ['Mlp', 'autocast_on', 'lean_applies']


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False on devices without autocast, such as meta)."""
    return (torch.amp.autocast_mode.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type))


def lean_applies(mlp: nn.Module, x: torch.Tensor, layers: Sequence[nn.Module]) -> bool:
    """Whether an MLP may keep less for backward and recompute the rest (its ``lean`` path).

    ``mlp`` has ``lean``, ``drop1`` (dropout after ``fc1``) and an exact-GELU ``act``; ``layers``
    are the inner layers a hook could watch. True when a gradient is wanted, the switches are on,
    nothing random sits between the layers, everything is float32 / float64 without autocast, no
    hook watches an inner layer and nothing traces the model.
    """
    return (mlp.lean and fast_paths_enabled() and torch.is_grad_enabled()
            and (x.requires_grad or mlp.fc1.weight.requires_grad)
            and not (mlp.training and mlp.drop1.p > 0.) and type(mlp.act) is nn.GELU
            and mlp.act.approximate == 'none' and x.dtype in (torch.float32, torch.float64)
            and all(p.dtype == x.dtype for p in mlp.parameters())
            and not autocast_on(x.device.type)
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting()
            and not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in layers))


class Mlp(nn.Module):
    """Two-layer MLP with GELU.

    Args:
        in_features: input and output channels.
        hidden_features: hidden channels (``mlp_ratio * in_features``).
        drop: dropout after the activation and after the second layer.

    ``lean`` (class attribute, default True): in training, keep ``fc1``'s output only and
    recompute the GELU in backward (:class:`_LeanMlp`); values and gradients are those of the
    plain path, which runs where the lean one cannot (dropout between the layers, autocast,
    half precision, hooks on the layers, tracing).
    """

    lean = True

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if lean_applies(self, x, (self.fc1, self.act, self.fc2)):
            return self.drop2(_LeanMlp.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias))
        x = self.fc1(x)
        if x.requires_grad or self.fc1._forward_hooks or torch.onnx.is_in_onnx_export():
            x = self.act(x)
        else:
            x = torch.ops.aten.gelu_(x)
        return self.drop2(self.fc2(self.drop1(x)))


class _LeanMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` keeping ``x`` and ``a = fc1(x)`` for backward, not ``gelu(a)``.

    Backward recomputes ``h = gelu(a)``, then ``dW2 = dY^T h``, ``db2 = sum dY``,
    ``dA = gelu'(a) * dY W2``, ``dW1 = dA^T x``, ``db1 = sum dA`` and ``dX = dA W1``: the
    gradients autograd gives the plain path (tests/test_fast_paths.py).
    """

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2):
        hidden = F.linear(x, weight1, bias1)
        out = F.linear(F.gelu(hidden), weight2, bias2)
        ctx.save_for_backward(x, hidden, weight1, weight2)
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, weight1, weight2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        hidden2d = hidden.view(-1, hidden.shape[-1])
        grad_w2 = grad_out.t().mm(F.gelu(hidden2d)) if need_w2 else None
        grad_b2 = grad_out.sum(0) if need_b2 and ctx.has_bias[1] else None
        grad_hidden = grad_out.mm(weight2)
        # gelu'(a) * dH, written over dH: no second buffer of the hidden size
        torch.ops.aten.gelu_backward.grad_input(grad_hidden, hidden2d, grad_input=grad_hidden)
        grad_w1 = grad_hidden.t().mm(x.reshape(-1, x.shape[-1])) if need_w1 else None
        grad_b1 = grad_hidden.sum(0) if need_b1 and ctx.has_bias[0] else None
        grad_x = grad_hidden.mm(weight1).view(x.shape) if need_x else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2
