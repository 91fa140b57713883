"""Scaled dot-product attention with an additive bias, fused or explicit, and the switches
inspection tools turn on attention modules.

The fused path calls :func:`torch.nn.functional.scaled_dot_product_attention`; the
explicit path writes out DAT Eq. (2)/(9), ``softmax(q k^T / sqrt(d) + B) v``, and is the
oracle the fused path is tested against.

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

__all__ = ['attention', 'attention_switches', 'attention_weights']


def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        dropout_p: float = 0.,
        fused: bool = True,
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T / sqrt(d) + bias) v``.

    Args:
        q: queries, ``(B, heads, Nq, d)``.
        k: keys, ``(B, heads, Nk, d)``.
        v: values, ``(B, heads, Nk, d)``.
        bias: additive logits bias broadcastable to ``(B, heads, Nq, Nk)`` (position bias,
            masks), or None.
        dropout_p: attention dropout probability (applied only when > 0).
        fused: use ``F.scaled_dot_product_attention``; False runs the explicit reference.

    Returns:
        ``(B, heads, Nq, d)``.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    weights = attention_weights(q, k, bias)
    if dropout_p > 0.:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def attention_weights(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention probabilities ``softmax(q k^T / sqrt(d) + bias)`` of :func:`attention`.

    Shapes as in :func:`attention`; returns ``(B, heads, Nq, Nk)``, each row summing to 1.
    """
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, Nq, Nk)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


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
