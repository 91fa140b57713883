"""What every detection framework of :mod:`deformvit.tasks.detection` offers besides torchvision's model.

A framework is a torchvision detector class mixed with :class:`Detector`: ``build`` puts a
feature pyramid on a deformvit (or timm) backbone and configures the heads, ``has_masks`` says
whether it predicts instance masks, and ``cost_parts`` names the computations that make up one
forward pass, so that their multiply-accumulates can be counted part by part.

Images go through torchvision's transform: resized so that the shorter side is ``min_size``
(a sequence: one size drawn per training image, the multi-scale 3x schedule; the last one at
test time) and the longer at most ``max_size``, normalised with the backbone's mean and std,
and padded to a multiple of 32. Labels are ``1..num_classes``; 0 is the background.
"""
import inspect
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ...errors import UsageError, closest
from ..necks import PyramidFeatures, create_backbone, input_normalisation, load_level_norms

__all__ = ['Detector']


class Detector:
    """Mixin of the detection frameworks: how to build one, and what to ask of it.

    Subclasses set ``strides`` (the backbone levels their pyramid reads), ``anchor_sizes`` (the
    base anchor size of each of the five pyramid levels when ``build`` is given none), ``masks`` and
    implement :meth:`assemble` and :meth:`cost_parts`.

    Attributes:
        config: the arguments of :meth:`build` that rebuild the model (written into checkpoints).
    """
    strides: Tuple[int, ...] = (4, 8, 16, 32)
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)
    masks: bool = False
    config: Dict

    @classmethod
    def has_masks(cls) -> bool:
        """Whether the framework predicts instance masks (asked of the class or of a model)."""
        return cls.masks

    @classmethod
    def options(cls) -> Set[str]:
        """The names ``detector_kwargs`` may hold: the torchvision detector's own arguments, less those that
        :meth:`build` sets itself."""
        detector = next(c for c in cls.__mro__ if c.__module__.startswith('torchvision.'))
        built = {'self', 'backbone', 'num_classes', 'min_size', 'max_size', 'image_mean', 'image_std', 'kwargs',
                 'anchor_generator', 'rpn_anchor_generator', 'box_head', 'box_predictor', 'mask_predictor'}
        return set(inspect.signature(detector.__init__).parameters) - built

    @classmethod
    def check_options(cls, detector_kwargs: Dict) -> None:
        """Raise UsageError naming the entries of ``detector_kwargs`` that are not :meth:`options`."""
        unknown = sorted(set(detector_kwargs) - cls.options())
        if unknown:
            raise UsageError(f'{cls.__name__} takes no option {", ".join(unknown)}{closest(unknown[0], cls.options())}'
                             f'; expected among {", ".join(sorted(cls.options()))}')

    @classmethod
    def uses_semantic_maps(cls, detector_kwargs: Dict) -> bool:
        """Whether the framework, built with ``detector_kwargs``, trains on semantic (COCO-stuff) maps."""
        return False

    @classmethod
    def build(
            cls,
            backbone: str = 'dat_tiny',
            num_classes: int = 80,
            pretrained_backbone: Optional[str] = None,
            drop_path_rate: float = 0.0,
            min_size: Union[int, Sequence[int]] = 800,
            max_size: int = 1333,
            fpn_channels: int = 256,
            anchor_sizes: Optional[Sequence[int]] = None,
            representation_size: int = 1024,
            backbone_kwargs: Optional[Dict] = None,
            **detector_kwargs,
    ) -> nn.Module:
        """The framework over a feature pyramid on ``backbone``.

        Args:
            backbone: registered model name (``dat_tiny``, ``eapt_small``, ``swin_tiny_patch4_window7_224``...).
            num_classes: object classes, without the background.
            pretrained_backbone: checkpoint file of the classification backbone (ImageNet weights).
            drop_path_rate: stochastic depth of the backbone.
            min_size: shorter image side after resizing; a sequence draws one per training image.
            max_size: longest allowed image side after resizing.
            fpn_channels: channels of the pyramid levels and heads.
            anchor_sizes: base anchor size of each of the five pyramid levels, finest first; None: the
                framework's own (``cls.anchor_sizes``).
            representation_size: width of the two fully connected layers of an R-CNN box head.
            backbone_kwargs: further arguments of the backbone (e.g. ``img_size``).
            detector_kwargs: passed to the torchvision detector (``score_thresh``,
                ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``...).

        Returns:
            The detector; ``model.config`` holds the arguments that rebuild it.

        Raises:
            ValueError: fewer or more than five anchor sizes.
        """
        cls.check_options(detector_kwargs)
        anchor_sizes = cls.anchor_sizes if anchor_sizes is None else anchor_sizes
        if len(anchor_sizes) != 5:
            raise ValueError(f'anchor_sizes has {len(anchor_sizes)} entries; expected one per pyramid level (5)')
        if isinstance(min_size, Sequence):
            min_size = tuple(min_size)
        backbone_kwargs = dict(backbone_kwargs or {})
        body = create_backbone(backbone, cls.strides, pretrained_backbone, drop_path_rate, **backbone_kwargs)
        mean, std = input_normalisation(backbone)
        transform = dict(min_size=min_size, max_size=max_size, image_mean=list(mean), image_std=list(std))
        model = cls.assemble(body, num_classes, fpn_channels, tuple(anchor_sizes), representation_size, transform,
                             **detector_kwargs)
        load_level_norms(model, body, pretrained_backbone)
        model.config = dict(backbone=backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                            fpn_channels=fpn_channels, anchor_sizes=tuple(anchor_sizes),
                            representation_size=representation_size, backbone_kwargs=backbone_kwargs,
                            **detector_kwargs)
        return model

    @classmethod
    def assemble(cls, body: nn.Module, num_classes: int, fpn_channels: int, anchor_sizes: Tuple[int, ...],
                 representation_size: int, transform: Dict, **detector_kwargs) -> nn.Module:
        """The framework on a ``features_only`` backbone ``body``; ``transform`` holds torchvision's
        resizing and normalisation arguments."""
        raise NotImplementedError

    def cost_parts(self, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> Dict[str, Callable]:
        """The computations of one forward pass on the batched image ``x``, as mmdetection's
        ``get_flops`` counts the detectors of DAT Tables 3-4: ``{'backbone', 'neck', 'head'}``, each a
        function of no arguments. The heads run on every pyramid level and, for the R-CNNs, the box
        head on ``proposals`` RoIs and the mask head on the first ``mask_rois`` of them; resizing,
        anchor decoding, NMS and RoIAlign's sampling are not part of any.
        """
        raise NotImplementedError

    @staticmethod
    def _cost_boxes(x: torch.Tensor, proposals: int) -> torch.Tensor:
        """``proposals`` fixed random boxes (seed 0) inside the image ``x``, the RoIs of :meth:`cost_parts`."""
        h, w = x.shape[-2:]
        generator = torch.Generator().manual_seed(0)
        corners = torch.rand(proposals, 2, 2, generator=generator) * torch.tensor([w, h])
        return torch.cat([corners.min(1).values, corners.max(1).values], 1).to(x.device, x.dtype)

    def _pyramid_parts(self, x: torch.Tensor) -> Tuple[Dict[str, Callable], Dict[str, torch.Tensor]]:
        """The backbone and neck parts of :meth:`cost_parts`, and the pyramid levels the heads read."""
        features: PyramidFeatures = self.backbone
        levels = features.body(x)
        return dict(backbone=lambda: features.body(x), neck=lambda: features.neck(levels)), features.neck(levels)
