"""Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``.

DAT Eq. (4)-(5) and the EAPT blocks of Table II have this shape; the attention module is
what distinguishes the families.
"""
import torch
import torch.nn as nn
from timm.layers import DropPath

from .mlp import Mlp

__all__ = ['PreNormBlock']


class PreNormBlock(nn.Module):
    """Pre-norm attention and MLP with residuals and stochastic depth.

    Args:
        dim: channels.
        attn: the attention module; takes and returns channels-last ``(B, H, W, C)`` maps.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        proj_drop: dropout in the MLP.
        drop_path: stochastic depth rate.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4., proj_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
