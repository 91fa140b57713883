"""Building blocks shared by the model families (DAT, EAPT)."""
from .attention import attention, attention_switches, attention_weights, counting_flops
from .fast import fast_paths, fast_paths_enabled
from .block import PreNormBlock
from .position import (
    deformable_relative_position_bias,
    relative_position_index,
    resize_fixed_position_bias,
    resize_relative_position_table,
)
from .position_encoding import MCMD, FloaterEncoding, LearnedEmbedding, SinusoidalEncoding, gaussian_descriptors
from .sampling import SamplingPoints, bilinear_grid_sample, reference_points, sample_bilinear
from .mlp import Mlp
from .neighborhood import NeighborhoodAttention2D, neighborhood_attention, neighborhood_attention_reference
from .window import pad_to_multiple, window_partition, window_region_mask, window_reverse

__all__ = [
    'FloaterEncoding',
    'LearnedEmbedding',
    'MCMD',
    'NeighborhoodAttention2D',
    'SinusoidalEncoding',
    'Mlp',
    'PreNormBlock',
    'SamplingPoints',
    'attention',
    'attention_switches',
    'attention_weights',
    'bilinear_grid_sample',
    'counting_flops',
    'deformable_relative_position_bias',
    'fast_paths',
    'fast_paths_enabled',
    'gaussian_descriptors',
    'neighborhood_attention',
    'neighborhood_attention_reference',
    'pad_to_multiple',
    'reference_points',
    'relative_position_index',
    'resize_fixed_position_bias',
    'resize_relative_position_table',
    'sample_bilinear',
    'window_partition',
    'window_region_mask',
    'window_reverse',
]
