"""Dense-prediction pieces shared by detection and segmentation.

A ``features_only`` backbone (any deformvit model, or any timm model) followed by a
LayerNorm per output level and torchvision's feature pyramid. Transformer backbones
produce un-normalised stage outputs (only the last stage has a norm, for the classifier),
so every output level gets its own LayerNorm, as Swin Transformer and DAT do when used in
detection and segmentation frameworks.
"""
import re
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ..checkpoint import load_state_dict_file, unwrap_state_dict
from ..errors import unknown_model_argument
from ..hub import OFFICIAL, names_official, resolve_weights_spec
from ..models.datpp import dense_level_norms

__all__ = ['ChannelsFirst', 'PyramidFeatures', 'create_backbone', 'input_normalisation', 'load_level_norms']


def input_normalisation(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` of the inputs the backbone ``name`` was pretrained on (ImageNet's when it has no config)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(cfg.mean), tuple(cfg.std)


def create_backbone(
        name: str,
        strides: Sequence[int] = (4, 8, 16, 32),
        pretrained: Optional[str] = None,
        drop_path_rate: float = 0.0,
        **kwargs,
) -> nn.Module:
    """``timm.create_model(name, features_only=True)`` returning the levels of the given strides.

    Args:
        name: a registered model (``dat_tiny``, ``eapt_small``, or any timm model with
            ``features_only``, e.g. ``swin_tiny_patch4_window7_224``, ``resnet50``).
        strides: output strides of the levels to return, finest first.
        pretrained: ``'official'`` (or ``name``): the model's official ImageNet weights, downloaded
            once (:mod:`deformvit.hub`); or the path of a checkpoint of the classification model (an
            official release file, an official detection / segmentation file, or a deformvit
            ``.safetensors``); None keeps the random initialisation.
        drop_path_rate: stochastic depth of the backbone.
        kwargs: further model arguments.

    Detection and segmentation images come in any size: a timm model built for one input size
    (Swin Transformer's ``strict_img_size``) is built to take any, and a model whose levels are
    channels-last (Swin's) is wrapped to give them channels-first, as every model of deformvit does.

    Raises:
        ValueError: the model has no feature level at one of ``strides``.
    """
    weights = resolve_weights_spec(pretrained, name)
    if weights == OFFICIAL:
        kwargs.update(pretrained=True)
    elif weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=weights))
    if drop_path_rate:
        kwargs['drop_path_rate'] = drop_path_rate
    model = _features(name, **kwargs)
    reductions = model.feature_info.reduction()
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ValueError(f'{name} has feature levels at strides {reductions}, none at {missing}; expected a '
                         f'pyramid backbone with levels at strides {list(strides)}')
    if reductions != list(strides):
        indices = tuple(len(reductions) - 1 - reductions[::-1].index(s) for s in strides)  # the last level of each
        model = _features(name, out_indices=indices, **kwargs)
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    if getattr(output_fmt, 'value', output_fmt) == 'NHWC':
        return ChannelsFirst(model)
    return model


# the per-level output norms of the official DAT++ detection / segmentation backbones
_OFFICIAL_LEVEL_NORM = re.compile(r'^backbone\.norms\.\d+\.norm\.(weight|bias)$')


def load_level_norms(model: nn.Module, body: nn.Module, pretrained: Optional[str]) -> bool:
    """Give each pyramid level's LayerNorm the per-level output norm of a detection / segmentation file.

    The official DAT++ detection and segmentation checkpoints LayerNorm every stage output before the
    neck (``backbone.norms.{stage}.norm.*``); in deformvit those are the level norms ``norms.{level}``
    of :class:`PyramidFeatures` or of the Semantic FPN decoder, numbered by the backbone's outputs
    (a RetinaNet reads stages 1-3 as levels 0-2). Files without such norms (classification weights,
    deformvit's own detectors and segmentors, whose level norms are the neck's) leave the model as it is.

    Args:
        model: the detector or segmentor built on ``body``.
        body: its ``features_only`` backbone (its ``feature_info`` names the stage of each level).
        pretrained: the backbone weights file, or None (or ``'official'``: classification weights, no norms).

    Returns:
        Whether norms were loaded.
    """
    if not pretrained or names_official(pretrained):
        return False
    checkpoint = unwrap_state_dict(load_state_dict_file(pretrained))
    if not any(_OFFICIAL_LEVEL_NORM.match(key) for key in checkpoint):  # deformvit's own files keep theirs
        return False
    try:
        stages = [int(name.rsplit('.', 1)[-1]) for name in body.feature_info.module_name()]
    except ValueError:
        stages = list(range(len(body.feature_info)))
    target = next((m.norms for m in model.modules() if isinstance(getattr(m, 'norms', None), nn.ModuleList)
                   and len(m.norms) == len(stages)), None)
    if target is None:
        warnings.warn(f'{pretrained} has per-level output norms but this model normalises no pyramid level '
                      '(e.g. UperNet): they are not used', stacklevel=2)
        return False
    norms = dense_level_norms(checkpoint, stages)
    target.load_state_dict({key[len('norms.'):]: value for key, value in norms.items()})
    return True


def _features(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, features_only=True, **kwargs)``, for any input size where the model has the switch."""
    if 'strict_img_size' not in kwargs:
        try:
            return _create(name, strict_img_size=False, **kwargs)
        except TypeError as error:  # the model has no such argument: it takes any size already
            if 'strict_img_size' not in str(error):
                raise
    return _create(name, **kwargs)


def _create(name: str, **kwargs) -> nn.Module:
    try:
        with warnings.catch_warnings():  # a dense file's level norms: the builders give them to the neck
            warnings.filterwarnings('ignore', message='the per-level output norms')  # (load_level_norms)
            return timm.create_model(name, features_only=True, **kwargs)
    except TypeError as error:
        usage = unknown_model_argument(name, error, {k: v for k, v in kwargs.items() if k != 'strict_img_size'},
                                       'backbone_kwargs')
        if usage is None:
            raise
        raise usage from error


class ChannelsFirst(nn.Module):
    """A ``features_only`` model whose (B, H, W, C) levels are returned as (B, C, H, W)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.feature_info = body.feature_info

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [level.permute(0, 3, 1, 2) for level in self.body(x)]  # (B, H, W, C) -> (B, C, H, W)


class PyramidFeatures(nn.Module):
    """Backbone stage outputs -> LayerNorm per level -> FPN, as an ordered dict of maps.

    The output has the keys ``'0'``, ``'1'``, ... for the FPN levels (finest first) followed
    by those of ``extra_blocks`` (``'pool'`` for P6 by max-pooling, ``'p6'``/``'p7'``), the
    layout torchvision's detectors and RoI poolers expect. ``out_channels`` is read by them.

    Args:
        backbone: a ``features_only`` model; all of its outputs are used.
        out_channels: channels of every pyramid level (256 in the papers' detectors).
        extra_blocks: torchvision ``ExtraFPNBlock`` adding coarser levels, or None.
        level_norm: LayerNorm each backbone output before the FPN.
    """

    def __init__(
            self,
            backbone: nn.Module,
            out_channels: int = 256,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            level_norm: bool = True,
    ):
        super().__init__()
        channels = backbone.feature_info.channels()
        self.body = backbone
        # nn.LayerNorm's eps, as the dense backbones of Swin Transformer and DAT
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-5) if level_norm else nn.Identity() for c in channels)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels
        self.strides = backbone.feature_info.reduction()

    def neck(self, levels: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The pyramid of the backbone's ``levels``: LayerNorm each, then the FPN and its extra levels."""
        return self.fpn(OrderedDict((str(i), norm(level)) for i, (norm, level) in enumerate(zip(self.norms, levels))))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.neck(self.body(x))
