"""Cascade Mask R-CNN (Cai and Vasconcelos, "Cascade R-CNN", CVPR 2018 / TPAMI 2019) as DAT Table 4b
and EAPT Table IV run it: mmdetection's ``cascade_mask_rcnn_r50_fpn`` in Swin Transformer's settings,
built from torchvision's parts (RPN, ``MultiScaleRoIAlign``, ``BoxCoder``, ``Matcher``,
``BalancedPositiveNegativeSampler``, ``maskrcnn_loss``, ``paste_masks_in_image``).

Three box stages follow the RPN. Stage ``t`` labels its RoIs with its own IoU threshold
(0.5 / 0.6 / 0.7), encodes regression targets with its own standard deviations
((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)), samples 512 RoIs per
image (a quarter positive, the ground-truth boxes added as proposals), and its loss is weighted
1 / 0.5 / 0.25. The boxes it regresses, detached and without the added ground truth, are the next
stage's proposals. At test time every stage runs on the previous stage's boxes, the class score
is the average of the three classifiers and the boxes are the last stage's.

Box heads are Swin Transformer's and DAT's ``4conv1fc`` (four 3x3 convolutions with BatchNorm,
then one fully connected layer of 1024) or the classic ``2fc``; regression is class-agnostic by
default. mmdetection's ``CascadeRoIHead`` gives every stage its own mask head (``mask_stages='all'``:
each trained on its stage's positives with the stage's weight, their probabilities averaged at
test time), which is what the papers' parameter counts include; ``mask_stages='last'`` keeps only
the last stage's. ``docs/dense-prediction.md`` ("Cascade Mask R-CNN and HTC") has the arithmetic.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, boxes as box_ops, generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...errors import UsageError
from ..necks import PyramidFeatures
from .base import Detector
from .shared import check_choice, check_numbers, check_sequence

__all__ = ['BOX_HEADS', 'CascadeMaskRCNNDetector', 'CascadeRoIHeads', 'CascadeStage', 'MaskHead', 'box_head',
           'soft_nms']

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_WEIGHTS = (1.0, 0.5, 0.25)
BOX_LOSSES = ('smooth_l1', 'giou')
GIOU_WEIGHT = 10.0  # Swin Transformer's cascade configs: GIoU loss on decoded boxes, weight 10
SCORE_AVERAGES = ('logits', 'probabilities')
NMS_KINDS = ('hard', 'soft')


def _conv_fc_head(channels: int, pool: int, representation_size: int) -> nn.Module:
    return FastRCNNConvFCHead((channels, pool, pool), [channels] * 4, [representation_size], norm_layer=nn.BatchNorm2d)


def _two_fc_head(channels: int, pool: int, representation_size: int) -> nn.Module:
    return TwoMLPHead(channels * pool * pool, representation_size)


BOX_HEADS: Dict[str, Callable[[int, int, int], nn.Module]] = {
    '4conv1fc': _conv_fc_head,  # Swin Transformer / DAT cascade configs ("Shared4Conv1FCBBoxHead", SyncBN)
    '2fc': _two_fc_head,  # mmdetection's default ("Shared2FCBBoxHead"), torchvision's TwoMLPHead
}


def box_head(kind: str, channels: int, representation_size: int, pool: int = 7) -> nn.Module:
    """The RoI box head ``kind`` (a key of :data:`BOX_HEADS`) on ``pool`` x ``pool`` RoI features of ``channels``."""
    if kind not in BOX_HEADS:
        raise UsageError(f'unknown box_head {kind!r}; expected one of {", ".join(BOX_HEADS)}')
    return BOX_HEADS[kind](channels, pool, representation_size)


class CascadeStage(nn.Module):
    """One stage of the cascade: box head, classifier and regressor with the stage's IoU threshold and coder.

    Args:
        head: the box head (RoI features -> ``representation_size`` vector).
        representation_size: width of the head's output.
        num_classes: object classes, without the background.
        iou_threshold: IoU with a ground-truth box from which a RoI is positive (below it, background).
        stds: standard deviations of the (dx, dy, dw, dh) regression targets; the coder's weights are 1 / std.
        loss_weight: weight of the stage's losses.
        class_agnostic: one box per RoI instead of one per class.
    """

    def __init__(self, head: nn.Module, representation_size: int, num_classes: int, iou_threshold: float,
                 stds: Sequence[float], loss_weight: float, class_agnostic: bool = True):
        super().__init__()
        self.head = head
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.bbox_pred = nn.Linear(representation_size, 4 if class_agnostic else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.iou_threshold = float(iou_threshold)
        self.stds = tuple(float(s) for s in stds)
        self.loss_weight = float(loss_weight)
        self.class_agnostic = class_agnostic
        self.coder = BoxCoder(tuple(1.0 / s for s in self.stds))
        self.matcher = Matcher(self.iou_threshold, self.iou_threshold, allow_low_quality_matches=False)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(class logits (N, K + 1), box deltas (N, 4) or (N, 4 (K + 1)))`` of pooled RoI features, in float32
        under autocast too: the deltas are decoded onto pixel coordinates, which half precision rounds."""
        x = self.head(features)
        return self.cls_score(x).float(), self.bbox_pred(x).float()

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor, labels: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """The boxes ``deltas`` regress ``boxes`` to: (N, 4), with class-specific deltas those of ``labels``
        (N,); with ``labels`` None and class-specific deltas, (N, K + 1, 4)."""
        if not self.class_agnostic:
            deltas = deltas.reshape(len(deltas), -1, 4)  # (N, 4 (K + 1)) -> (N, K + 1, 4)
            if labels is None:
                decoded = self.coder.decode_single(deltas.flatten(1), boxes)
                return decoded.reshape(len(boxes), -1, 4)
            deltas = deltas[torch.arange(len(deltas), device=deltas.device), labels]
        return self.coder.decode_single(deltas, boxes)


class MaskHead(nn.Module):
    """The FCN mask head of Mask R-CNN (four 3x3 convolutions, a 2x deconvolution, a 1x1 classifier),
    optionally taking the previous stage's features (HTC's mask information flow, HTC Eq. (5)).

    Args:
        channels: channels of the RoI features and of the convolutions.
        num_classes: object classes, without the background (one mask per class and the background).
        convs: number of 3x3 convolutions.
        previous: add the previous stage's mask features through a 1x1 convolution before the convolutions.
    """

    def __init__(self, channels: int, num_classes: int, convs: int = 4, previous: bool = False):
        super().__init__()
        self.previous = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True)) if previous else None
        self.convs = nn.Sequential(*(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
                                     for _ in range(convs)))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes + 1, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, previous: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mask logits (N, K + 1, 2S, 2S), features (N, C, S, S))`` of RoI features ``x`` (N, C, S, S)."""
        if self.previous is not None and previous is not None:
            x = x + self.previous(previous)
        features = self.convs(x)
        return self.logits(F.relu(self.upsample(features))), features


class _Samples(NamedTuple):
    """The RoIs a stage trains on, per image."""
    boxes: List[torch.Tensor]  # (n, 4)
    labels: List[torch.Tensor]  # (n,) 0 = background
    matched: List[torch.Tensor]  # (n,) index of the matched ground-truth box (0 for the background)
    from_ground_truth: List[torch.Tensor]  # (n,) bool: the RoI is a ground-truth box added as a proposal


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float = 0.5,
             min_score: float = 1e-3, method: str = 'linear', sigma: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS (Bodla et al., ICCV 2017) within each class: each kept box decays the scores of the others.

    ``linear``: a box overlapping the kept one by IoU > ``iou_threshold`` has its score multiplied by
    1 - IoU; ``gaussian``: every box by exp(-IoU^2 / sigma). Boxes whose score falls under ``min_score``
    are dropped.

    Returns:
        ``(indices into boxes, decayed scores)``, highest score first.
    """
    kept, kept_scores = [], []
    for label in classes.unique():
        members = torch.where(classes == label)[0]
        iou = box_iou(boxes[members], boxes[members])  # (n, n)
        current = scores[members].clone()
        alive = torch.ones(len(members), dtype=torch.bool, device=boxes.device)
        for _ in range(len(members)):
            best = torch.where(alive, current, current.new_tensor(-1.0)).argmax()
            if current[best] < min_score:
                break
            alive[best] = False
            kept.append(members[best])
            kept_scores.append(current[best])
            if method == 'linear':
                decay = torch.where(iou[best] > iou_threshold, 1 - iou[best], torch.ones_like(current))
            else:
                decay = torch.exp(-iou[best] ** 2 / sigma)
            current = torch.where(alive, current * decay, current)
            alive &= current >= min_score
    if not kept:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores[:0]
    kept_scores = torch.stack(kept_scores)
    order = kept_scores.argsort(descending=True)
    return torch.stack(kept)[order], kept_scores[order]


class CascadeRoIHeads(nn.Module):
    """The RoI heads of Cascade (Mask) R-CNN, in place of torchvision's ``RoIHeads``.

    Called as torchvision's ``GeneralizedRCNN`` calls its RoI heads: ``(features, proposals,
    image_shapes, targets)`` -> ``(detections, losses)``.

    Args:
        box_roi_pool: the 7x7 RoIAlign over the pyramid levels.
        stages: the :class:`CascadeStage` s, first to last.
        mask_roi_pool: the 14x14 RoIAlign for masks; None for boxes only.
        mask_heads: one :class:`MaskHead` per stage in ``mask_stages``.
        mask_stages: indices of the stages that have a mask head (all, or the last).
        batch_size_per_image: RoIs sampled per image and stage.
        positive_fraction: most positive share of the sampled RoIs.
        score_thresh: lowest class score of a detection.
        nms_thresh: IoU of non-maximum suppression within a class.
        detections_per_img: most detections per image.
        box_loss: ``'smooth_l1'`` on the encoded deltas (beta 1, mmdetection's cascade) or ``'giou'`` on
            the decoded boxes (weight 10, Swin Transformer's cascade configs).
        score_average: average the stages' ``'logits'`` (mmdetection, then softmax) or their softmax
            ``'probabilities'``.
        nms: ``'hard'`` (torchvision's ``batched_nms``) or ``'soft'`` (linear :func:`soft_nms`, HTC++).
    """

    def __init__(self, box_roi_pool: nn.Module, stages: Sequence[CascadeStage],
                 mask_roi_pool: Optional[nn.Module] = None, mask_heads: Sequence[MaskHead] = (),
                 mask_stages: Sequence[int] = (), batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 box_loss: str = 'smooth_l1', score_average: str = 'logits', nms: str = 'hard'):
        super().__init__()
        if len(mask_heads) != len(mask_stages):
            raise ValueError(f'{len(mask_heads)} mask heads for {len(mask_stages)} mask stages; expected one each')
        self.box_roi_pool = box_roi_pool
        self.stages = nn.ModuleList(stages)
        self.mask_roi_pool = mask_roi_pool
        self.mask_heads = nn.ModuleList(mask_heads)
        self.mask_stages = tuple(mask_stages)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_loss = check_choice('box_loss', box_loss, BOX_LOSSES)
        self.score_average = check_choice('score_average', score_average, SCORE_AVERAGES)
        self.nms = check_choice('nms', nms, NMS_KINDS)

    interleaved = False  # HTC's interleaved execution: see losses

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None and len(self.mask_heads) > 0

    # ---- parts that HTC extends
    def prepare(self, features: Dict[str, torch.Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
        """Losses computed once per batch before the stages (none here; HTC's semantic branch)."""
        return {}

    def box_features(self, stage: int, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                     image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """The pooled features stage ``stage`` classifies ``boxes`` from."""
        return self.box_roi_pool(features, boxes, image_shapes)

    def mask_features(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                      image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """The pooled features the mask heads segment ``boxes`` from."""
        return self.mask_roi_pool(features, boxes, image_shapes)

    def mask_logits(self, stage: int, pooled: torch.Tensor) -> torch.Tensor:
        """Mask logits of the mask head of stage ``stage`` (each head on its own in Cascade Mask R-CNN)."""
        return self.mask_heads[self.mask_stages.index(stage)](pooled)[0]

    def mask_probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        """The average of every mask head's sigmoid at test time, (N, K + 1, M, M)."""
        return torch.stack([self.mask_logits(stage, pooled).sigmoid() for stage in self.mask_stages]).mean(0)

    # ---- training
    def sample(self, stage: CascadeStage, proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]
               ) -> _Samples:
        """Label ``proposals`` plus the ground-truth boxes with ``stage``'s IoU threshold and sample them."""
        out = _Samples([], [], [], [])
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels = target['boxes'].to(boxes.dtype), target['labels']
            boxes = torch.cat([boxes, gt_boxes])
            from_ground_truth = torch.arange(len(boxes), device=boxes.device) >= len(boxes) - len(gt_boxes)
            if len(gt_boxes) == 0:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            else:
                matches = stage.matcher(box_iou(gt_boxes, boxes))
                matched = matches.clamp(min=0)
                labels = gt_labels[matched].to(torch.int64)
                labels[matches < 0] = 0
            out.boxes.append(boxes)
            out.labels.append(labels)
            out.matched.append(matched)
            out.from_ground_truth.append(from_ground_truth)
        positive, negative = self.sampler(out.labels)
        keep = [torch.where(p | n)[0] for p, n in zip(positive, negative)]
        return _Samples(*([values[k] for values, k in zip(field, keep)] for field in out))

    def stage_losses(self, stage: CascadeStage, samples: _Samples, logits: torch.Tensor, deltas: torch.Tensor,
                     targets: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(classification, box)`` losses of one stage, unweighted, as mmdetection's ``BBoxHead.loss``:
        cross-entropy over the sampled RoIs, box loss summed over the positives and divided by the RoIs."""
        labels = torch.cat(samples.labels)
        classification = F.cross_entropy(logits, labels)
        positive = labels > 0
        boxes = torch.cat(samples.boxes)[positive]
        gt_boxes = torch.cat([t['boxes'].to(boxes.dtype)[m] if len(t['boxes']) else boxes.new_zeros((len(m), 4))
                              for t, m in zip(targets, samples.matched)])[positive]
        deltas = deltas[positive]
        if not stage.class_agnostic:
            deltas = deltas.reshape(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device),
                                                        labels[positive]]
        if self.box_loss == 'giou':
            predicted = stage.coder.decode_single(deltas, boxes)
            box = GIOU_WEIGHT * generalized_box_iou_loss(predicted, gt_boxes, reduction='sum')
        else:
            box = F.smooth_l1_loss(deltas, stage.coder.encode_single(gt_boxes, boxes), beta=1.0, reduction='sum')
        return classification, box / max(labels.numel(), 1)

    @torch.no_grad()
    def refine(self, stage: CascadeStage, samples: _Samples, logits: torch.Tensor, deltas: torch.Tensor,
               image_shapes: List[Tuple[int, int]]) -> List[torch.Tensor]:
        """The next stage's proposals: the sampled RoIs regressed by ``stage``, clipped, without the ground
        truth added as proposals (mmdetection's ``refine_bboxes``); class-specific regression uses the
        RoI's label, or for background RoIs the most likely object class."""
        labels = torch.cat(samples.labels)
        labels = torch.where(labels > 0, labels, logits[:, 1:].argmax(1) + 1)
        boxes = stage.decode(deltas.detach(), torch.cat(samples.boxes), labels)
        refined = []
        for per_image, from_gt, shape in zip(boxes.split([len(b) for b in samples.boxes]),
                                             samples.from_ground_truth, image_shapes):
            refined.append(box_ops.clip_boxes_to_image(per_image[~from_gt], shape))
        return refined

    def mask_loss(self, stage: int, features: Dict[str, torch.Tensor], samples: _Samples,
                  targets: List[Dict[str, torch.Tensor]], image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """Mask loss (unweighted) of the mask head of ``stage`` on the positive RoIs of ``samples``."""
        positive = [labels > 0 for labels in samples.labels]
        boxes = [b[p] for b, p in zip(samples.boxes, positive)]
        matched = [m[p] for m, p in zip(samples.matched, positive)]
        logits = self.mask_logits(stage, self.mask_features(features, boxes, image_shapes))
        return maskrcnn_loss(logits, boxes, [t['masks'] for t in targets], [t['labels'] for t in targets], matched)

    def losses(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
               image_shapes: List[Tuple[int, int]], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Every stage's weighted losses (``s<t>_loss_classifier``, ``s<t>_loss_box_reg``, ``s<t>_loss_mask``).

        A stage's mask head trains on the positives its box head was trained on or, ``interleaved``
        (HTC Eq. (3)), on the RoIs that box head has just regressed, re-labelled and re-sampled at the
        stage's IoU threshold."""
        losses = self.prepare(features, image_shapes, targets)
        for t, stage in enumerate(self.stages):
            samples = self.sample(stage, proposals, targets)
            logits, deltas = stage(self.box_features(t, features, samples.boxes, image_shapes))
            classification, box = self.stage_losses(stage, samples, logits, deltas, targets)
            losses[f's{t}_loss_classifier'] = stage.loss_weight * classification
            losses[f's{t}_loss_box_reg'] = stage.loss_weight * box
            if t < len(self.stages) - 1 or self.interleaved:
                proposals = self.refine(stage, samples, logits, deltas, image_shapes)
            if t in self.mask_stages and self.has_mask():
                mask_samples = self.sample(stage, proposals, targets) if self.interleaved else samples
                losses[f's{t}_loss_mask'] = stage.loss_weight * self.mask_loss(t, features, mask_samples, targets,
                                                                               image_shapes)
        return losses

    # ---- inference
    def detect(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        """Boxes, labels and scores per image: every stage on the previous stage's boxes, the class score
        averaged over the stages, the last stage's boxes, then per-class NMS."""
        counts = [len(p) for p in proposals]
        boxes = torch.cat(proposals)
        stage_logits = []
        for t, stage in enumerate(self.stages):
            logits, deltas = stage(self.box_features(t, features, list(boxes.split(counts)), image_shapes))
            stage_logits.append(logits)
            last = t == len(self.stages) - 1
            labels = None if last else logits[:, 1:].argmax(1) + 1
            boxes = stage.decode(deltas, boxes, labels)
            if not last:
                boxes = torch.cat([box_ops.clip_boxes_to_image(per_image, shape)
                                   for per_image, shape in zip(boxes.split(counts), image_shapes)])
        if self.score_average == 'logits':
            scores = torch.stack(stage_logits).mean(0).softmax(-1)
        else:
            scores = torch.stack([logits.softmax(-1) for logits in stage_logits]).mean(0)
        return [self._postprocess(b, s, shape)
                for b, s, shape in zip(boxes.split(counts), scores.split(counts), image_shapes)]

    def _postprocess(self, boxes: torch.Tensor, scores: torch.Tensor, shape: Tuple[int, int]
                     ) -> Dict[str, torch.Tensor]:
        num_classes = scores.shape[1] - 1
        if boxes.dim() == 2:
            boxes = boxes[:, None].expand(-1, num_classes + 1, 4)
        boxes = box_ops.clip_boxes_to_image(boxes[:, 1:].reshape(-1, 4), shape)  # (N K, 4), background dropped
        labels = torch.arange(1, num_classes + 1, device=scores.device).repeat(len(scores))
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.nms == 'soft':
            keep, scores = soft_nms(boxes, scores, labels, self.nms_thresh)
        else:
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)
            scores = scores[keep]
        keep, scores = keep[:self.detections_per_img], scores[:self.detections_per_img]
        return dict(boxes=boxes[keep], labels=labels[keep], scores=scores)

    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]], targets: Optional[List[Dict[str, torch.Tensor]]] = None
                ) -> Tuple[List[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError('targets are needed in training; expected a dict with boxes and labels per image')
            return [], self.losses(features, proposals, image_shapes, targets)
        self.prepare(features, image_shapes, None)
        detections = self.detect(features, proposals, image_shapes)
        if self.has_mask():
            boxes = [d['boxes'] for d in detections]
            probabilities = self.mask_probabilities(self.mask_features(features, boxes, image_shapes))
            labels = torch.cat([d['labels'] for d in detections])
            masks = probabilities[torch.arange(len(labels), device=labels.device), labels][:, None]
            for detection, per_image in zip(detections, masks.split([len(b) for b in boxes])):
                detection['masks'] = per_image  # (n, 1, M, M), pasted into the image by the transform
        return detections, {}

    # ---- cost
    def cost(self, features: Dict[str, torch.Tensor], boxes: torch.Tensor, image_shape: Tuple[int, int],
             mask_rois: int) -> None:
        """One pass of every box stage on ``boxes`` and of every mask head on the first ``mask_rois`` of them,
        as mmdetection's ``forward_dummy`` (what ``get_flops`` counts)."""
        self.prepare(features, [image_shape], None)
        for t, stage in enumerate(self.stages):
            stage(self.box_features(t, features, [boxes], [image_shape]))
        if self.has_mask():
            self.mask_probabilities(self.mask_features(features, [boxes[:mask_rois]], [image_shape]))


class CascadeMaskRCNNDetector(Detector, FasterRCNN):
    """Cascade Mask R-CNN over P2-P6 of a deformvit (or timm) backbone; build with :meth:`build`.

    torchvision's ``FasterRCNN`` gives the transform and the RPN (its ``rpn_*`` arguments apply);
    :class:`CascadeRoIHeads` replaces its RoI heads. Besides :meth:`Detector.build`'s arguments,
    ``detector_kwargs`` take ``box_head`` (``'4conv1fc'`` or ``'2fc'``), ``class_agnostic``, ``box_loss``,
    ``score_average``, ``nms``, ``mask_stages`` (``'all'`` or ``'last'``), ``stage_ious``,
    ``stage_stds``, ``stage_weights`` and torchvision's ``box_batch_size_per_image``,
    ``box_positive_fraction``, ``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``.
    """
    masks = True
    cascade_defaults = dict(box_head='4conv1fc', class_agnostic=True, box_loss='smooth_l1', score_average='logits',
                            nms='hard', mask_stages='all', stage_ious=STAGE_IOUS, stage_stds=STAGE_STDS,
                            stage_weights=STAGE_WEIGHTS)

    @classmethod
    def options(cls):
        return (super().options() - {'box_roi_pool', 'box_fg_iou_thresh', 'box_bg_iou_thresh', 'bbox_reg_weights'}
                | set(cls.cascade_defaults))

    @classmethod
    def check_options(cls, detector_kwargs: Dict) -> None:
        super().check_options(detector_kwargs)
        cls.cascade_options(dict(detector_kwargs))

    @classmethod
    def cascade_options(cls, kwargs: Dict) -> Dict:
        """Split the cascade's own options off ``kwargs`` (in place), with their defaults filled in."""
        options = {k: kwargs.pop(k, v) for k, v in cls.cascade_defaults.items()}
        ious = check_numbers('stage_ious', options['stage_ious'], 'IoU thresholds in (0, 1), one per stage',
                             lambda v: 0 < v < 1)
        weights = check_numbers('stage_weights', options['stage_weights'], 'non-negative loss weights, one per stage',
                                lambda v: v >= 0)
        stds = [check_numbers('stage_stds', s, 'four positive numbers per stage', lambda v: v > 0)
                for s in check_sequence('stage_stds', options['stage_stds'], 'four positive numbers per stage')]
        if any(len(s) != 4 for s in stds):
            raise UsageError(f"stage_stds {options['stage_stds']}: expected four positive numbers per stage")
        if not len(ious) == len(stds) == len(weights) or not ious:
            raise UsageError(f'stage_ious, stage_stds and stage_weights have {len(ious)}, {len(stds)} and '
                             f'{len(weights)} entries; expected one per stage, the same number in each')
        if not isinstance(options['class_agnostic'], bool):
            raise UsageError(f"class_agnostic {options['class_agnostic']!r}: expected true or false")
        options.update(stage_ious=ious, stage_stds=stds, stage_weights=weights)
        for name, choices in (('mask_stages', ('all', 'last')), ('box_loss', BOX_LOSSES),
                              ('score_average', SCORE_AVERAGES), ('nms', NMS_KINDS), ('box_head', tuple(BOX_HEADS))):
            check_choice(name, options[name], choices)
        return options

    @classmethod
    def build_pyramid(cls, body: nn.Module, fpn_channels: int, options: Dict) -> PyramidFeatures:
        """The feature pyramid: P2-P5 from the backbone, P6 by max-pooling."""
        return PyramidFeatures(body, fpn_channels, LastLevelMaxPool())

    @classmethod
    def build_roi_heads(cls, fpn_channels: int, num_classes: int, representation_size: int, options: Dict,
                        settings: Dict) -> CascadeRoIHeads:
        """The cascade's RoI heads; ``settings`` are torchvision's RoI-head settings."""
        stages = [CascadeStage(box_head(options['box_head'], fpn_channels, representation_size), representation_size,
                               num_classes, iou, stds, weight, options['class_agnostic'])
                  for iou, stds, weight in zip(options['stage_ious'], options['stage_stds'], options['stage_weights'])]
        mask_stages = range(len(stages)) if options['mask_stages'] == 'all' else [len(stages) - 1]
        return CascadeRoIHeads(
            MultiScaleRoIAlign(['0', '1', '2', '3'], 7, 2), stages, MultiScaleRoIAlign(['0', '1', '2', '3'], 14, 2),
            [MaskHead(fpn_channels, num_classes) for _ in mask_stages], list(mask_stages),
            box_loss=options['box_loss'], score_average=options['score_average'], nms=options['nms'], **settings)

    @classmethod
    def assemble(cls, body: nn.Module, num_classes: int, fpn_channels: int, anchor_sizes: Tuple[int, ...],
                 representation_size: int, transform: Dict, **detector_kwargs) -> nn.Module:
        options = cls.cascade_options(detector_kwargs)
        settings = {name: detector_kwargs.pop(key) for key, name in (
            ('box_batch_size_per_image', 'batch_size_per_image'), ('box_positive_fraction', 'positive_fraction'),
            ('box_score_thresh', 'score_thresh'), ('box_nms_thresh', 'nms_thresh'),
            ('box_detections_per_img', 'detections_per_img')) if key in detector_kwargs}
        features = cls.build_pyramid(body, fpn_channels, options)
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        model = cls(features, rpn_anchor_generator=anchors, box_head=nn.Identity(), box_predictor=nn.Identity(),
                    **transform, **detector_kwargs)
        model.roi_heads = cls.build_roi_heads(fpn_channels, num_classes, representation_size, options, settings)
        return model

    def cost_parts(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> Dict[str, Callable]:
        parts, pyramid = self._pyramid_parts(x)
        h, w = x.shape[-2:]
        boxes = self._cost_boxes(x, proposals)

        def heads() -> None:
            self.rpn.head(list(pyramid.values()))
            self.roi_heads.cost(pyramid, boxes, (h, w), mask_rois)
        return dict(parts, head=heads)
