"""ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive
Training Sample Selection", CVPR 2020) as EAPT Table IV runs it: mmdetection's
``configs/atss/atss_r50_fpn_1x_coco.py``, built from torchvision's parts (``GeneralizedRCNNTransform``,
``AnchorGenerator``, ``BoxCoder``, ``sigmoid_focal_loss``, ``generalized_box_iou_loss``, ``batched_nms``).

The FPN reads stages 2-4 (C3-C5, strides 8-32) and adds P6 and P7 by strided 3x3 convolutions of the
P5 *output* (mmdetection's ``add_extra_convs='on_output'``), i.e. levels P3-P7 of strides 8-128. Every
location has one square anchor of 8 strides (64-1024 pixels; ``octave_base_scale=8``,
``scales_per_octave=1``). The head shares its weights across levels: two towers of four 3x3
convolutions with GroupNorm (32 groups; fewer below 64 channels, :func:`group_count`) and ReLU, the
classification tower ending in a 3x3 convolution of class logits (sigmoid, prior probability 0.01), the
regression tower in 3x3 convolutions of the (dx, dy, dw, dh) box deltas, multiplied by a learnable scale
per level, and of the centerness logit. Convolutions are initialised from N(0, 0.01), as mmdetection's.

Anchors are labelled by :func:`~deformvit.tasks.detection.assigners.atss_assign` (ATSS Algorithm 1,
nine candidates per level and box). Losses: sigmoid focal loss (alpha 0.25, gamma 2) over every anchor
divided by the number of positives; GIoU loss (weight 2) of the decoded positive boxes, each weighted by
its centerness target and divided by the sum of those targets; binary cross-entropy of the centerness
divided by the number of positives. Both normalisers are averaged over the processes of a distributed
run and are at least 1. Deltas are normalised by (0.1, 0.1, 0.2, 0.2) and decoded in float32.

At test time each level keeps its 1000 best (anchor, class) scores above 0.05, the score being
sigmoid(class logit) x sigmoid(centerness logit); the boxes, clipped to the image, go through class-wise
NMS at IoU 0.6 and the best 100 are kept.

Anchors on the padding that batching adds beyond an image's own padded size (a multiple of 32) are
ignored by the assignment and the losses, as mmdetection's valid flags make them. One difference
remains: torchvision's ``LastLevelP6P7`` applies a ReLU between P6 and P7, which mmdetection's FPN
(``relu_before_extra_convs=False``) does not.
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, boxes as box_ops, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ...errors import UsageError
from ..necks import PyramidFeatures
from .assigners import atss_assign
from .base import Detector
from .shared import check_integer, check_number, inside_own_padding, mean_over_processes

__all__ = ['ATSSDetector', 'ATSSHead', 'Scale', 'centerness_targets', 'group_count']

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
GIOU_WEIGHT = 2.0
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)  # mmdetection's DeltaXYWHBBoxCoder target_stds; the coder's weights are 1 / std
GROUPS = 32  # GroupNorm groups of the head's towers (mmdetection's norm_cfg)


class Scale(nn.Module):
    """A learnable scalar multiplying its input (mmcv's ``Scale``): one per pyramid level on the box deltas.

    Args:
        value: initial value of the scalar.
    """

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def group_count(channels: int) -> int:
    """GroupNorm groups of the towers on ``channels``: mmdetection's 32 from 64 channels on; for narrower
    pyramids the most groups of at least two channels each, since a one-channel group of a 1x1 level (P7 of a
    small image) has nothing to normalise over when training on one image."""
    return max(g for g in range(1, GROUPS + 1) if channels % g == 0 and channels // g >= 2)


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x (3x3 convolution without bias, GroupNorm, ReLU), mmcv's ``ConvModule`` with GN."""
    layers = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                   nn.GroupNorm(group_count(channels), channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ATSSHead(nn.Module):
    """The ATSS head, shared by the pyramid levels: class logits, box deltas and centerness per anchor.

    Args:
        in_channels: channels of the pyramid levels and of the towers (at least 2; see :func:`group_count`).
        num_classes: object classes, without the background.
        num_levels: pyramid levels, each with its own :class:`Scale` of the box deltas.
        num_convs: 3x3 convolutions of each tower.
        prior_probability: initial sigmoid of every class logit (the focal loss's prior).
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 5, num_convs: int = 4,
                 prior_probability: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.cls_convs = _tower(in_channels, num_convs)
        self.reg_convs = _tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for module in self.modules():  # mmdetection's init_cfg: Normal(std=0.01) on every convolution
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Outputs for the anchors of every level, finest first, each level's in row-major order:
        ``cls_logits`` (B, A, K), ``bbox_regression`` (B, A, 4) and ``bbox_ctrness`` (B, A)."""
        if len(features) != len(self.scales):
            raise ValueError(f'{len(features)} pyramid levels; expected {len(self.scales)}, one per Scale')
        logits, deltas, centerness = [], [], []
        for level, scale in zip(features, self.scales):
            classification = self.cls_convs(level)
            regression = self.reg_convs(level)
            logits.append(self.cls_logits(classification).flatten(2).transpose(1, 2))  # (B, K, H, W) -> (B, HW, K)
            deltas.append(scale(self.bbox_pred(regression)).flatten(2).transpose(1, 2))  # (B, 4, H, W) -> (B, HW, 4)
            centerness.append(self.centerness(regression).flatten(1))  # (B, 1, H, W) -> (B, HW)
        return dict(cls_logits=torch.cat(logits, 1), bbox_regression=torch.cat(deltas, 1),
                    bbox_ctrness=torch.cat(centerness, 1))


def centerness_targets(anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """FCOS's centerness of each anchor centre in its box, sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b)):
    (N,) for ``anchors`` and ``gt_boxes`` (N, 4), the centres inside the boxes."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (N, 2)
    left_top = centres - gt_boxes[:, :2]  # (N, 2): l, t
    right_bottom = gt_boxes[:, 2:] - centres  # (N, 2): r, b
    ratios = torch.minimum(left_top, right_bottom) / torch.maximum(left_top, right_bottom)  # (N, 2)
    return ratios.prod(1).sqrt()


class ATSSDetector(Detector, nn.Module):
    """ATSS over P3-P7 of a deformvit (or timm) backbone; build with :meth:`build`.

    ``detector_kwargs`` take ``topk`` (candidates per level and box of the assignment, 9),
    ``score_thresh`` (0.05), ``nms_thresh`` (0.6), ``detections_per_img`` (100) and
    ``topk_candidates`` (best scores kept per level before NMS, 1000).

    Args:
        backbone: the feature pyramid (P3-P7, ``out_channels`` each).
        num_classes: object classes, without the background.
        anchor_sizes: side of the square anchor of each of the five levels, finest first.
        min_size: shorter image side after resizing (a sequence: one drawn per training image).
        max_size: longest image side after resizing.
        image_mean: mean of the input normalisation.
        image_std: standard deviation of the input normalisation.
        topk: candidate anchors per pyramid level and ground-truth box of :func:`atss_assign`.
        score_thresh: lowest score of a detection.
        nms_thresh: IoU of the class-wise non-maximum suppression.
        detections_per_img: most detections per image.
        topk_candidates: best (anchor, class) scores kept per level before the suppression.
    """
    strides = (8, 16, 32)
    anchor_sizes = (64, 128, 256, 512, 1024)  # 8 strides: mmdetection's octave_base_scale 8, scales_per_octave 1
    atss_defaults = dict(topk=9, score_thresh=0.05, nms_thresh=0.6, detections_per_img=100, topk_candidates=1000)

    def __init__(self, backbone: PyramidFeatures, num_classes: int, anchor_sizes: Sequence[int],
                 min_size, max_size: int, image_mean: Sequence[float], image_std: Sequence[float], topk: int = 9,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 topk_candidates: int = 1000):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std)
        self.backbone = backbone
        self.level_strides = tuple(self.strides) + (2 * self.strides[-1], 4 * self.strides[-1])  # P3-P7
        self.anchor_generator = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
        self.head = ATSSHead(backbone.out_channels, num_classes, num_levels=len(self.level_strides))
        self.box_coder = BoxCoder(tuple(1.0 / s for s in DELTA_STDS))
        self.topk = topk
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    @classmethod
    def options(cls):
        return set(cls.atss_defaults)

    @classmethod
    def check_options(cls, detector_kwargs: Dict) -> None:
        super().check_options(detector_kwargs)
        options = dict(cls.atss_defaults, **detector_kwargs)
        check_integer('topk', options['topk'], 'a whole number of at least 1 (candidate anchors per level and box)')
        check_number('score_thresh', options['score_thresh'], 'a number in [0, 1) (the lowest score of a detection)',
                     lambda v: 0 <= v < 1)
        check_number('nms_thresh', options['nms_thresh'],
                     'a number in (0, 1] (the IoU above which NMS suppresses a box)', lambda v: 0 < v <= 1)
        check_integer('detections_per_img', options['detections_per_img'],
                      'a whole number of at least 1 (the most detections per image)')
        check_integer('topk_candidates', options['topk_candidates'],
                      'a whole number of at least 1 (the best scores kept per level before NMS)')

    @classmethod
    def assemble(cls, body: nn.Module, num_classes: int, fpn_channels: int, anchor_sizes: Tuple[int, ...],
                 representation_size: int, transform: Dict, **detector_kwargs) -> 'ATSSDetector':
        if fpn_channels < 2:
            raise UsageError(f'fpn_channels {fpn_channels}: the ATSS head normalises groups of at least two '
                             f'channels; expected 2 or more (256 in the paper)')
        features = PyramidFeatures(body, fpn_channels, LastLevelP6P7(fpn_channels, fpn_channels))
        return cls(features, num_classes, anchor_sizes, **transform, **detector_kwargs)

    def anchors(self, features: List[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
        """The anchors of the pyramid levels ``features``, (A, 4) in float32 pixels of the batch (finest level
        first, each in row-major order, centred on multiples of the level's stride), and their number per level."""
        device = features[0].device
        self.anchor_generator.set_cell_anchors(torch.float32, device)
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.level_strides]
        per_level = self.anchor_generator.grid_anchors([list(f.shape[-2:]) for f in features], strides)
        return torch.cat(per_level), [len(a) for a in per_level]

    def valid_anchors(self, anchors: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(A,) bool: the anchors centred on the image padded on its own (to ``size_divisible``), not on the
        padding that batching with larger images adds (mmdetection's valid flags)."""
        return inside_own_padding((anchors[:, :2] + anchors[:, 2:]) / 2, image_size, self.transform.size_divisible)

    def assign(self, anchors: torch.Tensor, num_per_level: List[int], targets: List[Dict[str, torch.Tensor]],
               image_sizes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels (B, A), matched boxes (B, A, 4), valid (B, A))``: each anchor's class (0: background)
        and ground-truth box (zeros for the background) by :func:`atss_assign` among the valid anchors."""
        labels, boxes, valid = [], [], []
        level_of_anchor = torch.repeat_interleave(torch.arange(len(num_per_level), device=anchors.device),
                                                  torch.tensor(num_per_level, device=anchors.device))
        for target, image_size in zip(targets, image_sizes):
            inside = self.valid_anchors(anchors, image_size)
            valid_per_level = torch.bincount(level_of_anchor[inside], minlength=len(num_per_level)).tolist()
            matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
            gt_boxes = target['boxes'].float()
            matched[inside] = atss_assign(anchors[inside], valid_per_level, gt_boxes, self.topk)
            positive = matched >= 0
            image_labels = torch.zeros(len(anchors), dtype=torch.int64, device=anchors.device)
            image_labels[positive] = target['labels'][matched[positive]].to(torch.int64)
            image_boxes = anchors.new_zeros(len(anchors), 4)
            image_boxes[positive] = gt_boxes[matched[positive]]
            labels.append(image_labels)
            boxes.append(image_boxes)
            valid.append(inside)
        return torch.stack(labels), torch.stack(boxes), torch.stack(valid)

    def compute_loss(self, head_outputs: Dict[str, torch.Tensor], anchors: torch.Tensor, num_per_level: List[int],
                     targets: List[Dict[str, torch.Tensor]], image_sizes: List[Tuple[int, int]]
                     ) -> Dict[str, torch.Tensor]:
        """mmdetection's ATSS losses: ``classification``, ``bbox_regression`` (weight 2) and ``bbox_ctrness``,
        in float32 (the head's outputs are cast up under autocast)."""
        logits = head_outputs['cls_logits'].float()  # (B, A, K)
        deltas = head_outputs['bbox_regression'].float()  # (B, A, 4)
        centerness = head_outputs['bbox_ctrness'].float()  # (B, A)
        labels, gt_boxes, valid = self.assign(anchors, num_per_level, targets, image_sizes)
        positive = labels > 0  # (B, A)
        num_positive = mean_over_processes(positive.sum().float()).clamp(min=1.0)

        class_targets = F.one_hot(labels, logits.shape[-1] + 1)[..., 1:].to(logits.dtype)  # (B, A, K), no background
        classification = sigmoid_focal_loss(logits[valid], class_targets[valid], FOCAL_ALPHA, FOCAL_GAMMA,
                                            reduction='sum') / num_positive

        positive_anchors = anchors.expand_as(gt_boxes)[positive]  # (P, 4)
        positive_boxes = gt_boxes[positive]  # (P, 4)
        target_centerness = centerness_targets(positive_anchors, positive_boxes)  # (P,)
        predicted = self.box_coder.decode_single(deltas[positive], positive_anchors)  # (P, 4)
        giou = generalized_box_iou_loss(predicted, positive_boxes, reduction='none')  # (P,)
        centerness_sum = mean_over_processes(target_centerness.sum()).clamp(min=1.0)
        regression = GIOU_WEIGHT * (giou * target_centerness).sum() / centerness_sum
        ctrness = F.binary_cross_entropy_with_logits(centerness[positive], target_centerness,
                                                     reduction='sum') / num_positive
        return dict(classification=classification, bbox_regression=regression, bbox_ctrness=ctrness)

    def postprocess_detections(self, head_outputs: Dict[str, torch.Tensor], anchors: torch.Tensor,
                               num_per_level: List[int], image_sizes: List[Tuple[int, int]]
                               ) -> List[Dict[str, torch.Tensor]]:
        """Boxes (in the resized image's pixels), labels (1..K) and scores per image: per level the best
        ``topk_candidates`` scores above ``score_thresh``, decoded in float32 and clipped, then class-wise NMS."""
        centerness = head_outputs['bbox_ctrness'].float().sigmoid()  # (B, A)
        scores = head_outputs['cls_logits'].float().sigmoid() * centerness[..., None]  # (B, A, K)
        deltas = head_outputs['bbox_regression'].float()
        num_classes = scores.shape[-1]
        detections = []
        for image_scores, image_deltas, image_size in zip(scores, deltas, image_sizes):
            boxes, kept_scores, labels = [], [], []
            for level_scores, level_deltas, level_anchors in zip(image_scores.split(num_per_level),
                                                                 image_deltas.split(num_per_level),
                                                                 anchors.split(num_per_level)):
                flat_scores = level_scores.flatten()  # (A_l, K) -> (A_l K,)
                candidates = torch.where(flat_scores > self.score_thresh)[0]
                best = flat_scores[candidates].topk(min(self.topk_candidates, len(candidates)))
                candidates = candidates[best.indices]
                anchor_index = torch.div(candidates, num_classes, rounding_mode='floor')
                decoded = self.box_coder.decode_single(level_deltas[anchor_index], level_anchors[anchor_index])
                boxes.append(box_ops.clip_boxes_to_image(decoded, image_size))
                kept_scores.append(best.values)
                labels.append(candidates % num_classes + 1)
            boxes, kept_scores, labels = torch.cat(boxes), torch.cat(kept_scores), torch.cat(labels)
            keep = batched_nms(boxes, kept_scores, labels, self.nms_thresh)[:self.detections_per_img]
            detections.append(dict(boxes=boxes[keep], labels=labels[keep], scores=kept_scores[keep]))
        return detections

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """Losses (training; ``targets`` needed) or one dict of ``boxes``, ``labels``, ``scores`` per image,
        in the pixels of the image given (evaluation)."""
        if self.training and targets is None:
            raise ValueError('targets are needed in training; expected a dict with boxes and labels per image')
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        features = list(self.backbone(batch.tensors).values())
        head_outputs = self.head(features)
        anchors, num_per_level = self.anchors(features)
        if self.training:
            return self.compute_loss(head_outputs, anchors, num_per_level, targets, batch.image_sizes)
        detections = self.postprocess_detections(head_outputs, anchors, num_per_level, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def cost_parts(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> Dict[str, Callable]:
        parts, pyramid = self._pyramid_parts(x)
        levels = list(pyramid.values())
        return dict(parts, head=lambda: self.head(levels))
