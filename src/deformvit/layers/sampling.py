"""Reference grids and differentiable bilinear sampling (DAT Sec. 3.2, Eq. (7)-(8)).

Points are ``(y, x)`` pairs in the normalised range ``[-1, +1]`` of a feature map, with
``(-1, -1)`` the top-left and ``(+1, +1)`` the bottom-right corner (DAT Sec. 3.2).
"""
import torch
import torch.nn.functional as F

__all__ = ['reference_points', 'sample_bilinear']


def reference_points(
        height: int,
        width: int,
        device: torch.device = None,
        dtype: torch.dtype = torch.float32,
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
