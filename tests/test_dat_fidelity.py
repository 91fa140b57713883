"""Parameter and MAC counts against DAT's tables (fvcore convention, 224x224 unless noted)."""
import pytest
import timm

from deformvit import count_macs, count_parameters


def within(value: float, paper: float, tol: float = 0.01) -> bool:
    return abs(value - paper) <= tol * paper


@pytest.mark.parametrize('name, params_m, gmacs, size', [
    ('dat_tiny', 28.32, 4.59, 224),    # Table 6, last row (Table 2: 29M / 4.6G)
    ('dat_small', 50.0, 9.0, 224),     # Table 2
    ('dat_base', 88.0, 15.8, 224),     # Table 2
    ('dat_base_384', 88.0, 49.8, 384),  # Table 2
])
def test_released_models_match_table2_params_and_macs(name, params_m, gmacs, size):
    model = timm.create_model(name)
    params, macs = count_parameters(model) / 1e6, count_macs(model, (3, size, size)) / 1e9
    assert within(params, params_m), f'{name}: {params:.2f}M parameters vs {params_m}M in the paper'
    assert within(macs, gmacs), f'{name}: {macs:.2f} GMACs vs {gmacs}G in the paper'


def test_dat_tiny_matches_table6_params_and_macs_exactly_as_released():
    model = timm.create_model('dat_tiny')
    assert count_parameters(model) == 28_319_138  # the official dat_tiny state dict's parameters
    assert within(count_macs(model) / 1e9, 4.59, 0.002)


TABLE6 = [  # (Attn., Offsets, Pos. Embed) -> kwargs, GFLOPs, #Param (M)
    (dict(use_offsets=False, position_bias='none'), 4.57, 28.29),
    (dict(use_offsets=False, position_bias='relative'), 4.57, 28.32),
    (dict(use_offsets=True, position_bias='none'), 4.58, 28.29),
    (dict(use_offsets=True, position_bias='fixed'), 4.58, 29.73),
    (dict(use_offsets=True, position_bias='dwconv'), 4.59, 28.31),
    (dict(stage_spec=('PP', 'PP', 'LDLDLD', 'LD')), 4.48, 30.68),
    (dict(), 4.59, 28.32),
]
TABLE7 = [  # stages with deformable attention
    (dict(deformable_stages=(0, 1, 2, 3)), 4.64, 28.39),
    (dict(deformable_stages=(1, 2, 3)), 4.60, 28.34),
    (dict(deformable_stages=(2, 3)), 4.59, 28.32),
    (dict(deformable_stages=(3,)), 4.51, 28.29),
    (dict(deformable_stages=()), 4.51, 28.29),  # Swin-T
]
TABLE8 = [  # Deformable-DETR attention with K keys in stages 3 / 4, and DAT with 49 / 196 keys
    (dict(stage_spec=('LS', 'LS', 'LMLMLM', 'LM'), ddetr_points=16), 4.44, 27.95),
    (dict(stage_spec=('LS', 'LS', 'LMLMLM', 'LM'), ddetr_points=49), 4.83, 31.15),
    (dict(stage_spec=('LS', 'LS', 'LMLMLM', 'LM'), ddetr_points=(16, 16, 196, 49)), 6.16, 37.26),
    (dict(offset_stride=(4, 2, 2, 1)), 4.38, 28.32),
    (dict(), 4.59, 28.32),
]


@pytest.mark.parametrize('kwargs, gflops, params_m', TABLE6 + TABLE7 + TABLE8,
                         ids=[f'table6-{i}' for i in range(len(TABLE6))] + [f'table7-{i}' for i in range(len(TABLE7))]
                         + [f'table8-{i}' for i in range(len(TABLE8))])
def test_ablation_rows_match_tables_6_7_8(kwargs, gflops, params_m):
    model = timm.create_model('dat_tiny', **kwargs)
    params, macs = count_parameters(model) / 1e6, count_macs(model) / 1e9
    assert within(params, params_m), f'{kwargs}: {params:.3f}M vs {params_m}M'
    assert within(macs, gflops), f'{kwargs}: {macs:.3f}G vs {gflops}G'


def test_conv_patch_embedding_matches_table9_dat_t_star():
    model = timm.create_model('dat_tiny', conv_patch_embed=True)
    assert within(count_parameters(model) / 1e6, 30.0, 0.02)  # Table 9 rounds to 30M / 4.8G
    assert within(count_macs(model) / 1e9, 4.8, 0.02)


def test_offset_network_overhead_is_minor_as_in_sec_3_2():
    """Sec. 3.2: the offset network (k = 5) adds at most 6.0% to a stage-3 attention module."""
    block = 'stages.2.blocks.1.attn'
    _, with_offsets = count_macs(timm.create_model('dat_tiny'), by_module=True)
    _, without = count_macs(timm.create_model('dat_tiny', use_offsets=False), by_module=True)
    overhead = with_offsets[block] - without[block]
    assert with_offsets[block + '.offset_net'] > 0 and block + '.offset_net' not in without
    assert 0 < overhead <= 0.06 * with_offsets[block]
