"""Sparse R-CNN (Sun et al., "Sparse R-CNN: End-to-End Object Detection with Learnable Proposals", CVPR 2021)
as EAPT Tables IV and VII run it: mmdetection's ``sparse_rcnn_r50_fpn_300_proposals_crop_mstrain_480-800_3x_coco``
(3.x: ``sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco``), built from torchvision's parts
(``GeneralizedRCNNTransform``, ``MultiScaleRoIAlign``, ``BoxCoder``, ``sigmoid_focal_loss``,
``generalized_box_iou_loss``) and scipy's ``linear_sum_assignment``.

No region proposal network: 300 learnable boxes (normalised cx, cy, w, h, all starting as the whole
image) and 300 learnable 256-wide proposal features (Sparse R-CNN Sec. 3.2) enter six dynamic instance
interactive heads (Sec. 3.3, mmdetection's ``DIIHead``). Each head lets the proposal features attend to
one another (8 heads, then LayerNorm), turns each into the two 1x1 kernels (256 -> 64 -> 256) of a dynamic
convolution over its box's 7x7 RoIAlign features of P2-P5 (then a fully connected projection, LayerNorm),
adds an FFN (2048, LayerNorm), and predicts sigmoid class logits (one fc + LayerNorm + ReLU, then the
classifier) and box deltas (three such fcs, then the regressor; mmdetection's ``DeltaXYWHBBoxCoder`` with
standard deviations (0.5, 0.5, 1, 1)) that refine its input boxes. The refined boxes, detached, and the
object features, not detached, are the next head's proposals. Dropout is 0 as in the config: there is none.

Training is set prediction (Sec. 3.4): at every head, each image's proposals are matched one-to-one to
its ground-truth boxes by the Hungarian algorithm on the cost 2 x focal class cost + 5 x L1 of the
image-size-normalised x1y1x2y2 boxes - 2 x GIoU, and the head's losses have the same weights (sigmoid
focal loss over all proposals and classes, L1, GIoU), each divided by the number of matched boxes (the
average over processes, at least 1). Every head's losses count with weight 1. At test time the last
head's sigmoid scores over all proposals and classes give the top 100 detections, without NMS.
"""
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import (MultiScaleRoIAlign, box_convert, clip_boxes_to_image, generalized_box_iou,
                             generalized_box_iou_loss, sigmoid_focal_loss)

from ...errors import UsageError, optional
from ..necks import PyramidFeatures
from .base import Detector
from .shared import check_integer, check_number, mean_over_processes

__all__ = ['DynamicConv', 'DynamicInstanceInteractiveHead', 'SetWeights', 'SparseRCNNDetector', 'SparseRCNNHead',
           'StageOutput', 'hungarian_match', 'matching_cost']

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
FOCAL_COST_EPS = 1e-12  # mmdetection's FocalLossCost: log(p + eps)
BOX_STDS = (0.5, 0.5, 1.0, 1.0)  # DeltaXYWHBBoxCoder target_stds of the config
CLASSIFIER_PRIOR = 0.01  # the classifier's bias starts at the logit of this probability
ATTENTION_HEADS = 8
DYNAMIC_CHANNELS = 64
FEEDFORWARD_CHANNELS = 2048
ROI_SIZE = 7
REGRESSION_FCS = 3


class SetWeights(NamedTuple):
    """Weights of the matching cost and of the losses (the config uses the same for both)."""
    classification: float = 2.0
    l1: float = 5.0
    giou: float = 2.0


class StageOutput(NamedTuple):
    """What one head computes for a batch of ``B`` images and ``P`` proposals."""
    proposals: torch.Tensor  # (B, P, 4) x1y1x2y2 pixels: the head's input boxes
    logits: torch.Tensor  # (B, P, K) float32 class logits
    boxes: torch.Tensor  # (B, P, 4) float32: ``proposals`` refined by the head's deltas


def matching_cost(logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: torch.Tensor,
                  image_size: Tuple[int, int], weights: SetWeights = SetWeights()) -> torch.Tensor:
    """The cost of matching each proposal to each ground-truth box, as mmdetection's ``HungarianAssigner`` with
    ``FocalLossCost``, ``BBoxL1Cost`` and ``IoUCost(iou_mode='giou')``.

    Args:
        logits: (P, K) class logits of the proposals.
        boxes: (P, 4) predicted x1y1x2y2 boxes, pixels.
        gt_labels: (G,) labels ``1..K``.
        gt_boxes: (G, 4) ground-truth x1y1x2y2 boxes, pixels.
        image_size: ``(height, width)`` of the image the boxes lie in (resized, before padding).
        weights: the weights of the class, L1 and GIoU terms.

    Returns:
        (P, G) float32: ``classification x (focal(p, 1) - focal(p, 0))`` of the box's class
        ``+ l1 x |boxes - gt| / (w, h, w, h)`` summed over the coordinates ``- giou x GIoU``.
    """
    probabilities = logits.float().sigmoid()[:, gt_labels - 1]  # (P, G)
    positive = -FOCAL_ALPHA * (1 - probabilities) ** FOCAL_GAMMA * (probabilities + FOCAL_COST_EPS).log()
    negative = -(1 - FOCAL_ALPHA) * probabilities ** FOCAL_GAMMA * (1 - probabilities + FOCAL_COST_EPS).log()
    height, width = image_size
    scale = boxes.new_tensor([width, height, width, height], dtype=torch.float32)
    boxes, gt_boxes = boxes.float(), gt_boxes.float()
    l1 = torch.cdist(boxes / scale, gt_boxes / scale, p=1)  # (P, G)
    giou = generalized_box_iou(boxes, gt_boxes)  # (P, G)
    return weights.classification * (positive - negative) + weights.l1 * l1 - weights.giou * giou


def hungarian_match(cost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The one-to-one matching of rows (proposals) to columns (ground-truth boxes) of least total ``cost`` (R, C):
    ``min(R, C)`` pairs ``(rows, cols)``, int64 on ``cost``'s device, rows increasing."""
    assign = optional('scipy.optimize', 'Sparse R-CNN\'s matching').linear_sum_assignment
    rows, cols = assign(cost.detach().float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))


def _linear_norm_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True))


class DynamicConv(nn.Module):
    """The dynamic instance interaction of Sparse R-CNN Sec. 3.3 (mmdetection's ``DynamicConv``): each proposal
    feature generates the parameters of two 1x1 convolutions applied to its own RoI features.

    Args:
        channels: channels of the proposal features and of the RoI features.
        dynamic_channels: channels between the two generated convolutions.
        roi_size: side of the (square) RoI features.
    """

    def __init__(self, channels: int = 256, dynamic_channels: int = DYNAMIC_CHANNELS, roi_size: int = ROI_SIZE):
        super().__init__()
        self.channels = channels
        self.dynamic_channels = dynamic_channels
        self.kernel_generator = nn.Linear(channels, 2 * channels * dynamic_channels)
        self.norm_in = nn.LayerNorm(dynamic_channels)
        self.norm_out = nn.LayerNorm(channels)
        self.projection = nn.Linear(channels * roi_size * roi_size, channels)
        self.projection_norm = nn.LayerNorm(channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, proposal_features: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        """(N, C) features of the (N, C, S, S) RoI features, each convolved with the kernels its (N, C) proposal
        feature generates."""
        kernels = self.kernel_generator(proposal_features)  # (N, 2 C D)
        split = self.channels * self.dynamic_channels
        kernel_in = kernels[:, :split].reshape(-1, self.channels, self.dynamic_channels)  # (N, C, D)
        kernel_out = kernels[:, split:].reshape(-1, self.dynamic_channels, self.channels)  # (N, D, C)
        x = roi_features.flatten(2).transpose(1, 2)  # (N, C, S, S) -> (N, S*S, C)
        x = self.activation(self.norm_in(torch.bmm(x, kernel_in)))  # (N, S*S, D)
        x = self.activation(self.norm_out(torch.bmm(x, kernel_out)))  # (N, S*S, C)
        return self.activation(self.projection_norm(self.projection(x.flatten(1))))  # (N, S*S*C) -> (N, C)


class DynamicInstanceInteractiveHead(nn.Module):
    """One head (stage) of Sparse R-CNN, mmdetection's ``DIIHead``: self-attention among the proposal features,
    dynamic convolution on the RoI features, FFN, then class logits and box deltas.

    Initialised as mmdetection: Xavier-uniform for every weight matrix, PyTorch's defaults for the biases and
    LayerNorms, the classifier's bias at the logit of 0.01.

    Args:
        num_classes: object classes, without the background (sigmoid logits, one per class).
        channels: width of the proposal features and RoI features.
        num_heads: heads of the self-attention.
        dynamic_channels: channels between the dynamic convolution's two kernels.
        feedforward_channels: hidden width of the FFN.
        roi_size: side of the RoI features.
        box_stds: standard deviations of the (dx, dy, dw, dh) deltas; the coder's weights are 1 / std.
    """

    def __init__(self, num_classes: int, channels: int = 256, num_heads: int = ATTENTION_HEADS,
                 dynamic_channels: int = DYNAMIC_CHANNELS, feedforward_channels: int = FEEDFORWARD_CHANNELS,
                 roi_size: int = ROI_SIZE, box_stds: Sequence[float] = BOX_STDS):
        super().__init__()
        self.num_classes = num_classes
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.interaction = DynamicConv(channels, dynamic_channels, roi_size)
        self.interaction_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, feedforward_channels), nn.ReLU(inplace=True),
                                 nn.Linear(feedforward_channels, channels))
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_fcs = _linear_norm_relu(channels)
        self.reg_fcs = nn.Sequential(*(_linear_norm_relu(channels) for _ in range(REGRESSION_FCS)))
        self.classifier = nn.Linear(channels, num_classes)
        self.regressor = nn.Linear(channels, 4)
        self.coder = BoxCoder(tuple(1.0 / s for s in box_stds))
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        nn.init.constant_(self.classifier.bias, -math.log((1 - CLASSIFIER_PRIOR) / CLASSIFIER_PRIOR))

    def forward(self, roi_features: torch.Tensor, proposal_features: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits (B, P, K), deltas (B, P, 4), object features (B, P, C))`` of RoI features (B*P, C, S, S) and
        proposal features (B, P, C); logits and deltas in float32 under autocast too (the deltas are decoded onto
        pixel coordinates, which half precision rounds)."""
        batch, num_proposals, channels = proposal_features.shape
        attended = self.attention(proposal_features, proposal_features, proposal_features, need_weights=False)[0]
        x = self.attention_norm(proposal_features + attended).reshape(batch * num_proposals, channels)
        x = self.interaction_norm(x + self.interaction(x, roi_features))
        x = self.ffn_norm(x + self.ffn(x))  # (B*P, C)
        logits = self.classifier(self.cls_fcs(x)).float().reshape(batch, num_proposals, self.num_classes)
        deltas = self.regressor(self.reg_fcs(x)).float().reshape(batch, num_proposals, 4)
        return logits, deltas, x.reshape(batch, num_proposals, channels)

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The (B, P, 4) float32 boxes the (B, P, 4) ``deltas`` regress the (B, P, 4) ``boxes`` to (not clipped,
        mmdetection's ``clip_border=False``)."""
        decoded = self.coder.decode_single(deltas.float().reshape(-1, 4), boxes.float().reshape(-1, 4))
        return decoded.reshape(boxes.shape)  # (B*P, 4) -> (B, P, 4)


class SparseRCNNHead(nn.Module):
    """The learnable proposals and the cascade of dynamic heads of Sparse R-CNN, with its set-prediction losses
    and its detections (mmdetection's ``EmbeddingRPNHead`` and ``SparseRoIHead``).

    Args:
        num_classes: object classes, without the background.
        channels: width of the pyramid levels and of the proposal features.
        num_proposals: learnable proposals (boxes and features).
        num_stages: dynamic heads, each refining the previous one's boxes.
        detections_per_img: most detections per image.
        weights: weights of the matching cost and of the losses.

    The RoI features are torchvision's ``MultiScaleRoIAlign`` (7x7, sampling ratio 2) over the pyramid levels
    ``'0'``-``'3'`` (P2-P5), each box on the level of its size as mmdetection's ``SingleRoIExtractor``
    (``floor(log2(sqrt(wh) / 56))``).
    """

    def __init__(self, num_classes: int, channels: int = 256, num_proposals: int = 300, num_stages: int = 6,
                 detections_per_img: int = 100, weights: SetWeights = SetWeights()):
        super().__init__()
        self.proposal_boxes = nn.Embedding(num_proposals, 4)  # normalised (cx, cy, w, h)
        self.proposal_features = nn.Embedding(num_proposals, channels)
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        self.roi_pool = MultiScaleRoIAlign(['0', '1', '2', '3'], ROI_SIZE, 2)
        self.stages = nn.ModuleList(DynamicInstanceInteractiveHead(num_classes, channels) for _ in range(num_stages))
        self.detections_per_img = detections_per_img
        self.weights = SetWeights(*weights)

    def initial_proposals(self, image_sizes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(boxes (B, P, 4) x1y1x2y2 pixels, features (B, P, C))``: the learnt proposals on each image."""
        boxes = box_convert(self.proposal_boxes.weight, 'cxcywh', 'xyxy')  # (P, 4) normalised
        scale = boxes.new_tensor([[w, h, w, h] for h, w in image_sizes])  # (B, 4)
        features = self.proposal_features.weight[None].repeat(len(image_sizes), 1, 1)  # (P, C) -> (B, P, C)
        return boxes[None] * scale[:, None], features

    def run(self, features: Dict[str, torch.Tensor], image_sizes: List[Tuple[int, int]]) -> List[StageOutput]:
        """Every head on the pyramid ``features`` of a batch of images of ``image_sizes`` (resized, before
        padding), each on the previous head's detached boxes and its object features."""
        boxes, object_features = self.initial_proposals(image_sizes)
        outputs = []
        for stage in self.stages:
            roi_features = self.roi_pool(features, list(boxes), image_sizes)  # (B*P, C, 7, 7)
            logits, deltas, object_features = stage(roi_features, object_features)
            refined = stage.decode(deltas, boxes)
            outputs.append(StageOutput(boxes, logits, refined))
            boxes = refined.detach()
        return outputs

    def stage_losses(self, output: StageOutput, targets: List[Dict[str, torch.Tensor]],
                     image_sizes: List[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        """``loss_cls``, ``loss_bbox`` and ``loss_iou`` of one head, its proposals matched to the ground truth by
        :func:`hungarian_match` on :func:`matching_cost` of its own (detached) predictions."""
        logits, boxes = output.logits, output.boxes
        class_targets = torch.zeros_like(logits)  # (B, P, K): background everywhere but at the matched pairs
        matched_boxes, matched_targets, scales = [], [], []
        for i, (target, (height, width)) in enumerate(zip(targets, image_sizes)):
            cost = matching_cost(logits[i].detach(), boxes[i].detach(), target['labels'], target['boxes'],
                                 (height, width), self.weights)
            rows, cols = hungarian_match(cost)
            class_targets[i, rows, target['labels'][cols] - 1] = 1.0
            matched_boxes.append(boxes[i, rows])
            matched_targets.append(target['boxes'][cols].float())
            scales.append(boxes.new_tensor([width, height, width, height]).expand(len(rows), 4))
        num_matched = mean_over_processes(logits.new_tensor(float(sum(len(m) for m in matched_boxes)))).clamp(min=1.0)
        matched_boxes, matched_targets, scale = torch.cat(matched_boxes), torch.cat(matched_targets), torch.cat(scales)
        focal = sigmoid_focal_loss(logits, class_targets, FOCAL_ALPHA, FOCAL_GAMMA, reduction='sum')
        l1 = (matched_boxes / scale - matched_targets / scale).abs().sum()
        giou = generalized_box_iou_loss(matched_boxes, matched_targets, reduction='sum')
        return dict(loss_cls=self.weights.classification * focal / num_matched,
                    loss_bbox=self.weights.l1 * l1 / num_matched,
                    loss_iou=self.weights.giou * giou / num_matched)

    def losses(self, features: Dict[str, torch.Tensor], image_sizes: List[Tuple[int, int]],
               targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Every head's losses: ``stage<t>_loss_cls``, ``stage<t>_loss_bbox``, ``stage<t>_loss_iou``."""
        losses = {}
        for t, output in enumerate(self.run(features, image_sizes)):
            losses.update({f'stage{t}_{name}': value
                           for name, value in self.stage_losses(output, targets, image_sizes).items()})
        return losses

    def detect(self, output: StageOutput, image_sizes: List[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        """The ``detections_per_img`` highest of the (P x K) sigmoid scores of ``output`` per image, best first,
        with their class (``1..K``) and their proposal's box clipped to the image; no NMS."""
        scores = output.logits.sigmoid()  # (B, P, K)
        num_classes = scores.shape[-1]
        detections = []
        for per_image, boxes, size in zip(scores, output.boxes, image_sizes):
            top, indices = per_image.flatten().topk(min(self.detections_per_img, per_image.numel()))
            detections.append(dict(boxes=clip_boxes_to_image(boxes[indices // num_classes], size),
                                   labels=indices % num_classes + 1, scores=top))
        return detections

    def forward(self, features: Dict[str, torch.Tensor], image_sizes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """The losses in training, the detections (on the resized images) otherwise."""
        if self.training:
            if targets is None:
                raise ValueError('targets are needed in training; expected a dict with boxes and labels per image')
            return self.losses(features, image_sizes, targets)
        return self.detect(self.run(features, image_sizes)[-1], image_sizes)


class SparseRCNNDetector(Detector, nn.Module):
    """Sparse R-CNN over P2-P5 of a deformvit (or timm) backbone; build with :meth:`build`.

    The pyramid has four levels (no extra level, mmdetection's ``num_outs=4``); ``anchor_sizes`` and
    ``representation_size`` of :meth:`Detector.build` are unused (there are no anchors and no R-CNN box head;
    ``anchor_sizes`` is the default only so that ``build`` works). ``fpn_channels`` is also the width of the
    proposal features and of the heads. ``detector_kwargs`` take ``num_proposals`` (300), ``num_stages`` (6),
    ``detections_per_img`` (100) and the weights of the matching cost and losses ``class_weight`` (2),
    ``l1_weight`` (5) and ``giou_weight`` (2).

    Args:
        backbone: the feature pyramid (P2-P5).
        head: the proposals and dynamic heads.
        min_size: shorter image side after resizing; a sequence draws one per training image.
        max_size: longest allowed image side after resizing.
        image_mean: the backbone's input mean.
        image_std: the backbone's input standard deviation.
    """
    strides = (4, 8, 16, 32)
    anchor_sizes = (32, 64, 128, 256, 512)
    sparse_defaults = dict(num_proposals=300, num_stages=6, detections_per_img=100, class_weight=2.0, l1_weight=5.0,
                           giou_weight=2.0)

    def __init__(self, backbone: PyramidFeatures, head: SparseRCNNHead, min_size: Union[int, Tuple[int, ...]],
                 max_size: int, image_mean: List[float], image_std: List[float]):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std)
        self.backbone = backbone
        self.head = head

    @classmethod
    def options(cls):
        return set(cls.sparse_defaults)

    @classmethod
    def check_options(cls, detector_kwargs: Dict) -> None:
        super().check_options(detector_kwargs)
        cls.sparse_options(detector_kwargs)

    @classmethod
    def sparse_options(cls, detector_kwargs: Dict) -> Dict:
        """``detector_kwargs`` with the defaults filled in; UsageError naming a bad value."""
        options = dict(cls.sparse_defaults, **detector_kwargs)
        for name in ('num_proposals', 'num_stages', 'detections_per_img'):
            check_integer(name, options[name],
                          f'a whole number of at least 1 (the config has {cls.sparse_defaults[name]})')
        for name in ('class_weight', 'l1_weight', 'giou_weight'):
            options[name] = check_number(
                name, options[name], f'a non-negative number, the weight of its matching cost and loss (the config '
                f'has {cls.sparse_defaults[name]})', lambda v: math.isfinite(v) and v >= 0)
        return options

    @classmethod
    def assemble(cls, body: nn.Module, num_classes: int, fpn_channels: int, anchor_sizes: Tuple[int, ...],
                 representation_size: int, transform: Dict, **detector_kwargs) -> 'SparseRCNNDetector':
        options = cls.sparse_options(detector_kwargs)
        if fpn_channels % ATTENTION_HEADS:
            raise UsageError(f'fpn_channels {fpn_channels} is not a multiple of the {ATTENTION_HEADS} attention '
                             f'heads of Sparse R-CNN; expected e.g. 256')
        weights = SetWeights(options['class_weight'], options['l1_weight'], options['giou_weight'])
        head = SparseRCNNHead(num_classes, fpn_channels, options['num_proposals'], options['num_stages'],
                              options['detections_per_img'], weights)
        return cls(PyramidFeatures(body, fpn_channels), head, **transform)

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """Losses (training, ``targets`` needed) or one ``{'boxes', 'labels', 'scores'}`` per image, boxes in
        the pixels of the images given."""
        if self.training and targets is None:
            raise ValueError('targets are needed in training; expected a dict with boxes and labels per image')
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        if self.training:
            return self.head(features, batch.image_sizes, targets)
        detections = self.head(features, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def cost_parts(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> Dict[str, Callable]:
        """As :meth:`Detector.cost_parts`; the head is every dynamic head on the ``num_proposals`` learnt
        proposals (``proposals`` does not apply)."""
        parts, pyramid = self._pyramid_parts(x)
        image_sizes = [tuple(x.shape[-2:])]
        return dict(parts, head=lambda: self.head.run(pyramid, image_sizes))
