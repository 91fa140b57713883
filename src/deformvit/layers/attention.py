"""Scaled dot-product attention with an additive bias, fused or explicit.

The fused path calls :func:`torch.nn.functional.scaled_dot_product_attention`; the
explicit path writes out DAT Eq. (2)/(9), ``softmax(q k^T / sqrt(d) + B) v``, and is the
oracle the fused path is tested against.
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['attention', 'attention_weights']


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
