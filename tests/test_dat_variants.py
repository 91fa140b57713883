"""Telling DAT v1 and DAT++ files apart, and naming the released model, from their keys alone.

Both official releases name their stem, stages and heads alike and share stem widths and depths; only
DAT++ has local perception units, convolutional FFNs and neighborhood-attention biases. The key layouts
are the releases' own (``../shared/reference/*_state_dict.tsv``).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from deformvit.models.dat import infer_dat_variant, is_datpp_state_dict

REFERENCE = Path(__file__).resolve().parents[2] / 'shared' / 'reference'


def layout(name: str) -> dict:
    """Empty tensors with the keys and shapes of a released state dict listed in ``name``."""
    state = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith('#'):
            continue
        key, shape = line.split('\t')[:2]
        state[key] = torch.empty([int(s) for s in shape.split('x')])
    return state


def widened(state: dict, width: int) -> dict:
    """``state`` with the first stage's width read from its norms changed to ``width`` (the key inference reads)."""
    out = dict(state)
    for key in out:
        if key.endswith('stages.0.layer_norms.0.norm.weight'):
            out[key] = torch.empty(width)
    return out


def test_released_datpp_tiny_layout_is_datpp_tiny():
    state = layout('datpp_tiny_official_state_dict.tsv')
    assert is_datpp_state_dict(state)
    assert infer_dat_variant(state) == 'datpp_tiny'
    assert infer_dat_variant({'model': state}) == 'datpp_tiny'


def test_v1_layout_with_the_same_names_stays_v1():
    state = layout('dat_tiny_official_v1_state_dict.tsv')
    assert not is_datpp_state_dict(state)
    assert infer_dat_variant(state) == 'dat_tiny'


def test_detection_checkpoint_backbone_keys_are_recognised():
    # DAT-Detection / DAT-Segmentation files prefix the backbone with 'backbone.' and add per-level norms
    state = {f'backbone.{k}': v for k, v in layout('datpp_tiny_official_state_dict.tsv').items()
             if not k.startswith('cls_')}
    state['backbone.norms.0.weight'] = torch.empty(64)
    assert is_datpp_state_dict(state)
    assert infer_dat_variant(state) == 'datpp_tiny'


@pytest.mark.parametrize('width,name', [(96, 'datpp_small'), (128, 'datpp_base')])
def test_datpp_widths_name_the_released_models(width, name):
    assert infer_dat_variant(widened(layout('datpp_tiny_official_state_dict.tsv'), width)) == name


def test_unreleased_datpp_width_is_refused_with_the_released_ones_named():
    with pytest.raises(ValueError, match='datpp_tiny, datpp_small, datpp_base'):
        infer_dat_variant(widened(layout('datpp_tiny_official_state_dict.tsv'), 80))


def test_datpp_without_first_stage_norm_is_refused():
    state = {k: v for k, v in layout('datpp_tiny_official_state_dict.tsv').items() if 'layer_norms' not in k}
    with pytest.raises(ValueError, match='layer_norms'):
        infer_dat_variant(state)


@pytest.mark.parametrize('name', ['datpp_tiny', 'datpp_small'])
def test_own_datpp_layout_names_its_model(name):
    state = timm.create_model(name).state_dict()
    assert is_datpp_state_dict(state)
    assert infer_dat_variant(state) == name


def test_own_v1_layout_is_not_datpp():
    assert not is_datpp_state_dict(timm.create_model('dat_tiny').state_dict())


def test_cli_convert_names_and_loads_a_released_datpp_file(tmp_path):
    state = {k: torch.randn(v.shape) for k, v in layout('datpp_tiny_official_state_dict.tsv').items()}
    src, dst = tmp_path / 'dat_pp_tiny_in1k_224.pth', tmp_path / 'datpp_tiny.safetensors'
    torch.save({'model': state}, src)
    result = subprocess.run([sys.executable, '-m', 'deformvit', 'convert', str(src), str(dst)],
                            capture_output=True, text=True, check=True)
    assert 'datpp_tiny' in result.stdout
    model = timm.create_model('datpp_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(dst)))
    torch.testing.assert_close(model.head.fc.weight, state['cls_head.weight'])
    torch.testing.assert_close(model.stages[2].blocks[3].lpu.weight, state['stages.2.local_perception_units.3.weight'])
