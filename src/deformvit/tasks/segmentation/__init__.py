"""Semantic segmentation on any deformvit (or timm) backbone, by decoder name.

:data:`SEGMENTORS` maps each name to its decoder (a :class:`~.segmentor.Decoder`), the two of
DAT Table 5 (EAPT Table VI uses UperNet); :func:`build_segmentor` puts one in a
:class:`~.segmentor.Segmentor` on a backbone. A new decoder is a module of this package and its
line in the table.
"""
from typing import Dict, Optional, Type

from ..base import registered
from ..necks import create_backbone, input_normalisation, load_level_norms
from .segmentor import Decoder, Segmentor
from .semantic_fpn import SemanticFPNDecoder
from .upernet import UPerNet

__all__ = ['SEGMENTORS', 'Segmentor', 'build_segmentor', 'decoder_class']

SEGMENTORS: Dict[str, Type[Decoder]] = {
    'semantic_fpn': SemanticFPNDecoder,  # DAT Table 5
    'upernet': UPerNet,  # DAT Table 5, EAPT Table VI
}


def decoder_class(name: str) -> Type[Decoder]:
    """The decoder registered as ``name`` (``ValueError`` for an unknown one)."""
    return registered(SEGMENTORS, name, 'decoder')


def build_segmentor(name: str = 'upernet', backbone: str = 'dat_tiny', num_classes: int = 150,
                    pretrained_backbone: Optional[str] = None, drop_path_rate: float = 0.0,
                    channels: Optional[int] = None, auxiliary_head: Optional[bool] = None, fpn_channels: int = 256,
                    backbone_kwargs: Optional[Dict] = None) -> Segmentor:
    """A :class:`Segmentor` with the decoder ``name`` on ``backbone``.

    Args:
        name: one of :data:`SEGMENTORS` (``'semantic_fpn'`` or ``'upernet'``).
        backbone: registered model name.
        num_classes: classes predicted per pixel (150 for ADE20K).
        pretrained_backbone: checkpoint file of the classification backbone.
        drop_path_rate: stochastic depth of the backbone (DAT Sec. 4.3: 0.3 for T and S, 0.5 for B).
        channels: decoder width; None for the papers' (128 / 512).
        auxiliary_head: None follows mmsegmentation (UperNet has one, Semantic FPN not).
        fpn_channels: FPN width of Semantic FPN.
        backbone_kwargs: further arguments of the backbone.

    Returns:
        The segmentor; ``model.config`` holds the arguments that rebuild it, ``model.mean`` and
        ``model.std`` the input normalisation of the backbone.

    Raises:
        ValueError: an unknown decoder, or a backbone without four levels at strides 4-32.
    """
    decoder = decoder_class(name)
    if auxiliary_head is None:
        auxiliary_head = decoder.auxiliary_head
    body = create_backbone(backbone, (4, 8, 16, 32), pretrained_backbone, drop_path_rate, **(backbone_kwargs or {}))
    levels = body.feature_info
    model = Segmentor(body, decoder(levels.channels(), levels.reduction(), channels or decoder.default_channels,
                                    fpn_channels), num_classes, auxiliary_head)
    load_level_norms(model, body, pretrained_backbone)
    model.config = dict(decoder=name, backbone=backbone, num_classes=num_classes, channels=channels,
                        auxiliary_head=auxiliary_head, fpn_channels=fpn_channels,
                        backbone_kwargs=dict(backbone_kwargs or {}))
    model.mean, model.std = input_normalisation(backbone)
    return model
