"""RepPoints v2 (Chen et al., "RepPoints V2: Verification Meets Regression for Object Detection", NeurIPS 2020)
as the RepPoints v2 rows of Swin Transformer's Table 2 and EAPT Table IV (R-50 42M / 274G, Swin-T 45M / 283G)
were run, by Swin Transformer's released configuration
``reppoitsv2_swin_tiny_patch4_window7_mstrain_480_960_giou_gfocal_bifpn_adamw_3x_coco``: the head and losses of
the official code's (Scalsol/RepPointsV2) ``reppoints_v2_r50_fpn_giou_1x_coco``, with a BiFPN for its FPN and the
quality focal loss for its focal classification.

The neck (:class:`BiFPN`, the default ``neck='bifpn'``) max-pools C5 (stride 32) into P6 and P7 and fuses C3-P7 in
two BiFPN layers of 256 channels with GroupNorm; ``neck='fpn'`` is the official configuration's FPN (P3-P5 from
C3-C5, P6 a stride-2 convolution of C5, P7 of P6). The BiFPN's 11.4M (R-50) or 10.2M (Swin-T) parameters against
the FPN's 8.0M or 4.5M are the difference between the two configurations' sizes (42M against 39M, 45M against
39M). One head, shared by the five levels, predicts at every location:

* a localisation tower (three 3x3 conv-GN-ReLU) then a shared convolution, and a classification tower
  (three 3x3 conv-GN-ReLU);
* the foreground ("within box") heat map of each class from the shared features, whose 1x1 conv-GN-ReLU
  embedding is added to the localisation, classification and corner features (the official ``sem`` branch);
* top-left and bottom-right corner heat maps and their sub-cell offsets, from corner pooling (CornerNet's
  top/left and bottom/right poolings) of the shared features; the six maps are concatenated to the
  localisation and classification features (the verification features);
* nine initial points: offsets from the location regressed by a 3x3 conv and a 1x1 conv on the localisation
  features; they are the offsets of the 3x3 deformable convolutions (``torchvision.ops.DeformConv2d``, their
  gradient scaled by ``gradient_mul=0.1``) of the classifier and of the refinement, which adds offsets to the
  (detached) initial points.

A point set becomes a box by the configuration's ``exact_minmax`` conversion: the first point is the top-left
corner, the second the bottom-right (:func:`points_to_boxes`; ``minmax``, RepPoints' conversion, is an option).

Training, as ``train_cfg`` of the configuration: the initial points of the location nearest (relative to the
box size) to a box's centre on the box's level (``PointAssignerV2``, ``scale=4``, ``pos_num=1``) regress it;
the refined points and the classifier are labelled by ATSS (``topk=9``) over the initial boxes
(:func:`~deformvit.tasks.detection.assigners.atss_assign`); each box's corners peak at their nearest location
of every level, with Gaussian bumps (``PointHMAssigner``, ``gaussian_iou=0.7``) and sub-cell offsets there.
Losses: the quality focal loss of Generalized Focal Loss (``RPDQualityFocalLoss``, beta 2: the score target of a
positive is the IoU of its refined box; ``classification_loss='focal'`` is the official configuration's focal
loss), both weight 1, GIoU of the initial (1) and refined (2) boxes, Gaussian focal loss of the corner heat maps
(alpha 2, gamma 4, weight 0.25), smooth-L1 corner offsets (beta 1/9, weight 1) and the separate focal loss of the
foreground heat maps (weight 0.1, positives weighted by 1 / box area).

Inference, as ``test_cfg``: the 1000 best locations per level, the refined boxes of levels P4-P7 with their
corners moved to the best-scoring cell of the 2x2 around them in the corner heat map of P3 (for P4, P5) or P4
(for P6, P7) plus its offset (the official joint inference), scores above 0.05, NMS at IoU 0.6 within a class,
100 detections.

Differences from the official code: the ``'fpn'`` neck has no GroupNorm and torchvision's P7 reads ReLU(P6) (the
extra levels of :class:`~torchvision.ops.feature_pyramid_network.LastLevelP6P7`); the pyramid's inputs pass through
:class:`~deformvit.tasks.necks.PyramidFeatures`' LayerNorm per level; every point and score is decoded in
float32 (also under autocast); the foreground map's negatives are averaged over at least one positive, so that a
batch without boxes has a finite loss; the two corners of an ``exact_minmax`` box are put in order
(:func:`_ordered`) before any loss, assignment or detection reads them: the official code takes them as they
come, and the GIoU of a box crossed on both axes is above 1 (training from scratch at lr 1e-3 found that way
to a loss of -150,000 within one epoch of the digit scenes). The assigners are the official configuration's:
Swin Transformer's release is known here through its README (the configuration's name, 45M / 283G) and its
Mask RepPoints v2 sibling, whose neck and losses are the ones above.
"""
import math
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import DeformConv2d, batched_nms, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..necks import PyramidFeatures
from .assigners import atss_assign
from .base import Detector
from .shared import check_choice, check_integer, check_number, inside_own_padding

__all__ = ['BiFPN', 'BiFPNLayer', 'CornerPooling', 'FastFusion', 'HeadOutputs', 'PointGrid', 'RepPointsV2Detector',
           'RepPointsV2Head', 'box_levels', 'corner_targets', 'foreground_targets', 'gaussian_radius', 'point_assign',
           'points_to_boxes']

TRANSFORM_METHODS = ('exact_minmax', 'minmax')
NECKS = ('bifpn', 'fpn')
CLASSIFICATION_LOSSES = ('quality_focal', 'focal')
GROUPS = 32  # GroupNorm groups of every normalised convolution (``norm_cfg=dict(type='GN', num_groups=32)``)
CORNER_CHANNELS = 64  # ``corner_dim``
PRIOR_PROBABILITY = 0.01  # initial sigmoid of the classifier and the heat maps (``bias_init_with_prob(0.01)``)
INIT_POSITIVES = 1  # ``PointAssignerV2(pos_num=1)``: one location per box trains the initial points
GAUSSIAN_IOU = 0.7  # ``PointHMAssigner(gaussian_iou=0.7)``
FOREGROUND_STRIDE = 8  # the foreground map is drawn at stride 8 and resized to every level
LOSS_WEIGHTS = dict(loss_cls=1.0, loss_pts_init=1.0, loss_pts_refine=2.0, loss_heatmap=0.25, loss_offset=1.0,
                    loss_sem=0.1)
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # classification and foreground maps
QUALITY_FOCAL_BETA = 2.0
BIFPN_REPEATS = 2  # ``num_repeat=2``
HEATMAP_ALPHA, HEATMAP_GAMMA = 2.0, 4.0  # GaussianFocalLoss
OFFSET_BETA = 1.0 / 9.0
# the level whose corner heat map refines the boxes of each level at test time (P3 for P4-P5, P4 for P6-P7)
CORNER_SOURCE_LEVELS = (None, 0, 0, 1, 1)


def points_to_boxes(points: torch.Tensor, method: str = 'exact_minmax') -> torch.Tensor:
    """The boxes ``x1, y1, x2, y2`` (..., 4) of point sets ``points`` (..., P, 2) given as ``x, y``.

    ``exact_minmax`` (the configuration's): the first point is the top-left corner and the second the
    bottom-right, the other points only sample features; ``minmax`` (RepPoints'): the points' bounding box.
    """
    if method == 'exact_minmax':
        return torch.cat([points[..., 0, :], points[..., 1, :]], -1)
    if method == 'minmax':
        return torch.cat([points.amin(-2), points.amax(-2)], -1)
    raise ValueError(f'unknown transform_method {method!r}; expected one of {", ".join(TRANSFORM_METHODS)}')


def box_levels(gt_boxes: torch.Tensor, base_scales: Sequence[int]) -> torch.Tensor:
    """The pyramid level (0 = finest) of each box (M, 4): the last whose base scale is at most the box's
    geometric mean side, the first for smaller boxes (``PointAssignerV2``: level log2(sqrt(wh) / 4) at stride
    2^level, base scale 4 x stride)."""
    sides = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6).prod(1).sqrt()  # (M,)
    scales = torch.tensor(base_scales, dtype=sides.dtype, device=sides.device)
    return ((sides[:, None] >= scales).sum(1) - 1).clamp(0, len(base_scales) - 1)


def point_assign(points: torch.Tensor, point_levels: torch.Tensor, gt_boxes: torch.Tensor, gt_levels: torch.Tensor,
                 positives_per_box: int = INIT_POSITIVES) -> torch.Tensor:
    """The ground-truth box whose initial points each location regresses, or -1 (``PointAssignerV2``).

    Each box takes the ``positives_per_box`` locations of its level nearest to its centre, distances measured
    in box widths and heights; a location taken by several boxes goes to the one it is nearest to.

    Args:
        points: (N, 2) location ``x, y``.
        point_levels: (N,) pyramid level of each location.
        gt_boxes: (M, 4) boxes ``x1, y1, x2, y2``.
        gt_levels: (M,) pyramid level of each box (:func:`box_levels`).

    Returns:
        LongTensor (N,): index in ``gt_boxes`` or -1.
    """
    assigned = torch.full((len(points),), -1, dtype=torch.long, device=points.device)
    if len(gt_boxes) == 0 or len(points) == 0:
        return assigned
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (M, 2)
    sizes = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)  # (M, 2)
    distances = ((points[:, None] - centres) / sizes).norm(dim=2)  # (N, M)
    distances[point_levels[:, None] != gt_levels[None]] = math.inf
    nearest, nearest_index = distances.topk(min(positives_per_box, len(points)), dim=0, largest=False)  # (k, M)
    claimed = torch.full_like(distances, math.inf)  # (N, M): the distance where a box takes the location
    claimed.scatter_(0, nearest_index, nearest)
    best, best_box = claimed.min(1)
    return torch.where(torch.isfinite(best), best_box, assigned)


def gaussian_radius(heights: torch.Tensor, widths: torch.Tensor, min_overlap: float = GAUSSIAN_IOU) -> torch.Tensor:
    """CornerNet's corner radius: how far both corners may move while the box keeps IoU ``min_overlap``, the
    least of the three cases (both inside, both outside, one of each), as the official ``gaussian_radius``."""
    sum_sides, area = heights + widths, heights * widths
    r1 = (sum_sides - (sum_sides ** 2 - 4 * area * (1 - min_overlap) / (1 + min_overlap)).sqrt()) / 2
    r2 = (2 * sum_sides - (4 * sum_sides ** 2 - 16 * (1 - min_overlap) * area).sqrt()) / 8
    r3 = (-2 * min_overlap * sum_sides
          + (4 * min_overlap ** 2 * sum_sides ** 2 - 16 * min_overlap * (min_overlap - 1) * area).sqrt()) / (
        8 * min_overlap)
    return torch.stack([r1, r2, r3], 1).amin(1)


def corner_targets(points: torch.Tensor, point_levels: torch.Tensor, strides: torch.Tensor, gt_boxes: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heat-map and offset targets of the top-left and bottom-right corners (``PointHMAssigner``).

    On every level, each box's corner peaks (1) at its nearest location, whose offset target is the corner
    minus the location in strides; locations within a corner's radius (:func:`gaussian_radius`) take the
    Gaussian ``exp(-d^2 / (2 sigma^2))``, sigma = (2 radius + 1) / 6, the largest of such corners'.

    Args:
        points: (N, 2) location ``x, y``.
        point_levels: (N,) pyramid level of each location.
        strides: (N,) stride of each location's level.
        gt_boxes: (M, 4) boxes.

    Returns:
        ``(heat (N, 2), offsets (N, 4), peaks (N, 2) bool)``: the top-left then bottom-right heat targets, their
        ``dx, dy`` offsets, and where the heat is 1 (the locations whose offsets are trained).
    """
    heat = points.new_zeros(len(points), 2)
    offsets = points.new_zeros(len(points), 4)
    if len(gt_boxes) == 0:
        return heat, offsets, heat > 0
    sizes = gt_boxes[:, 2:] - gt_boxes[:, :2]  # (M, 2)
    radius = gaussian_radius(sizes[:, 1], sizes[:, 0])  # (M,)
    sigma = (2 * radius + 1) / 6
    for corner in range(2):
        corners = gt_boxes[:, 2 * corner:2 * corner + 2]  # (M, 2)
        for level in point_levels.unique():
            on_level = torch.where(point_levels == level)[0]
            distances = torch.cdist(points[on_level], corners)  # (n, M)
            gaussian = torch.exp(-distances ** 2 / (2 * sigma ** 2))
            gaussian = torch.where(distances < radius, gaussian, torch.full_like(gaussian, -math.inf)).amax(1)
            bumped = torch.isfinite(gaussian)
            heat[on_level[bumped], corner] = gaussian[bumped]
            nearest = on_level[distances.argmin(0)]  # (M,)
            heat[nearest, corner] = 1.0
            offsets[nearest, 2 * corner:2 * corner + 2] = (corners - points[nearest]) / strides[nearest, None]
    return heat, offsets, heat == 1


def foreground_targets(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, num_classes: int,
                       shape: Tuple[int, int], stride: int = FOREGROUND_STRIDE) -> Tuple[torch.Tensor, torch.Tensor]:
    """The foreground map of each class at ``stride`` (``LoadRPDV2Annotations``): the cells from the one holding
    a box's top-left corner to the one holding its bottom-right are foreground of its class, weighted by
    1 / the area of the smallest such box of the class covering the cell.

    Args:
        gt_boxes: (M, 4) boxes in pixels.
        gt_labels: (M,) labels in 1..num_classes.
        num_classes: object classes.
        shape: ``(H, W)`` of the map (the padded batch divided by ``stride``).

    Returns:
        ``(target (K, H, W) in {0, 1}, weight (K, H, W))``.
    """
    height, width = shape
    weight = gt_boxes.new_zeros(num_classes, height, width)
    if len(gt_boxes) == 0:
        return weight, weight
    first, last = (gt_boxes[:, :2] / stride).floor(), (gt_boxes[:, 2:] / stride).floor()  # (M, 2) cells x, y
    rows = torch.arange(height, device=gt_boxes.device, dtype=gt_boxes.dtype)
    cols = torch.arange(width, device=gt_boxes.device, dtype=gt_boxes.dtype)
    in_rows = (rows >= first[:, 1:]) & (rows <= last[:, 1:])  # (M, H)
    in_cols = (cols >= first[:, :1]) & (cols <= last[:, :1])  # (M, W)
    areas = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(1)  # (M,)
    inverse_area = torch.where(in_rows[:, :, None] & in_cols[:, None, :], 1 / areas[:, None, None], 0.0)  # (M, H, W)
    classes = (gt_labels - 1)[:, None].expand(-1, height * width)  # (M, H W)
    weight.view(num_classes, -1).scatter_reduce_(0, classes, inverse_area.flatten(1), 'amax')
    return (weight > 0).to(weight.dtype), weight


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv's ``ConvModule`` with GroupNorm: a bias-free convolution (Kaiming-initialised), GroupNorm, ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
    return nn.Sequential(conv, _group_norm(out_channels), nn.ReLU(inplace=True))


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of 32 groups; narrower heads (tests) keep at least 8 channels a group, as 256 channels have,
    so that a 1x1 level still normalises more than one value per group."""
    return nn.GroupNorm(math.gcd(GROUPS, max(channels // 8, 1)), channels)


def _corner_pool(x: torch.Tensor, dim: int, towards_start: bool) -> torch.Tensor:
    """CornerNet's corner pooling along ``dim``: the running maximum from the far end (``towards_start``: top
    and left pooling, each location the maximum of those below or right of it) or from the start."""
    if towards_start:
        return x.flip(dim).cummax(dim).values.flip(dim)
    return x.cummax(dim).values


class CornerPooling(nn.Module):
    """The corner pooling module of CornerNet as RepPoints v2 uses it (the official ``TLPool`` / ``BRPool``).

    Two conv-GN-ReLU branches pooled towards the corner vertically and horizontally, summed, a 3x3 convolution
    with GroupNorm added to a 1x1 convolution with GroupNorm of the input, ReLU, then a conv-GN-ReLU.

    Args:
        channels: input and output channels.
        corner: ``'top_left'`` (top and left pooling) or ``'bottom_right'`` (bottom and right pooling).
        corner_channels: channels of the pooled branches.
        first_kernel_size: kernel of the branches' convolutions.
        kernel_size: kernel of the output convolution.
    """

    def __init__(self, channels: int, corner: str, corner_channels: int = CORNER_CHANNELS, first_kernel_size: int = 3,
                 kernel_size: int = 1):
        super().__init__()
        if corner not in ('top_left', 'bottom_right'):
            raise ValueError(f"corner {corner!r}: expected 'top_left' or 'bottom_right'")
        self.towards_start = corner == 'top_left'
        self.vertical = _conv_norm_relu(channels, corner_channels, first_kernel_size)
        self.horizontal = _conv_norm_relu(channels, corner_channels, first_kernel_size)
        self.pooled_conv = nn.Conv2d(corner_channels, channels, 3, padding=1, bias=False)
        self.pooled_norm = _group_norm(channels)
        self.skip_conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.skip_norm = _group_norm(channels)
        self.out = _conv_norm_relu(channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = (_corner_pool(self.vertical(x), 2, self.towards_start)
                  + _corner_pool(self.horizontal(x), 3, self.towards_start))
        merged = self.pooled_norm(self.pooled_conv(pooled)) + self.skip_norm(self.skip_conv(x))
        return self.out(F.relu(merged))


class FastFusion(nn.Module):
    """EfficientDet's fast normalised fusion (Tan et al., CVPR 2020, Eq. (3)), then swish, as the BiFPN of Swin
    Transformer's RepPoints v2 (``LayerCombineModule``): the maps weighted by ReLU(w) / (sum ReLU(w) + 1e-4).

    Args:
        inputs: number of maps fused.
    """

    def __init__(self, inputs: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(inputs))

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        weights = self.weights.relu()
        weights = weights / (weights.sum() + 1e-4)
        return F.silu(sum(w * m for w, m in zip(weights, maps)))


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """A bias-free convolution (Xavier-initialised, as the BiFPN's ``init_weights``) and GroupNorm, no activation."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.xavier_uniform_(conv.weight)
    return nn.Sequential(conv, _group_norm(out_channels))


class BiFPNLayer(nn.Module):
    """One BiFPN layer (the ``SingleBiFPN`` of Swin Transformer's RepPoints v2 neck).

    Each level is projected to ``channels`` by a 1x1 convolution with GroupNorm where its width differs; a
    top-down path fuses each level with the upsampled coarser one (3x3 conv-GN after the fusion), then a bottom-up
    path fuses each level's top-down map with the max-pooled finer output and, below the top, its projection.

    Args:
        in_channels: channels of the input levels, finest first.
        channels: channels of the outputs.
    """

    def __init__(self, in_channels: Sequence[int], channels: int):
        super().__init__()
        num_levels = len(in_channels)
        self.laterals = nn.ModuleList(_conv_norm(c, channels, 1) if c != channels else nn.Identity()
                                      for c in in_channels)
        self.top_down_fusions = nn.ModuleList(FastFusion(2) for _ in range(num_levels - 1))
        self.top_down_convs = nn.ModuleList(_conv_norm(channels, channels, 3) for _ in range(num_levels - 1))
        self.bottom_up_fusions = nn.ModuleList(FastFusion(3 if level < num_levels - 1 else 2)
                                               for level in range(1, num_levels))
        self.bottom_up_convs = nn.ModuleList(_conv_norm(channels, channels, 3) for _ in range(num_levels - 1))

    def forward(self, levels: List[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [lateral(x) for lateral, x in zip(self.laterals, levels)]
        top_down = list(laterals)
        for i in range(len(levels) - 1, 0, -1):
            upsampled = F.interpolate(top_down[i], size=top_down[i - 1].shape[-2:], mode='nearest')
            top_down[i - 1] = self.top_down_convs[i - 1](self.top_down_fusions[i - 1]([top_down[i - 1], upsampled]))
        outputs = list(top_down)
        for i in range(len(levels) - 1):
            fused = [F.max_pool2d(outputs[i], 3, stride=2, padding=1), top_down[i + 1]]
            if i + 1 < len(levels) - 1:
                fused.append(laterals[i + 1])
            outputs[i + 1] = self.bottom_up_convs[i](self.bottom_up_fusions[i](fused))
        return outputs


class BiFPN(nn.Module):
    """The BiFPN neck of Swin Transformer's RepPoints v2 (``BiFPN(num_repeat=2, add_extra_convs=False,
    no_norm_on_lateral=False, norm_cfg=GN)``, the neck of the RepPoints v2 code's ``mmdet/models/necks/bifpn.py``
    that the released configuration sets), in place of the FPN of a :class:`PyramidFeatures`.

    The coarsest backbone level is max-pooled (3x3, stride 2) into ``extra_levels`` more levels (P6, P7), then
    ``repeats`` :class:`BiFPNLayer` s run on the five; the first projects the backbone's widths.

    Args:
        in_channels: channels of the backbone levels, finest first.
        channels: channels of the pyramid levels.
        repeats: BiFPN layers.
        extra_levels: levels max-pooled on top of the backbone's.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, repeats: int = BIFPN_REPEATS, extra_levels: int = 2):
        super().__init__()
        self.extra_levels = extra_levels
        widths = list(in_channels) + [in_channels[-1]] * extra_levels
        self.layers = nn.ModuleList(BiFPNLayer(widths if i == 0 else [channels] * len(widths), channels)
                                    for i in range(repeats))

    def forward(self, x: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The levels ``x`` (``'0'``, ``'1'``... finest first) and ``'p6'``, ``'p7'``..., fused."""
        levels = list(x.values())
        for _ in range(self.extra_levels):
            levels.append(F.max_pool2d(levels[-1], 3, stride=2, padding=1))
        for layer in self.layers:
            levels = layer(levels)
        names = list(x) + [f'p{6 + i}' for i in range(self.extra_levels)]  # above C3-C5, as LastLevelP6P7 names them
        return OrderedDict(zip(names, levels))


class HeadOutputs(NamedTuple):
    """The head's predictions on one pyramid level of a (B, C, H, W) map."""
    cls_logits: torch.Tensor  # (B, K, H, W)
    points_init: torch.Tensor  # (B, 2P, H, W): offsets dy, dx of each point, in strides
    points_refine: torch.Tensor  # (B, 2P, H, W)
    corner_heat: torch.Tensor  # (B, 2, H, W): top-left, bottom-right logits
    corner_offsets: torch.Tensor  # (B, 4, H, W): top-left dx, dy, bottom-right dx, dy, in strides
    foreground_logits: torch.Tensor  # (B, K, H, W)


class RepPointsV2Head(nn.Module):
    """The RepPoints v2 head (the official ``RepPointsV2Head``), shared by the pyramid levels.

    Args:
        in_channels: channels of the pyramid levels and of the towers (``feat_channels``).
        num_classes: object classes, without the background.
        num_points: points per location, an odd square: the deformable convolutions' kernel is its root.
        gradient_mul: share of the gradient of the deformable convolutions' loss that reaches the initial points.
        stacked_convs: 3x3 conv-GN-ReLU of the classification and localisation towers.
        shared_stacked_convs: conv-GN-ReLU after the localisation tower, feeding the verification branches.
        point_channels: channels of the point and classification convolutions (``point_feat_channels``).
        corner_channels: channels of the corner pooling branches (``corner_dim``).
    """

    def __init__(self, in_channels: int, num_classes: int, num_points: int = 9, gradient_mul: float = 0.1,
                 stacked_convs: int = 3, shared_stacked_convs: int = 1, point_channels: Optional[int] = None,
                 corner_channels: int = CORNER_CHANNELS):
        super().__init__()
        kernel = math.isqrt(num_points)
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ValueError(f'num_points {num_points}: expected an odd square (9, 25...), the deformable kernel')
        point_channels = point_channels or in_channels
        self.num_points = num_points
        self.gradient_mul = gradient_mul
        self.cls_convs = nn.Sequential(*(_conv_norm_relu(in_channels, in_channels, 3) for _ in range(stacked_convs)))
        self.reg_convs = nn.Sequential(*(_conv_norm_relu(in_channels, in_channels, 3) for _ in range(stacked_convs)))
        self.shared_convs = nn.Sequential(*(_conv_norm_relu(in_channels, in_channels, 3)
                                            for _ in range(shared_stacked_convs)))
        self.foreground_logits = nn.Conv2d(in_channels, num_classes, 1)
        self.foreground_embedding = _conv_norm_relu(in_channels, in_channels, 1)
        self.top_left_pool = CornerPooling(in_channels, 'top_left', corner_channels)
        self.bottom_right_pool = CornerPooling(in_channels, 'bottom_right', corner_channels)
        self.top_left_heat = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.bottom_right_heat = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.top_left_offset = nn.Conv2d(in_channels, 2, 3, padding=1)
        self.bottom_right_offset = nn.Conv2d(in_channels, 2, 3, padding=1)
        self.points_init_conv = nn.Conv2d(in_channels, point_channels, 3, padding=1)
        self.points_init_out = nn.Conv2d(point_channels, 2 * num_points, 1)
        verified_channels = in_channels + 6  # the tower's features and the two heat maps and four offsets
        self.cls_deform_conv = DeformConv2d(verified_channels, point_channels, kernel, padding=kernel // 2, bias=False)
        self.cls_out = nn.Conv2d(point_channels, num_classes, 1)
        self.points_refine_deform_conv = DeformConv2d(verified_channels, point_channels, kernel, padding=kernel // 2,
                                                      bias=False)
        self.points_refine_out = nn.Conv2d(point_channels, 2 * num_points, 1)
        # the regular kernel's sampling positions dy, dx, row by row: a point minus it is the deformable offset
        grid = torch.arange(kernel, dtype=torch.float32) - kernel // 2
        kernel_points = torch.stack(torch.meshgrid(grid, grid, indexing='ij'), -1)  # (k, k, 2) dy, dx
        self.register_buffer('kernel_offsets', kernel_points.reshape(1, 2 * num_points, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        prior = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        for tower in (self.cls_convs, self.reg_convs, self.shared_convs):
            for block in tower:
                nn.init.normal_(block[0].weight, std=0.01)
        for conv in (self.cls_deform_conv, self.cls_out, self.points_init_conv, self.points_init_out,
                     self.points_refine_deform_conv, self.points_refine_out, self.top_left_heat,
                     self.bottom_right_heat, self.top_left_offset, self.bottom_right_offset, self.foreground_logits):
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for conv in (self.cls_out, self.top_left_heat, self.bottom_right_heat, self.foreground_logits):
            nn.init.constant_(conv.bias, prior)

    @staticmethod
    def _deform(conv: DeformConv2d, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``conv`` in its weights' precision: torchvision's CPU kernel has no bfloat16 (autocast)."""
        return conv(x.to(conv.weight.dtype), offset.to(conv.weight.dtype))

    def forward_level(self, x: torch.Tensor) -> HeadOutputs:
        cls_features = self.cls_convs(x)
        point_features = self.reg_convs(x)
        shared = self.shared_convs(point_features)
        foreground_logits = self.foreground_logits(shared)
        embedding = self.foreground_embedding(shared)
        cls_features = cls_features + embedding
        point_features = point_features + embedding
        corner_features = shared + embedding
        top_left, bottom_right = self.top_left_pool(corner_features), self.bottom_right_pool(corner_features)
        corner_heat = torch.cat([self.top_left_heat(top_left), self.bottom_right_heat(bottom_right)], 1)
        corner_offsets = torch.cat([self.top_left_offset(top_left), self.bottom_right_offset(bottom_right)], 1)
        points_init = self.points_init_out(F.relu(self.points_init_conv(point_features)))
        scaled_gradient = (1 - self.gradient_mul) * points_init.detach() + self.gradient_mul * points_init
        deform_offset = scaled_gradient - self.kernel_offsets.to(scaled_gradient.dtype)
        verification = torch.cat([corner_heat, corner_offsets], 1)  # (B, 6, H, W)
        cls_features = torch.cat([cls_features, verification], 1)
        point_features = torch.cat([point_features, verification], 1)
        cls_logits = self.cls_out(F.relu(self._deform(self.cls_deform_conv, cls_features, deform_offset)))
        points_refine = self.points_refine_out(F.relu(
            self._deform(self.points_refine_deform_conv, point_features, deform_offset)))
        return HeadOutputs(cls_logits, points_init, points_refine + points_init.detach(), corner_heat, corner_offsets,
                           foreground_logits)

    def forward(self, levels: List[torch.Tensor]) -> List[HeadOutputs]:
        return [self.forward_level(x) for x in levels]


class PointGrid(NamedTuple):
    """The locations of every pyramid level, finest first, row by row."""
    centres: torch.Tensor  # (N, 2) x, y in pixels of the padded batch
    strides: torch.Tensor  # (N,)
    levels: torch.Tensor  # (N,) level index
    sizes: List[Tuple[int, int]]  # (H, W) of each level


class _Predictions(NamedTuple):
    """The head's outputs of all levels, flattened to the locations of the :class:`PointGrid`, in float32."""
    cls_logits: torch.Tensor  # (B, N, K)
    boxes_init: torch.Tensor  # (B, N, 4) pixels
    boxes_refine: torch.Tensor  # (B, N, 4) pixels
    corner_heat: torch.Tensor  # (B, N, 2) logits
    corner_offsets: torch.Tensor  # (B, N, 4)


def _flatten(maps: List[torch.Tensor]) -> torch.Tensor:
    """Per-level (B, C, H, W) maps as one (B, N, C) float32 tensor, N the locations of all levels."""
    return torch.cat([m.float().permute(0, 2, 3, 1).reshape(len(m), -1, m.shape[1]) for m in maps], 1)


def _odd_square(n: int) -> bool:
    return n > 1 and math.isqrt(n) ** 2 == n and math.isqrt(n) % 2 == 1


class RepPointsV2Detector(Detector, nn.Module):
    """RepPoints v2 over P3-P7 of a deformvit (or timm) backbone; build with :meth:`build`.

    ``anchor_sizes`` are the base scales of the levels (``point_base_scale`` 4 x stride): a box trains the
    initial points of the level whose base scale its geometric mean side reaches last.

    Args:
        backbone: the feature pyramid (P3-P7).
        num_classes: object classes, without the background.
        base_scales: base scale of each pyramid level.
        transform: torchvision's resizing, normalisation and batching of the images.
        score_thresh: lowest class score of a detection (``score_thr``).
        nms_thresh: IoU of non-maximum suppression within a class.
        detections_per_img: most detections per image (``max_per_img``).
        topk_candidates: best locations per level kept before NMS (``nms_pre``).
        num_points: points per location, an odd square greater than one.
        gradient_mul: share of the deformable convolutions' gradient reaching the initial points.
        transform_method: ``'exact_minmax'`` or ``'minmax'`` (:func:`points_to_boxes`).
        atss_topk: ATSS candidates per level and box of the refinement stage.
        classification_loss: ``'quality_focal'`` (Swin Transformer's: the score target of a positive is the IoU
            of its refined box with its ground truth) or ``'focal'`` (the official configuration's).

    ``detector_kwargs`` of :meth:`build` are these options and ``neck``: ``'bifpn'`` (Swin Transformer's,
    :class:`BiFPN`) or ``'fpn'`` (the official configuration's: P6 by a 3x3 stride-2 convolution of C5, P7 of P6).
    """
    strides = (8, 16, 32)
    anchor_sizes = (32, 64, 128, 256, 512)
    defaults = dict(score_thresh=0.05, nms_thresh=0.6, detections_per_img=100, topk_candidates=1000, num_points=9,
                    gradient_mul=0.1, transform_method='exact_minmax', atss_topk=9,
                    classification_loss='quality_focal', neck='bifpn')

    def __init__(self, backbone: PyramidFeatures, num_classes: int, base_scales: Sequence[int],
                 transform: GeneralizedRCNNTransform, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 1000, num_points: int = 9,
                 gradient_mul: float = 0.1, transform_method: str = 'exact_minmax', atss_topk: int = 9,
                 classification_loss: str = 'quality_focal'):
        super().__init__()
        self.backbone = backbone
        self.transform = transform
        self.head = RepPointsV2Head(backbone.out_channels, num_classes, num_points, gradient_mul)
        self.num_classes = num_classes
        self.base_scales = tuple(base_scales)
        finest = backbone.strides[0]
        self.point_strides = tuple(finest * 2 ** level for level in range(len(self.base_scales)))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.transform_method = transform_method
        self.atss_topk = atss_topk
        self.classification_loss = classification_loss

    # ---- options
    @classmethod
    def options(cls):
        return set(cls.defaults)

    @classmethod
    def check_options(cls, detector_kwargs: Dict) -> None:
        super().check_options(detector_kwargs)
        cls.reppoints_options(detector_kwargs)

    @classmethod
    def reppoints_options(cls, kwargs: Dict) -> Dict:
        """``kwargs`` with the defaults filled in, each checked; UsageError naming a bad value."""
        options = dict(cls.defaults, **kwargs)
        return dict(
            score_thresh=check_number('score_thresh', options['score_thresh'], 'a class score in [0, 1)',
                                      lambda v: 0 <= v < 1),
            nms_thresh=check_number('nms_thresh', options['nms_thresh'], 'an IoU in (0, 1]', lambda v: 0 < v <= 1),
            detections_per_img=check_integer('detections_per_img', options['detections_per_img'],
                                             'a positive whole number of detections'),
            topk_candidates=check_integer('topk_candidates', options['topk_candidates'],
                                          'a positive whole number of locations per level'),
            num_points=check_integer(
                'num_points', options['num_points'],
                'an odd square greater than 1 (9, 25, ...): the points of a k x k deformable kernel', _odd_square),
            gradient_mul=check_number('gradient_mul', options['gradient_mul'], 'a gradient share in [0, 1]',
                                      lambda v: 0 <= v <= 1),
            transform_method=check_choice('transform_method', options['transform_method'], TRANSFORM_METHODS),
            atss_topk=check_integer('atss_topk', options['atss_topk'], 'a positive whole number of ATSS candidates'),
            classification_loss=check_choice('classification_loss', options['classification_loss'],
                                             CLASSIFICATION_LOSSES),
            neck=check_choice('neck', options['neck'], NECKS))

    @classmethod
    def assemble(cls, body: nn.Module, num_classes: int, fpn_channels: int, anchor_sizes: Tuple[int, ...],
                 representation_size: int, transform: Dict, **detector_kwargs) -> 'RepPointsV2Detector':
        options = cls.reppoints_options(detector_kwargs)
        channels = body.feature_info.channels()
        if options.pop('neck') == 'bifpn':
            features = PyramidFeatures(body, fpn_channels)
            features.fpn = BiFPN(channels, fpn_channels)  # the per-level LayerNorms stay, the FPN is replaced
        else:
            features = PyramidFeatures(body, fpn_channels, LastLevelP6P7(channels[-1], fpn_channels))
        return cls(features, num_classes, anchor_sizes, GeneralizedRCNNTransform(**transform), **options)

    # ---- forward
    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """Losses (training) or detections per image (``boxes``, ``labels``, ``scores``) in the images' pixels."""
        if self.training:
            if targets is None:
                raise ValueError('targets are needed in training; expected a dict with boxes and labels per image')
            self._check_targets(targets)
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        outputs = self.head(list(self.backbone(batch.tensors).values()))
        grid = self.point_grid([tuple(o.cls_logits.shape[-2:]) for o in outputs], batch.tensors.device)
        predictions = self.decode(outputs, grid)
        if self.training:
            return self.losses(outputs, predictions, grid, batch.image_sizes, tuple(batch.tensors.shape[-2:]),
                               targets)
        detections = self.detect(outputs, predictions, grid, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def _check_targets(self, targets: List[Dict[str, torch.Tensor]]) -> None:
        for i, target in enumerate(targets):
            boxes, labels = target['boxes'], target['labels']
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(labels) != len(boxes):
                raise ValueError(f'target {i}: boxes of shape {tuple(boxes.shape)} and {len(labels)} labels; expected '
                                 f'(n, 4) boxes and n labels')
            if len(boxes) and ((boxes[:, 2:] <= boxes[:, :2]).any() or labels.min() < 1
                               or labels.max() > self.num_classes):
                raise ValueError(f'target {i}: boxes must have positive width and height and labels lie in '
                                 f'1..{self.num_classes}; got labels {labels.tolist()}')

    def point_grid(self, sizes: List[Tuple[int, int]], device: torch.device) -> PointGrid:
        """The locations ``(x, y) = (col, row) x stride`` of levels of ``sizes`` (the official ``PointGenerator``)."""
        centres, strides, levels = [], [], []
        for level, ((height, width), stride) in enumerate(zip(sizes, self.point_strides)):
            rows = torch.arange(height, device=device, dtype=torch.float32) * stride
            cols = torch.arange(width, device=device, dtype=torch.float32) * stride
            y, x = torch.meshgrid(rows, cols, indexing='ij')
            centres.append(torch.stack([x, y], -1).reshape(-1, 2))  # (H W, 2)
            strides.append(torch.full((height * width,), float(stride), device=device))
            levels.append(torch.full((height * width,), level, device=device, dtype=torch.long))
        return PointGrid(torch.cat(centres), torch.cat(strides), torch.cat(levels), list(sizes))

    def points(self, raw: torch.Tensor, grid: PointGrid) -> torch.Tensor:
        """Point sets (B, N, P, 2) ``x, y`` in pixels from the flattened (B, N, 2P) ``dy, dx`` offsets in strides."""
        offsets = raw.reshape(*raw.shape[:2], -1, 2).flip(-1)  # (B, N, 2P) -> (B, N, P, 2) dx, dy
        return grid.centres[:, None] + offsets * grid.strides[:, None, None]

    def decode(self, outputs: List[HeadOutputs], grid: PointGrid) -> _Predictions:
        """The head's outputs flattened over the locations, and its point sets as boxes (corners in order), in
        float32."""
        boxes = [_ordered(points_to_boxes(self.points(_flatten([getattr(o, name) for o in outputs]), grid),
                                          self.transform_method)) for name in ('points_init', 'points_refine')]
        return _Predictions(_flatten([o.cls_logits for o in outputs]), *boxes,
                            _flatten([o.corner_heat for o in outputs]), _flatten([o.corner_offsets for o in outputs]))

    # ---- training
    def valid_points(self, grid: PointGrid, image_size: Tuple[int, int]) -> torch.Tensor:
        """(N,) the locations inside the image padded to the transform's multiple (the official valid flags)."""
        return inside_own_padding(grid.centres, image_size, self.transform.size_divisible)

    def image_targets(self, grid: PointGrid, valid: torch.Tensor, boxes_init: torch.Tensor, gt_boxes: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's assignments over its ``valid`` locations (-1 elsewhere and for the background).

        Returns:
            ``(initial box index (N,), refined box index (N,), corner heat (N, 2), corner offsets (N, 4),
            corner peaks (N, 2))``: :func:`point_assign`, ATSS over the detached initial boxes ``boxes_init``
            (N, 4), and :func:`corner_targets`.
        """
        index = torch.where(valid)[0]
        centres, levels = grid.centres[index], grid.levels[index]
        init = torch.full((len(valid),), -1, dtype=torch.long, device=valid.device)
        refine = init.clone()
        init[index] = point_assign(centres, levels, gt_boxes, box_levels(gt_boxes, self.base_scales))
        anchors = boxes_init[index].detach()
        num_per_level = torch.bincount(levels, minlength=len(grid.sizes)).tolist()
        refine[index] = atss_assign(anchors, num_per_level, gt_boxes, topk=self.atss_topk)
        heat, offsets = centres.new_zeros(len(valid), 2), centres.new_zeros(len(valid), 4)
        peaks = torch.zeros(len(valid), 2, dtype=torch.bool, device=valid.device)
        heat[index], offsets[index], peaks[index] = corner_targets(centres, levels, grid.strides[index], gt_boxes)
        return init, refine, heat, offsets, peaks

    def losses(self, outputs: List[HeadOutputs], predictions: _Predictions, grid: PointGrid,
               image_sizes: List[Tuple[int, int]], batch_shape: Tuple[int, int],
               targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The official losses, each weighted (:data:`LOSS_WEIGHTS`) and averaged over the positives of the batch
        (at least one per image, as mmdetection counts them)."""
        device = predictions.cls_logits.device
        valid, labels, init_gt, init_positive, refine_gt, refine_positive = [], [], [], [], [], []
        heat, offsets, peaks = [], [], []
        for b, (size, target) in enumerate(zip(image_sizes, targets)):
            gt_boxes, gt_labels = target['boxes'].float(), target['labels'].long()
            image_valid = self.valid_points(grid, size)
            init, refine, image_heat, image_offsets, image_peaks = self.image_targets(
                grid, image_valid, predictions.boxes_init[b], gt_boxes)
            padded = torch.cat([gt_boxes, gt_boxes.new_zeros(1, 4)])  # index -1: a zero box, never read
            valid.append(image_valid)
            labels.append(torch.cat([gt_labels, gt_labels.new_zeros(1)])[refine])  # index -1: the background, 0
            init_gt.append(padded[init])
            init_positive.append(init >= 0)
            refine_gt.append(padded[refine])
            refine_positive.append(refine >= 0)
            heat.append(image_heat)
            offsets.append(image_offsets)
            peaks.append(image_peaks)
        valid, labels, init_positive, refine_positive = (torch.stack(t) for t in (
            valid, labels, init_positive, refine_positive))  # (B, N)
        init_gt, refine_gt, heat, offsets, peaks = (torch.stack(t) for t in (init_gt, refine_gt, heat, offsets, peaks))

        def positives(mask: torch.Tensor) -> torch.Tensor:  # sum over images of max(positives, 1)
            return mask.flatten(1).sum(1).clamp(min=1).sum().float()
        num_init, num_refine = positives(init_positive), positives(refine_positive)
        num_top_left, num_bottom_right = positives(peaks[..., 0]), positives(peaks[..., 1])

        one_hot = F.one_hot(labels, self.num_classes + 1)[..., 1:].float()  # (B, N, K), the background dropped
        if self.classification_loss == 'quality_focal':
            quality = torch.zeros_like(labels, dtype=torch.float32)  # (B, N)
            quality[refine_positive] = _aligned_iou(predictions.boxes_refine[refine_positive].detach(),
                                                    refine_gt[refine_positive])
            loss_cls = _quality_focal_loss(predictions.cls_logits[valid], (one_hot * quality[..., None])[valid])
        else:
            loss_cls = sigmoid_focal_loss(predictions.cls_logits[valid], one_hot[valid], FOCAL_ALPHA, FOCAL_GAMMA,
                                          reduction='sum')
        loss_cls = loss_cls / num_refine
        loss_init = generalized_box_iou_loss(predictions.boxes_init[init_positive], init_gt[init_positive],
                                             reduction='sum') / num_init
        loss_refine = generalized_box_iou_loss(predictions.boxes_refine[refine_positive], refine_gt[refine_positive],
                                               reduction='sum') / num_refine
        heat_loss = _gaussian_focal_loss(predictions.corner_heat, heat) * valid[..., None]  # (B, N, 2)
        offset_loss = F.smooth_l1_loss(predictions.corner_offsets, offsets, beta=OFFSET_BETA, reduction='none')
        offset_loss = offset_loss.reshape(*offset_loss.shape[:2], 2, 2).sum(-1) * peaks  # (B, N, 4) -> (B, N, 2)
        loss_heatmap = (heat_loss[..., 0].sum() / num_top_left + heat_loss[..., 1].sum() / num_bottom_right) / 2
        loss_offset = (offset_loss[..., 0].sum() / num_top_left + offset_loss[..., 1].sum() / num_bottom_right) / 2
        loss_sem = self.foreground_loss([o.foreground_logits for o in outputs], targets, batch_shape, device)
        losses = dict(loss_cls=loss_cls, loss_pts_init=loss_init, loss_pts_refine=loss_refine,
                      loss_heatmap=loss_heatmap, loss_offset=loss_offset, loss_sem=loss_sem)
        return {name: LOSS_WEIGHTS[name] * loss for name, loss in losses.items()}

    def foreground_loss(self, logits: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                        batch_shape: Tuple[int, int], device: torch.device) -> torch.Tensor:
        """The separate focal loss of the foreground maps (the official ``SEPFocalLoss``): positives weighted by
        :func:`foreground_targets`' weights and averaged by them, negatives averaged over the positive cells."""
        shape = (batch_shape[0] // FOREGROUND_STRIDE, batch_shape[1] // FOREGROUND_STRIDE)
        maps = [foreground_targets(t['boxes'].float().to(device), t['labels'].long().to(device), self.num_classes,
                                   shape) for t in targets]
        target = torch.stack([m[0] for m in maps])  # (B, K, H / 8, W / 8)
        weight = torch.stack([m[1] for m in maps])
        target = torch.cat([F.interpolate(target, size=level.shape[-2:]).flatten() for level in logits])
        weight = torch.cat([F.interpolate(weight, size=level.shape[-2:]).flatten() for level in logits])
        logits = torch.cat([level.float().flatten() for level in logits])
        probability = logits.sigmoid()
        positive = target == 1
        positive_loss = -F.logsigmoid(logits) * (1 - probability) ** FOCAL_GAMMA * weight * FOCAL_ALPHA
        negative_loss = -F.logsigmoid(-logits) * probability ** FOCAL_GAMMA * (1 - FOCAL_ALPHA)
        loss = negative_loss[~positive].sum() / positive.sum().clamp(min=1)
        if positive.any():
            loss = loss + positive_loss[positive].sum() / weight[positive].sum()
        return loss

    # ---- inference
    def detect(self, outputs: List[HeadOutputs], predictions: _Predictions, grid: PointGrid,
               image_sizes: List[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        """Detections per image in the resized image's pixels: the best ``topk_candidates`` locations of each
        level, their refined boxes with the corners verified by the heat maps and put in order (``x1 <= x2``,
        ``y1 <= y2``), thresholded and NMS-ed per class."""
        counts = [h * w for h, w in grid.sizes]
        scores = predictions.cls_logits.sigmoid().split(counts, 1)  # per level (B, n, K)
        boxes = predictions.boxes_refine.split(counts, 1)
        detections = []
        for b, (height, width) in enumerate(image_sizes):
            image_boxes, image_scores = [], []
            for level, (level_scores, level_boxes) in enumerate(zip(scores, boxes)):
                level_scores, level_boxes = level_scores[b], level_boxes[b]
                if len(level_scores) > self.topk_candidates:
                    best = level_scores.amax(1).topk(self.topk_candidates).indices
                    level_scores, level_boxes = level_scores[best], level_boxes[best]
                level_boxes = box_ops.clip_boxes_to_image(level_boxes, (height, width))
                source = CORNER_SOURCE_LEVELS[level]
                if source is not None:
                    level_boxes = box_ops.clip_boxes_to_image(self.verify_corners(
                        level_boxes, outputs[source].corner_heat[b].float(), outputs[source].corner_offsets[b].float(),
                        self.point_strides[source]), (height, width))
                image_boxes.append(_ordered(level_boxes))  # the verified corners may cross over
                image_scores.append(level_scores)
            detections.append(self._nms(torch.cat(image_boxes), torch.cat(image_scores)))
        return detections

    @staticmethod
    def verify_corners(boxes: torch.Tensor, heat: torch.Tensor, offsets: torch.Tensor, stride: int) -> torch.Tensor:
        """``boxes`` (n, 4) with each corner moved to the highest-scoring cell of the 2x2 cells from the one it
        lies in, plus that cell's offset (the official ``select``).

        Args:
            heat: (2, H, W) top-left and bottom-right logits.
            offsets: (4, H, W) top-left dx, dy and bottom-right dx, dy, in strides.
            stride: the heat map's stride.
        """
        height, width = heat.shape[-2:]
        _, best = F.max_pool2d_with_indices(heat.sigmoid()[:, None], kernel_size=2, stride=1)  # (2, 1, H-1, W-1)
        corners = []
        for corner in range(2):
            x, y = boxes[:, 2 * corner], boxes[:, 2 * corner + 1]
            col = (x / stride).clamp(0, width - 2).floor().long()
            row = (y / stride).clamp(0, height - 2).floor().long()
            cell = best[corner, 0, row, col]  # index into the H x W map
            cell_row, cell_col = cell // width, cell % width
            offset = offsets[2 * corner:2 * corner + 2, cell_row, cell_col]  # (2, n)
            corners.append(torch.stack([cell_col + offset[0], cell_row + offset[1]], 1) * stride)
        return torch.cat(corners, 1)

    def _nms(self, boxes: torch.Tensor, scores: torch.Tensor) -> Dict[str, torch.Tensor]:
        """mmdetection's ``multiclass_nms`` of candidate boxes (n, 4) with their class scores (n, K)."""
        candidate, label = torch.where(scores > self.score_thresh)
        boxes, scores = boxes[candidate], scores[candidate, label]
        keep = batched_nms(boxes, scores, label, self.nms_thresh)[:self.detections_per_img]
        return dict(boxes=boxes[keep], labels=label[keep] + 1, scores=scores[keep])

    def cost_parts(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> Dict[str, Callable]:
        parts, pyramid = self._pyramid_parts(x)
        levels = list(pyramid.values())
        return dict(parts, head=lambda: self.head(levels))


def _gaussian_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CornerNet's focal loss of heat maps (mmdetection's ``GaussianFocalLoss``, alpha 2, gamma 4), element-wise,
    from logits: peaks (target 1) as positives, the rest as negatives down-weighted by (1 - target)^gamma."""
    probability = logits.sigmoid()
    positive = (target == 1).to(logits.dtype)
    positive_loss = -F.logsigmoid(logits) * (1 - probability) ** HEATMAP_ALPHA * positive
    negative_loss = -F.logsigmoid(-logits) * probability ** HEATMAP_ALPHA * (1 - target) ** HEATMAP_GAMMA
    return positive_loss + negative_loss


def _quality_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalized Focal Loss's quality focal loss (Li et al., NeurIPS 2020, Eq. (5)), summed: binary cross-entropy
    towards the soft target (the IoU at a positive's class, 0 elsewhere) scaled by |target - sigmoid|^beta."""
    scale = (target - logits.sigmoid()).abs() ** QUALITY_FOCAL_BETA
    return (F.binary_cross_entropy_with_logits(logits, target, reduction='none') * scale).sum()


def _ordered(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (..., 4) with their two corners put in order (``x1 <= x2``, ``y1 <= y2``).

    ``exact_minmax``'s corners are two free points, which may cross over. The GIoU of a box crossed on both axes
    is unbounded above (its "area" is positive, its overlap zero, its union outgrows the enclosing box), so a GIoU
    loss on raw corners can fall without limit, and a crossed box has no IoU for the quality target."""
    return torch.cat([torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])],
                     -1)


def _aligned_iou(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """IoU (n,) of each box (n, 4) with its ground truth (n, 4); a box whose corners crossed over has no area."""
    intersection = (torch.min(boxes[:, 2:], gt_boxes[:, 2:]) - torch.max(boxes[:, :2], gt_boxes[:, :2])).clamp(min=0)
    intersection = intersection.prod(1)
    areas = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1) + (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(1)
    return intersection / (areas - intersection).clamp(min=1e-6)
