"""EAPT En-DeC (Sec. III-B, Eq. (4)-(5), Fig. 3): "communication information among all patches".

The global En-DeC encodes "as many times as needed" down to one cell and decodes back, so a
position hears from every other one in every stage; the one-level (``'local'``) module reaches
only the 5x5 windows around a position. Only the attention mixes positions inside a block (its
norms and MLP act per position), so the first block's reach is its attention's reach.
"""
import pytest
import timm
import torch

from deformvit import count_parameters
from deformvit.models.eapt import DeformableWindowAttention, EnDeC, WindowGeometry

# eapt_small's stages (Table II EAPT-S): channels, heads, (c', c'')
EAPT_S_STAGES = [(96, 3, (1, 2)), (192, 6, (2, 4)), (384, 12, (4, 8)), (768, 24, (8, 16))]
MAPS = {224: ((56, 28, 14, 7), 7), 384: ((96, 48, 24, 12), 12)}  # stage maps and window


def first_block_attention(stage: int, image: int, endec_mode: str) -> DeformableWindowAttention:
    dim, heads, channels = EAPT_S_STAGES[stage]
    maps, window = MAPS[image]
    return DeformableWindowAttention(dim, heads, window, feature_size=(maps[stage],) * 2,
                                     endec_channels=channels, endec_mode=endec_mode)


def corner_gradient(attn: DeformableWindowAttention, size: int) -> torch.Tensor:
    """|d out[top-left] / d in[bottom-right]| summed over channels, for one ``size x size`` map."""
    torch.manual_seed(0)
    f = torch.randn(1, size, size, attn.q.in_features, requires_grad=True)
    geometry = WindowGeometry.of((size, size), attn.effective_window((size, size)))
    out = geometry.reverse(attn(geometry.partition(f), geometry))  # the maps are multiples of the window
    out[0, 0, 0].sum().backward()
    return f.grad[0, -1, -1].abs().sum()


@pytest.mark.parametrize('image', [224, 384])
@pytest.mark.parametrize('stage', [0, 1, 2, 3])
def test_global_endec_lets_the_top_left_output_hear_the_far_corner_in_every_stage(stage, image):
    attn = first_block_attention(stage, image, 'global')
    assert corner_gradient(attn, MAPS[image][0][stage]) > 0


@pytest.mark.parametrize('stage', [0, 1])
def test_local_endec_does_not_reach_across_stages_1_and_2_at_224(stage):
    """The one-level module reaches 2 windows each way; stage 1 has 8x8 windows, stage 2 4x4."""
    attn = first_block_attention(stage, 224, 'local')
    assert corner_gradient(attn, MAPS[224][0][stage]) == 0


@pytest.mark.parametrize('size', [(13, 9), (1, 1), (3, 30)])
@pytest.mark.parametrize('kernel_size, stride', [(12, 4), (3, 1)])
def test_global_endec_decodes_each_level_to_the_size_it_was_encoded_from(size, kernel_size, stride):
    endec = EnDeC(16, 2, 4, kernel_size, stride, 'global')
    encoded, decoded = [], []
    endec.encode_halving.register_forward_hook(lambda m, args, out: encoded.append(tuple(args[0].shape[-2:])))
    endec.decode_doubling.register_forward_hook(lambda m, args, out: decoded.append(tuple(out.shape[-2:])))
    x = torch.randn(2, *size, 16, requires_grad=True)
    out = endec(x)
    assert out.shape == (2, *size, 2)
    assert decoded == encoded[::-1]
    assert (1, 1) not in encoded  # halving stops at one cell
    out[0, 0, 0].sum().backward()
    assert x.grad[0, -1, -1].abs().sum() > 0


def test_global_endec_adds_one_shared_convolution_pair_and_local_keeps_the_old_keys():
    local, global_ = EnDeC(96, 1, 2, 21, 7, 'local'), EnDeC(96, 1, 2, 21, 7, 'global')
    old_keys = {f'{name}.{p}' for name in ('compress', 'encode', 'decode') for p in ('weight', 'bias')}
    assert set(local.state_dict()) == old_keys
    new_keys = {f'{name}.{p}' for name in ('encode_halving', 'decode_doubling') for p in ('weight', 'bias')}
    assert set(global_.state_dict()) == old_keys | new_keys
    assert count_parameters(global_) - count_parameters(local) == 2 * (2 * 2 * 9 + 2)  # c''^2 3x3 + c'' bias, twice

    models = {mode: timm.create_model('eapt_nano', endec_mode=mode) for mode in ('global', 'local')}
    blocks = [(s.blocks[0].attn.endec.encode.out_channels, len(s.blocks)) for s in models['global'].stages]
    expected = sum(depth * 2 * (c ** 2 * 9 + c) for c, depth in blocks)
    assert count_parameters(models['global']) - count_parameters(models['local']) == expected
    assert set(models['local'].state_dict()) < set(models['global'].state_dict())


def test_endec_mode_is_per_stage_and_checked():
    model = timm.create_model('eapt_nano', endec_mode=('local', 'local', 'global', 'global'))
    assert [s.blocks[0].attn.endec.mode for s in model.stages] == ['local', 'local', 'global', 'global']
    assert timm.create_model('eapt_nano').stages[0].blocks[0].attn.endec.mode == 'global'
    with pytest.raises(ValueError, match="En-DeC mode 'wide' is not one of"):
        EnDeC(16, 2, 4, 12, 4, 'wide')
