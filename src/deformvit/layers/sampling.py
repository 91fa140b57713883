"""Reference grids, differentiable bilinear sampling (DAT Sec. 3.2, Eq. (7)-(8)) and the record
of where a block sampled.

Points are ``(y, x)`` pairs in the normalised range ``[-1, +1]`` of a feature map, with
``(-1, -1)`` the top-left and ``(+1, +1)`` the bottom-right corner (DAT Sec. 3.2).

Every bilinear read of the package goes through :func:`bilinear_grid_sample`, which samples
float16 / bfloat16 maps on the CPU in float32 (see there): PyTorch's CPU grid sampler returns
NaN or garbage for large strided half-precision maps, such as the channels-last maps of DAT and
EAPT.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

__all__ = ['SamplingPoints', 'bilinear_grid_sample', 'reference_points', 'sample_bilinear']


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


def bilinear_grid_sample(x: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """``F.grid_sample`` in bilinear mode with zero padding, correct in every precision.

    Args:
        x: ``(N, C, H, W)`` map, any strides (channels-last views included).
        grid: ``(N, Ho, Wo, 2)`` locations as ``(x, y)`` in ``[-1, 1]``, in any floating dtype;
            float32 keeps positions unrounded where the sampling runs in float32.
        align_corners: grid convention of ``F.grid_sample``.

    Returns:
        ``(N, C, Ho, Wo)`` in ``x.dtype``.

    Float16 and bfloat16 maps on the CPU are sampled in float32 and the result cast back.
    PyTorch's CPU half-precision grid sampler reads strided maps wrongly (NaN, values near
    1e38 or merely wrong ones) once one image's map spans more than about 33k elements, e.g.
    a channels-last 14 x 14 x 192 map; its float32 kernel and contiguous half maps are right.
    Upcasting rather than ``.contiguous()`` costs the same one copy, runs faster than the CPU
    half kernel, keeps a float32 grid unrounded (bfloat16 rounds grid coordinates by up to
    2^-9, 0.05 pixel on a 56-pixel map) and is what CPU autocast does for ``grid_sampler``.
    Float32, and every other device, calls ``F.grid_sample`` unchanged, with the grid cast to
    ``x.dtype``.
    """
    if x.device.type == 'cpu' and x.dtype in (torch.float16, torch.bfloat16):
        # the CPU half kernel misreads strided maps; float32 is right, faster there and exact in the grid
        out = F.grid_sample(x.float(), grid.float(), mode='bilinear', padding_mode='zeros', align_corners=align_corners)
        return out.to(x.dtype)
    return F.grid_sample(x, grid.to(x.dtype), mode='bilinear', padding_mode='zeros', align_corners=align_corners)


def sample_bilinear(
        x: torch.Tensor,
        points: torch.Tensor,
        align_corners: bool = True,
) -> torch.Tensor:
    """Bilinear sampling ``phi(x; p)`` of DAT Eq. (8), zero outside the map.

    Args:
        x: ``(N, C, H, W)`` feature map.
        points: ``(N, Hp, Wp, 2)`` sampling locations as ``(y, x)`` in ``[-1, 1]``, any floating
            dtype (pass float32 points with a half-precision ``x``: see :func:`bilinear_grid_sample`).
        align_corners: grid convention of ``F.grid_sample``; the DAT release samples with
            ``align_corners=True`` (see ``docs/dat.md``).

    Returns:
        ``(N, C, Hp, Wp)`` sampled features in ``x.dtype``, finite in float16 / bfloat16 on the
        CPU too (:func:`bilinear_grid_sample`).
    """
    return bilinear_grid_sample(x, points.flip(-1), align_corners)
