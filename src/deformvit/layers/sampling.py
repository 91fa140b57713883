"""Reference grids, differentiable bilinear sampling (DAT Sec. 3.2, Eq. (7)-(8)) and the record
of where a block sampled.

Points are ``(y, x)`` pairs in the normalised range ``[-1, +1]`` of a feature map, with
``(-1, -1)`` the top-left and ``(+1, +1)`` the bottom-right corner (DAT Sec. 3.2).
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

__all__ = ['SamplingPoints', 'reference_points', 'sample_bilinear']


class SamplingPoints(NamedTuple):
    """Deformed points of one deformable block, for visualisation (DAT Fig. 6, EAPT Eq. (1)-(2)).

    ``points`` and ``reference`` are ``(B, G, Hk, Wk, 2)`` tensors of ``(y, x)`` in
    ``[-1, 1]`` over the block's input map of ``feature_size``: ``points = reference +
    offsets``, one set per offset group ``G``. :meth:`to_pixels` maps them to input-image
    pixels.
    """
    stage: int
    block: int
    points: torch.Tensor
    reference: torch.Tensor
    feature_size: Tuple[int, int]
    stride: int
    align_corners: bool

    def to_pixels(self, which: str = 'points') -> torch.Tensor:
        """``points`` (or ``reference``) as ``(y, x)`` pixel coordinates of the input image."""
        coords = getattr(self, which)
        size = torch.tensor(self.feature_size, dtype=coords.dtype, device=coords.device)
        if self.align_corners:
            feature = (coords + 1) / 2 * (size - 1)
        else:
            feature = ((coords + 1) * size - 1) / 2
        return (feature + 0.5) * self.stride - 0.5


def reference_points(height: int, width: int, device: torch.device = None, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """Uniform grid of reference points ``p`` (DAT Sec. 3.2), one per cell of a
    ``height x width`` grid, at the cell centres ``(i + 0.5) / H * 2 - 1``.

    Returns:
        ``(height, width, 2)`` tensor of ``(y, x)`` normalised coordinates.
    """
    ys = torch.linspace(0.5, height - 0.5, height, device=device, dtype=dtype) / height * 2 - 1
    xs = torch.linspace(0.5, width - 0.5, width, device=device, dtype=dtype) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack((grid_y, grid_x), dim=-1)


def sample_bilinear(
        x: torch.Tensor,
        points: torch.Tensor,
        align_corners: bool = True,
) -> torch.Tensor:
    """Bilinear sampling ``phi(x; p)`` of DAT Eq. (8), zero outside the map.

    Args:
        x: ``(N, C, H, W)`` feature map.
        points: ``(N, Hp, Wp, 2)`` sampling locations as ``(y, x)`` in ``[-1, 1]``.
        align_corners: grid convention of ``F.grid_sample``; the DAT release samples with
            ``align_corners=True`` (see ``docs/dat.md``).

    Returns:
        ``(N, C, Hp, Wp)`` sampled features.
    """
    return F.grid_sample(x, points.flip(-1), mode='bilinear', padding_mode='zeros', align_corners=align_corners)
