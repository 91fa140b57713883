"""UperNet (Xiao et al., "Unified Perceptual Parsing", ECCV 2018), the decoder of DAT Table 5 and
EAPT Table VI, configured as mmsegmentation's: pyramid pooling (scales 1, 2, 3, 6) on the last
stage, an FPN of 512 channels and the four levels fused at stride 4; trained with the auxiliary
FCN head on stage 3 (256 channels, loss weight 0.4). The decoder is
segmentation_models_pytorch's ``UPerNetDecoder``.
"""
from typing import Sequence

import torch

from ...errors import optional
from .segmentor import Decoder

__all__ = ['UPerNet']


class UPerNet(Decoder):
    """segmentation_models_pytorch's UPerNet decoder over four backbone levels.

    Args:
        in_channels: channels of the backbone levels, finest first.
        strides: output strides of the levels (the decoder assumes 4, 8, 16, 32).
        channels: width of the pyramid pooling, FPN and output (the paper's: 512).
        fpn_channels: unused; UperNet's FPN is ``channels`` wide.
    """
    default_channels = 512
    auxiliary_head = True

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int = default_channels,
                 fpn_channels: int = 256):
        super().__init__()
        # the decoder reads levels [stride 1, 2, 4, 8, 16, 32] and skips the first two
        smp = optional('segmentation_models_pytorch.decoders.upernet.decoder', 'UperNet',
                       package='segmentation_models_pytorch')
        self.decoder = smp.UPerNetDecoder([0, 0, *in_channels], encoder_depth=5, decoder_channels=channels)
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decoder([None, None, *features])
