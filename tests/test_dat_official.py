"""Official DAT release checkpoints: layout, conversion, numerical equality, safe loading.

``fixtures/dat_official_mini.pth`` is a release-format checkpoint (``{'model': state_dict}``)
of a narrow DAT built and run with the official implementation (LeapLabTHU/DAT, CVPR 2022
release) by ``benchmarks/compare_official.py --write-fixture``; the JSON beside it holds the
official logits and deformed points for a fixed input.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from deformvit import UnsafeCheckpointError, load_state_dict_file
from deformvit.hub import WeightsDownloadError
from deformvit.models.dat import checkpoint_filter_fn, infer_dat_variant
from deformvit.tools.convert import convert_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from compare_official import structured_input  # noqa: E402  (the fixture's input)

REFERENCE = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'dat_tiny_official_v1_state_dict.tsv'


@pytest.fixture(scope='module')
def mini(request):
    folder = Path(__file__).parent / 'fixtures'
    meta = json.loads((folder / 'dat_official_mini.json').read_text())
    return folder / 'dat_official_mini.pth', meta


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_official_checkpoint_gives_official_logits_and_points(mini):
    path, meta = mini
    model = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **meta['deformvit_kwargs']).eval()
    x = structured_input(meta['batch'], meta['official_config']['img_size'])
    logits, records = model.forward_sampling_points(x)
    assert relative_error(logits, torch.tensor(meta['logits'])) < 1e-4
    assert len(records) == len(meta['points'])
    for record, points, refs in zip(records, meta['points'], meta['references']):
        torch.testing.assert_close(record.points, torch.tensor(points), rtol=0, atol=1e-4)
        torch.testing.assert_close(record.reference, torch.tensor(refs), rtol=0, atol=1e-6)


def test_convert_round_trip_keeps_official_logits(mini, tmp_path):
    path, meta = mini
    out = tmp_path / 'mini.safetensors'
    convert_checkpoint(str(path), str(out), 'dat_tiny', **meta['deformvit_kwargs'])
    model = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **meta['deformvit_kwargs']).eval()
    with torch.no_grad():
        logits = model(structured_input(meta['batch'], 224))
    assert relative_error(logits, torch.tensor(meta['logits'])) < 1e-4
    # converted files pass through the filter unchanged
    converted = load_state_dict_file(str(out))
    assert checkpoint_filter_fn(dict(converted), model).keys() == converted.keys()


def official_dat_tiny_state_dict() -> dict:
    """Random tensors with exactly the keys and shapes of the released dat_tiny file."""
    state = {}
    for line in REFERENCE.read_text().splitlines():
        key, shape, _ = line.split('\t')
        dims = [int(s) for s in shape.split('x')]
        state[key] = torch.randn(dims) if not key.endswith('index') else torch.randint(0, 169, dims)
    return state


def test_released_dat_tiny_layout_converts_to_every_parameter():
    state = official_dat_tiny_state_dict()
    model = timm.create_model('dat_tiny')
    converted = checkpoint_filter_fn({'model': state}, model)
    own = model.state_dict()
    assert converted.keys() == own.keys()
    assert all(converted[k].shape == own[k].shape for k in own)
    n_params = sum(math.prod(v.shape) for k, v in state.items()
                   if not k.endswith(('relative_position_index', 'attn_mask')))
    assert n_params == sum(v.numel() for v in converted.values())
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.stages[2].blocks[1].attn.proj_q.weight,
                               state['stages.2.attns.1.proj_q.weight'].flatten(1))
    assert infer_dat_variant(state) == 'dat_tiny'


def test_cli_convert_then_create_model_loads_identical_weights(tmp_path):
    state = official_dat_tiny_state_dict()
    src, dst = tmp_path / 'dat_tiny.pth', tmp_path / 'dat_tiny.safetensors'
    torch.save({'model': state}, src)
    result = subprocess.run([sys.executable, '-m', 'deformvit', 'convert', str(src), str(dst)],
                            capture_output=True, text=True, check=True)
    assert 'dat_tiny' in result.stdout
    model = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(dst)))
    torch.testing.assert_close(model.head.fc.weight, state['cls_head.weight'])
    torch.testing.assert_close(model.stages[3].blocks[1].attn.rel_pos_table, state['stages.3.attns.1.rpe_table'])


class TrainingConfig:
    """Stands in for the config object that release training checkpoints pickle."""
    lr = 1e-3


def test_checkpoint_with_pickled_objects_is_refused_with_instructions(mini, tmp_path):
    path, meta = mini
    state = torch.load(path, weights_only=True)
    unsafe = tmp_path / 'ckpt_epoch_300.pth'
    torch.save({'model': state['model'], 'config': TrainingConfig()}, unsafe)
    with pytest.raises(UnsafeCheckpointError, match='--trust-pickle'):
        timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(unsafe)),
                          **meta['deformvit_kwargs'])
    out = tmp_path / 'trusted.safetensors'
    convert_checkpoint(str(unsafe), str(out), 'dat_tiny', weights_only=False, **meta['deformvit_kwargs'])
    assert out.exists()


def test_corrupt_and_missing_files_raise_clear_errors(mini, tmp_path):
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(mini[0].read_bytes()[:100_000])
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(truncated)))
    broken = tmp_path / 'broken.pth'
    broken.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        load_state_dict_file(str(broken))
    with pytest.raises(FileNotFoundError, match='no checkpoint file'):
        load_state_dict_file(str(tmp_path / 'missing.pth'))
    bad_st = tmp_path / 'broken.safetensors'
    bad_st.write_bytes(b'\x00' * 16)
    with pytest.raises(ValueError, match='not a readable safetensors'):
        load_state_dict_file(str(bad_st))
    with pytest.raises(WeightsDownloadError, match='pretrained_cfg_overlay=dict\\(file=PATH\\)'):
        timm.create_model('dat_tiny', pretrained=True)  # offline (tests/conftest.py): what to do instead


def test_new_classifier_and_input_channels_keep_the_backbone(mini):
    path, meta = mini
    kwargs = dict(meta['deformvit_kwargs'], num_classes=3, in_chans=1)
    model = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    state = torch.load(path, weights_only=True)['model']
    torch.testing.assert_close(model.stages[2].blocks[1].attn.offset_net.conv_dw.weight,
                               state['stages.2.attns.1.conv_offset.0.weight'])
    torch.testing.assert_close(model.stem.conv.weight, state['patch_proj.0.weight'].sum(1, keepdim=True))
    assert model.head.fc.out_features == 3
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_224_checkpoint_loads_into_384_model_with_resized_tables(mini):
    path, meta = mini
    model = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **dict(meta['deformvit_kwargs'], img_size=384, window_size=12)).eval()
    assert model.stages[0].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 1)
    assert model.stages[2].blocks[1].attn.rel_pos_table.shape == (4, 47, 47)
    state = torch.load(path, weights_only=True)['model']
    # bicubic resizing keeps the table's corners
    table = model.stages[2].blocks[1].attn.rel_pos_table
    source = state['stages.2.attns.1.rpe_table']
    assert table[:, 23, 23].sub(source[:, 13, 13]).abs().max() < source.abs().max()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 384, 384))).all()
