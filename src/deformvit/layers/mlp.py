"""Transformer MLP (DAT Eq. (5)): Linear, GELU, Linear.

Parameter names (``fc1``, ``fc2``) follow timm's ``Mlp``. When no gradient is needed the
GELU runs in place on the hidden activations, which saves allocating the block's largest
tensor (4x the channels) once per block; it does not when ``fc1`` carries forward hooks,
which then see the pre-activation values they expect.
"""
import torch
import torch.nn as nn

__all__ = ['Mlp']


class Mlp(nn.Module):
    """Two-layer MLP with GELU.

    Args:
        in_features: input and output channels.
        hidden_features: hidden channels (``mlp_ratio * in_features``).
        drop: dropout after the activation and after the second layer.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if x.requires_grad or self.fc1._forward_hooks or torch.onnx.is_in_onnx_export():
            x = self.act(x)
        else:
            x = torch.ops.aten.gelu_(x)
        return self.drop2(self.fc2(self.drop1(x)))
