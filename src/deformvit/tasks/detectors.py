"""RetinaNet, Faster R-CNN and Mask R-CNN on any deformvit (or timm) backbone.

The detectors are torchvision's, over :class:`~deformvit.tasks.necks.PyramidFeatures`,
configured like the frameworks of DAT Tables 3 and 4 (mmdetection's, in Swin
Transformer's settings):

- RetinaNet: FPN on stages 2-4 (C3-C5, strides 8-32) with P6 and P7 computed from C5
  (``LastLevelP6P7``), i.e. levels P3-P7; anchors of 32-512 pixels, three scales per octave
  and three aspect ratios per level; the four-convolution heads without normalisation.
- Faster / Mask R-CNN: FPN on all four stages (P2-P5) plus P6 by max-pooling, one anchor
  size per level (32-512) and three aspect ratios, RoIAlign 7x7 boxes (two 1024-wide fully
  connected layers) and 14x14 masks (four 3x3 convolutions, a deconvolution, 28x28 masks).

Images go through torchvision's transform: resized so that the shorter side is
``min_size`` (a sequence: one size drawn per training image, the multi-scale 3x schedule;
the last one at test time)
and the longer at most ``max_size``, normalised with the backbone's mean and std, and
padded to a multiple of 32. Labels are ``1..num_classes``; 0 is the background.
"""
from typing import Dict, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..complexity import count_macs_of
from .necks import PyramidFeatures, create_backbone

__all__ = ['DETECTORS', 'build_detector', 'detector_macs']

DETECTORS = ('retinanet', 'faster_rcnn', 'mask_rcnn')


def _retinanet_anchors(base_sizes: Sequence[int]) -> AnchorGenerator:
    # three scales per octave (2^0, 2^(1/3), 2^(2/3)) of each level's base size
    sizes = tuple(tuple(round(s * 2 ** (k / 3)) for k in range(3)) for s in base_sizes)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def build_detector(
        detector: str = 'mask_rcnn',
        backbone: str = 'dat_tiny',
        num_classes: int = 80,
        pretrained_backbone: Optional[str] = None,
        drop_path_rate: float = 0.0,
        min_size: Union[int, Sequence[int]] = 800,
        max_size: int = 1333,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        representation_size: int = 1024,
        backbone_kwargs: Optional[Dict] = None,
        **detector_kwargs,
) -> nn.Module:
    """A torchvision detector over a feature pyramid on ``backbone``.

    Args:
        detector: ``'retinanet'``, ``'faster_rcnn'`` or ``'mask_rcnn'``.
        backbone: registered model name (``dat_tiny``, ``eapt_small``, ``swin_tiny_patch4_window7_224``...).
        num_classes: object classes, without the background.
        pretrained_backbone: checkpoint file of the classification backbone (ImageNet weights).
        drop_path_rate: stochastic depth of the backbone.
        min_size: shorter image side after resizing; a sequence draws one per training image.
        max_size: longest allowed image side after resizing.
        fpn_channels: channels of the pyramid levels and heads.
        anchor_sizes: base anchor size of each of the five pyramid levels, finest first.
        representation_size: width of the two fully connected layers of the R-CNN box head.
        backbone_kwargs: further arguments of the backbone (e.g. ``img_size``).
        detector_kwargs: passed to the torchvision detector (``score_thresh``,
            ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``...).

    Returns:
        The detector; ``model.config`` holds the arguments that rebuild it.

    Raises:
        ValueError: unknown detector, or fewer than five anchor sizes.
    """
    if detector not in DETECTORS:
        raise ValueError(f'unknown detector {detector!r}; expected one of {", ".join(DETECTORS)}')
    if len(anchor_sizes) != 5:
        raise ValueError(f'anchor_sizes has {len(anchor_sizes)} entries; expected one per pyramid level (5)')
    if isinstance(min_size, Sequence):
        min_size = tuple(min_size)
    config = dict(detector=detector, backbone=backbone, num_classes=num_classes, min_size=min_size,
                  max_size=max_size, fpn_channels=fpn_channels, anchor_sizes=tuple(anchor_sizes),
                  representation_size=representation_size,
                  backbone_kwargs=dict(backbone_kwargs or {}), **detector_kwargs)
    cfg = timm.models.get_pretrained_cfg(backbone)
    mean = list(cfg.mean) if cfg else [0.485, 0.456, 0.406]
    std = list(cfg.std) if cfg else [0.229, 0.224, 0.225]
    common = dict(min_size=min_size, max_size=max_size, image_mean=mean, image_std=std)
    if detector == 'retinanet':
        body = create_backbone(backbone, (8, 16, 32), pretrained_backbone, drop_path_rate, **(backbone_kwargs or {}))
        c5 = body.feature_info.channels()[-1]
        features = PyramidFeatures(body, fpn_channels, LastLevelP6P7(c5, fpn_channels))
        model = RetinaNet(features, num_classes + 1, anchor_generator=_retinanet_anchors(anchor_sizes),
                          **common, **detector_kwargs)
    else:
        body = create_backbone(backbone, (4, 8, 16, 32), pretrained_backbone, drop_path_rate, **(backbone_kwargs or {}))
        features = PyramidFeatures(body, fpn_channels, LastLevelMaxPool())
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)  # on 7x7 RoIAlign features
        heads = dict(rpn_anchor_generator=anchors, box_head=box_head,
                     box_predictor=FastRCNNPredictor(representation_size, num_classes + 1))
        if detector == 'mask_rcnn':  # four 3x3 convolutions of 256 channels, a deconvolution, 28x28 masks
            model = MaskRCNN(features, mask_predictor=MaskRCNNPredictor(256, 256, num_classes + 1), **heads, **common,
                             **detector_kwargs)
        else:
            model = FasterRCNN(features, **heads, **common, **detector_kwargs)
    model.config = config
    return model


@torch.no_grad()
def detector_macs(model: nn.Module, size: Sequence[int] = (800, 1280), proposals: int = 1000,
                  mask_rois: int = 100, convention: str = 'fvcore') -> Dict[str, int]:
    """MACs of a detector on one ``size`` (H, W) image, split into backbone, neck and heads.

    Counted as mmdetection's ``get_flops`` counts the detectors of DAT Tables 3-4: the
    backbone, the FPN and the dense heads on every level; for the R-CNNs also the box head
    on ``proposals`` RoIs and the mask head on the first ``mask_rois`` of them. Resizing,
    anchor decoding, NMS and RoIAlign are not counted. ``convention`` is that of
    :func:`~deformvit.complexity.count_macs_of` (``'modules'`` is mmdetection's).

    Returns:
        ``{'backbone', 'neck', 'head', 'total'}`` in MACs.
    """
    model.eval()
    param = next(model.parameters())
    h, w = size
    x = torch.randn(1, 3, h, w, device=param.device, dtype=param.dtype)
    features = model.backbone(x)
    levels = list(features.values())
    backbone, _ = count_macs_of(lambda: model.backbone.body(x), convention)
    total_neck, _ = count_macs_of(lambda: model.backbone(x), convention)
    if isinstance(model, RetinaNet):
        head, _ = count_macs_of(lambda: model.head(levels), convention)
    else:
        generator = torch.Generator().manual_seed(0)
        corners = torch.rand(proposals, 2, 2, generator=generator) * torch.tensor([w, h])
        boxes = torch.cat([corners.min(1).values, corners.max(1).values], 1).to(param.device, param.dtype)

        def heads():
            model.rpn.head(levels)
            pooled = model.roi_heads.box_roi_pool(features, [boxes], [(h, w)])
            model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
            if getattr(model.roi_heads, 'mask_head', None) is not None:
                pooled = model.roi_heads.mask_roi_pool(features, [boxes[:mask_rois]], [(h, w)])
                model.roi_heads.mask_predictor(model.roi_heads.mask_head(pooled))
        head, _ = count_macs_of(heads, convention)
    return dict(backbone=backbone, neck=total_neck - backbone, head=head, total=total_neck + head)
