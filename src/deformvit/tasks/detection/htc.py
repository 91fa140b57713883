"""Hybrid Task Cascade (Chen et al., "Hybrid Task Cascade for Instance Segmentation", CVPR 2019) and
Swin Transformer's HTC++ (Liu et al., ICCV 2021, Sec. 4.2), the model EAPT Table V calls HTC++ and,
on EAPT backbones, HTC+++: mmdetection's ``htc_r50_fpn`` on torchvision's parts.

HTC keeps the three box stages of Cascade R-CNN (:mod:`.cascade`) and changes the rest:

* **interleaved execution** (HTC Eq. (3)): stage ``t``'s mask head trains on RoIs that stage ``t``'s
  box head has already regressed (re-labelled and re-sampled with the stage's IoU threshold);
* **mask information flow** (HTC Eq. (5)): stage ``t``'s mask head adds, through a 1x1 convolution,
  the features of the mask heads of stages ``1..t-1`` run on the same RoIs;
* **the semantic branch** (HTC Sec. 3.3, mmdetection's ``FusedSemanticHead``): the five pyramid
  levels, each through a 1x1 convolution, summed at stride 8, four 3x3 convolutions, a 1x1 classifier
  over the stuff-and-thing classes (its cross-entropy, weight 0.2, on COCO-stuff maps when the targets
  hold ``semantic`` maps, none otherwise) and a 1x1 embedding whose RoIAlign is added to every box and
  mask head's RoI features.

HTC++ (:class:`HTCPlusPlusDetector`) adds what Swin Transformer lists that a model holds: "an extra
global self-attention layer appended at the output of last stage" (a transformer block over every
token of the last backbone level), the ``4conv1fc`` box heads of Swin's cascade configurations and
Soft-NMS at test time. Its data side (multi-scale 400-1400 training, the 6x schedule) is the recipe
``eapt-htc-6x``; instaboost is not reproduced. ``docs/dense-prediction.md`` ("Cascade Mask R-CNN and HTC")
gives the reading and the parameter arithmetic against Swin-B's 160M and EAPT-M's 182M.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torchvision.ops import roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...errors import UsageError
from ..necks import PyramidFeatures
from .cascade import CascadeMaskRCNNDetector, CascadeRoIHeads, MaskHead

__all__ = ['GlobalAttention', 'HTCDetector', 'HTCPlusPlusDetector', 'HTCRoIHeads', 'SemanticHead']

IGNORE_INDEX = 255  # unlabelled pixels of COCO-stuff maps


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SemanticHead(nn.Module):
    """HTC's semantic segmentation branch over the pyramid levels, fused at one of them.

    Args:
        channels: channels of the pyramid levels and of the branch.
        num_classes: classes of the semantic maps (183 for COCO-stuff's stuffthingmaps).
        levels: pyramid levels read (5: P2-P6).
        fusion_level: the level all are resized to and summed at (1: P3, stride 8).
        convs: 3x3 convolutions after the fusion.
        loss_weight: weight of the cross-entropy.
        ignore_index: map value that is not a class.
    """

    def __init__(self, channels: int = 256, num_classes: int = 183, levels: int = 5, fusion_level: int = 1,
                 convs: int = 4, loss_weight: float = 0.2, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not 0 <= fusion_level < levels:
            raise UsageError(f'semantic fusion level {fusion_level} is outside the {levels} pyramid levels')
        self.fusion_level = fusion_level
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True))
                                     for _ in range(levels))
        self.convs = nn.Sequential(*(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
                                     for _ in range(convs)))
        self.embedding = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True))
        self.logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(class logits, semantic features)``, both at the fusion level's resolution."""
        size = levels[self.fusion_level].shape[-2:]
        x = self.lateral[self.fusion_level](levels[self.fusion_level])
        for index, level in enumerate(levels):
            if index != self.fusion_level:
                x = x + self.lateral[index](F.interpolate(level, size=size, mode='bilinear', align_corners=True))
        x = self.convs(x)
        return self.logits(x), self.embedding(x)

    def loss(self, logits: torch.Tensor, maps: List[torch.Tensor], image_shapes: List[Tuple[int, int]],
             batch_shape: Tuple[int, int]) -> torch.Tensor:
        """Weighted cross-entropy of ``logits`` (B, K, h, w) against each image's map, resized as the image
        was (nearest) to ``image_shapes``, padded with ``ignore_index`` to the batch's padded ``batch_shape``
        and subsampled to the logits' resolution."""
        target = torch.full((len(maps), *batch_shape), self.ignore_index, dtype=torch.int64, device=logits.device)
        for index, (semantic, (h, w)) in enumerate(zip(maps, image_shapes)):
            resized = F.interpolate(semantic[None, None].float(), size=(h, w), mode='nearest')[0, 0]
            target[index, :h, :w] = resized.to(torch.int64)
        target = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode='nearest')[:, 0].to(torch.int64)
        out_of_range = (target != self.ignore_index) & ((target < 0) | (target >= self.num_classes))
        if out_of_range.any():
            raise ValueError(f'semantic maps hold values {sorted(target[out_of_range].unique().tolist())[:10]} '
                             f'outside 0..{self.num_classes - 1} and {self.ignore_index} (ignored); expected '
                             f'semantic_classes to cover every class of the maps')
        if not (target != self.ignore_index).any():
            return logits.sum() * 0
        return self.loss_weight * F.cross_entropy(logits, target, ignore_index=self.ignore_index)


class HTCRoIHeads(CascadeRoIHeads):
    """The RoI heads of HTC: :class:`CascadeRoIHeads` with interleaved box and mask branches, mask
    information flow and the semantic branch (:class:`SemanticHead`).

    Args:
        semantic_head: the semantic branch, or None for HTC without it.
        args, kwargs: as :class:`CascadeRoIHeads`; every stage has a mask head.
    """
    interleaved = True  # stage t's mask head trains on the boxes stage t regressed (HTC Eq. (3))

    def __init__(self, *args, semantic_head: Optional[SemanticHead] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.semantic_head = semantic_head
        self._semantic: Optional[torch.Tensor] = None

    def prepare(self, features: Dict[str, torch.Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
        self._semantic = None
        if self.semantic_head is None:
            return {}
        levels = list(features.values())
        logits, self._semantic = self.semantic_head(levels)
        if targets is None:
            return {}
        batch_shape = (levels[0].shape[-2] * 4, levels[0].shape[-1] * 4)  # P2 is at stride 4 of the padded batch
        if all('semantic' in t for t in targets):
            loss = self.semantic_head.loss(logits, [t['semantic'] for t in targets], image_shapes, batch_shape)
        else:  # no stuff maps: no loss, and every parameter still takes part in the graph
            loss = logits.sum() * 0
        return dict(loss_semantic=loss)

    def forward(self, *args, **kwargs):
        try:
            return super().forward(*args, **kwargs)
        finally:  # the semantic features belong to one batch
            self._semantic = None

    def cost(self, *args, **kwargs) -> None:
        try:
            super().cost(*args, **kwargs)
        finally:
            self._semantic = None

    def _semantic_rois(self, boxes: List[torch.Tensor], size: int) -> torch.Tensor:
        scale = 1.0 / 2 ** (self.semantic_head.fusion_level + 2)  # level i of P2-P6 is at stride 4 x 2^i
        pooled = roi_align(self._semantic, boxes, 14, spatial_scale=scale, sampling_ratio=0)
        return pooled if size == 14 else F.adaptive_avg_pool2d(pooled, size)

    def box_features(self, stage: int, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                     image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        pooled = super().box_features(stage, features, boxes, image_shapes)
        return pooled if self._semantic is None else pooled + self._semantic_rois(boxes, pooled.shape[-1])

    def mask_features(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                      image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        pooled = super().mask_features(features, boxes, image_shapes)
        return pooled if self._semantic is None else pooled + self._semantic_rois(boxes, pooled.shape[-1])

    def mask_logits(self, stage: int, pooled: torch.Tensor) -> torch.Tensor:
        """Stage ``stage``'s mask logits with the information flow of the earlier mask heads (HTC Eq. (5))."""
        previous = None
        for head in self.mask_heads[:stage]:
            previous = head(pooled, previous)[1]
        return self.mask_heads[stage](pooled, previous)[0]

    def mask_probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        previous, probabilities = None, []
        for head in self.mask_heads:
            logits, previous = head(pooled, previous)
            probabilities.append(logits.sigmoid())
        return torch.stack(probabilities).mean(0)


class GlobalAttention(nn.Module):
    """A transformer block (multi-head self-attention over every token, then an MLP, both pre-norm and
    residual) on a feature map: Swin Transformer's HTC++ "extra global self-attention layer".

    Args:
        channels: channels of the map.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``channels``.
    """

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if channels % num_heads:
            raise UsageError(f'{channels} channels do not split into {num_heads} attention heads')
        self.block = Block(channels, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, HW, C)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class _AttendedBody(nn.Module):
    """A ``features_only`` backbone whose last level goes through :class:`GlobalAttention`."""

    def __init__(self, body: nn.Module, attention: GlobalAttention):
        super().__init__()
        self.body = body
        self.attention = attention
        self.feature_info = body.feature_info

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        levels = list(self.body(x))
        return levels[:-1] + [self.attention(levels[-1])]


class HTCDetector(CascadeMaskRCNNDetector):
    """Hybrid Task Cascade over P2-P6 of a deformvit (or timm) backbone; build with :meth:`build`.

    ``detector_kwargs`` take those of :class:`CascadeMaskRCNNDetector` (``mask_stages`` is always
    ``'all'``) and ``semantic`` (the branch, default True), ``semantic_classes`` (183, COCO-stuff),
    ``semantic_loss_weight`` (0.2) and ``global_attention_heads`` (0: none; HTC++ sets it).
    """
    cascade_defaults = dict(CascadeMaskRCNNDetector.cascade_defaults, box_head='2fc', semantic=True,
                            semantic_classes=183, semantic_loss_weight=0.2, global_attention_heads=0)

    @classmethod
    def uses_semantic_maps(cls, detector_kwargs: Dict) -> bool:
        return bool(detector_kwargs.get('semantic', cls.cascade_defaults['semantic']))

    @classmethod
    def cascade_options(cls, kwargs: Dict) -> Dict:
        options = super().cascade_options(kwargs)  # takes every key of cls.cascade_defaults, HTC's too
        if options['mask_stages'] != 'all':
            raise UsageError(f"HTC has a mask head on every stage; mask_stages {options['mask_stages']!r} "
                             f"is Cascade Mask R-CNN's option")
        if not isinstance(options['semantic'], bool):
            raise UsageError(f"semantic {options['semantic']!r}: expected true (the semantic branch) or false")
        if not _is_int(options['semantic_classes']) or options['semantic_classes'] < 1:
            raise UsageError(f"semantic_classes {options['semantic_classes']!r}: expected the number of classes "
                             f"of the semantic maps (183 for COCO-stuff)")
        weight = options['semantic_loss_weight']
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise UsageError(f'semantic_loss_weight {weight!r}: expected a non-negative number (0.2 in HTC)')
        heads = options['global_attention_heads']
        if heads is not None and (not _is_int(heads) or heads < 0):
            raise UsageError(f"global_attention_heads {heads!r}: expected 0 (none) or the number of attention "
                             f"heads")
        return options

    @classmethod
    def build_pyramid(cls, body: nn.Module, fpn_channels: int, options: Dict) -> PyramidFeatures:
        heads = int(options['global_attention_heads'] or 0)
        if heads:
            body = _AttendedBody(body, GlobalAttention(body.feature_info.channels()[-1], heads))
        return PyramidFeatures(body, fpn_channels, LastLevelMaxPool())

    @classmethod
    def build_roi_heads(cls, fpn_channels: int, num_classes: int, representation_size: int, options: Dict,
                        settings: Dict) -> CascadeRoIHeads:
        cascade = super().build_roi_heads(fpn_channels, num_classes, representation_size, options, settings)
        semantic = (SemanticHead(fpn_channels, int(options['semantic_classes']),
                                 loss_weight=float(options['semantic_loss_weight'])) if options['semantic'] else None)
        mask_heads = [MaskHead(fpn_channels, num_classes, previous=t > 0) for t in range(len(cascade.stages))]
        return HTCRoIHeads(
            cascade.box_roi_pool, list(cascade.stages), cascade.mask_roi_pool, mask_heads, list(range(len(mask_heads))),
            batch_size_per_image=cascade.sampler.batch_size_per_image,
            positive_fraction=cascade.sampler.positive_fraction, score_thresh=cascade.score_thresh,
            nms_thresh=cascade.nms_thresh, detections_per_img=cascade.detections_per_img, box_loss=cascade.box_loss,
            score_average=cascade.score_average, nms=cascade.nms, semantic_head=semantic)


class HTCPlusPlusDetector(HTCDetector):
    """Swin Transformer's HTC++ (EAPT's HTC+++ on EAPT backbones): :class:`HTCDetector` with a global
    self-attention block on the last backbone level (heads: the level's channels / 32), ``4conv1fc``
    box heads and Soft-NMS. Set ``global_attention_heads`` to change the block's heads."""
    cascade_defaults = dict(HTCDetector.cascade_defaults, box_head='4conv1fc', nms='soft', global_attention_heads=None)

    @classmethod
    def build_pyramid(cls, body: nn.Module, fpn_channels: int, options: Dict) -> PyramidFeatures:
        if options['global_attention_heads'] is None:  # 32 channels per head, as in Swin's last stage
            options = dict(options, global_attention_heads=max(1, body.feature_info.channels()[-1] // 32))
        return super().build_pyramid(body, fpn_channels, options)

    @classmethod
    def cascade_options(cls, kwargs: Dict) -> Dict:
        options = super().cascade_options(kwargs)
        heads = options['global_attention_heads']
        if heads is not None and heads < 1:
            raise UsageError(f'global_attention_heads {heads}: HTC++ has the global attention block; expected a '
                             f'positive number of heads (or leave it out: channels / 32)')
        return options
