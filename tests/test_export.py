"""``deformvit export``: ONNX and torch.export files that compute what the PyTorch model computes.

Every exported file is compared here with onnxruntime or ``torch.export.load`` run by the test
itself on its own random images, not with the numbers the exporter reports.
"""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

from deformvit.checkpoint import metadata_for, save_safetensors
from deformvit.cli import main
from deformvit.tools import export
from deformvit.tools.onnx_opset import to_opset_17

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from compare_official import structured_input  # noqa: E402  (the input of the official-checkpoint fixture)

TOLERANCE = 1e-4
CLASSES = [str(i) for i in range(10)]


def dat_model(**kwargs) -> torch.nn.Module:
    """A compact dat_nano, one local, shift-window or deformable block per stage unless ``kwargs`` say otherwise."""
    return timm.create_model('dat_nano', **{'stage_spec': ('L', 'S', 'D', 'D'), **kwargs}).eval()


# one compact model per DAT attention kind (DAT Table 6 rows P, S-fixed, S-DWConv; Table 8 D-DETR)
DAT_ABLATIONS = {
    'sra': dict(stage_spec=('P', 'P', 'LD', 'D')),
    'deformable_detr': dict(stage_spec=('L', 'S', 'LM', 'M')),
    'fixed_bias': dict(position_bias='fixed'),
    'dwconv_bias': dict(position_bias='dwconv'),
}
EAPT_ENCODINGS = ('sinusoidal', 'embedding', 'relative', 'floater', 'mcmd')  # EAPT Table VIII


def cli(*argv: str) -> str:
    """Run ``deformvit export ARGV``; return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(['export', *argv])
    return out.getvalue()


def onnx_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def max_diff_onnx(session: ort.InferenceSession, model: torch.nn.Module, x: torch.Tensor) -> float:
    (got,) = session.run(None, {'images': x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    return float(np.abs(got - expected).max())


def input_dims(path) -> list:
    """The ONNX input's dimensions: ints for fixed axes, names for dynamic ones."""
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField('dim_value') else d.dim_param for d in dims]


@pytest.fixture(scope='module')
def dat_nano_onnx(tmp_path_factory):
    """dat_nano trained-checkpoint stand-in (10 classes) exported by the command at 64x64."""
    folder = tmp_path_factory.mktemp('dat_nano')
    torch.manual_seed(0)
    model = timm.create_model('dat_nano', num_classes=10).eval()
    checkpoint = folder / 'best.safetensors'
    save_safetensors(model.state_dict(), str(checkpoint), metadata_for('dat_nano', {'num_classes': 10}, CLASSES, 3))
    path = folder / 'dat_nano.onnx'
    printed = cli(str(checkpoint), '--size', '64', '--output', str(path))
    return model, path, printed


@pytest.fixture(scope='module')
def eapt_nano_onnx(tmp_path_factory):
    """eapt_nano exported by the library at 64x48 (its position tables are built for 32x32)."""
    torch.manual_seed(0)
    model = timm.create_model('eapt_nano').eval()
    path = tmp_path_factory.mktemp('eapt_nano') / 'eapt_nano.onnx'
    report = export.export_onnx(model, str(path), size=(64, 48))
    return model, path, report


def test_dat_nano_onnx_equals_pytorch_at_two_batch_sizes(dat_nano_onnx):
    model, path, printed = dat_nano_onnx
    assert input_dims(path) == ['batch', 3, 64, 64]
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ['logits']
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        assert session.run(None, {'images': x.numpy()})[0].shape == (batch, 10)
        assert max_diff_onnx(session, model, x) < TOLERANCE
    assert 'ONNX opset 18, input images (batch, 3, 64, 64)' in printed
    assert 'max |diff| to PyTorch' in printed and '(1, 3, 68, 64) refused' in printed
    assert f'wrote {path}' in printed
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not the temporary file's 0600
    latency = export.measure_latency(model, str(path), (1, 3, 64, 64), runs=2)
    assert set(latency) == {'pytorch', 'onnxruntime'} and all(0 < t < 60 for t in latency.values())


def test_eapt_nano_onnx_equals_pytorch_at_two_batch_sizes(eapt_nano_onnx):
    model, path, report = eapt_nano_onnx
    assert report.written and report.passed and path.exists()
    assert report.input_shape == (None, 3, 64, 48) and input_dims(path) == ['batch', 3, 64, 48]
    assert [c.shape for c in report.checks] == [(1, 3, 64, 48), (2, 3, 64, 48)]
    assert report.max_abs_diff < TOLERANCE
    session = onnx_session(path)
    for batch in (2, 5):
        assert max_diff_onnx(session, model, torch.randn(batch, 3, 64, 48)) < TOLERANCE


@pytest.mark.parametrize('shape', [(1, 3, 96, 64), (1, 3, 64, 68), (2, 3, 32, 32)])
def test_onnx_with_fixed_spatial_size_refuses_other_sizes(dat_nano_onnx, shape):
    # DAT pads windows and builds shift masks and reference grids for the traced 64x64 input:
    # another size must fail in onnxruntime, not run on the 64x64 geometry
    _, path, _ = dat_nano_onnx
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        onnx_session(path).run(None, {'images': torch.randn(*shape).numpy()})


def test_eapt_onnx_refuses_other_sizes_and_the_report_says_so(eapt_nano_onnx):
    _, path, report = eapt_nano_onnx
    assert report.refused == [((1, 3, 68, 48), True)]
    assert 'EAPT computes the window geometry' in report.fixed_spatial
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        onnx_session(path).run(None, {'images': torch.randn(1, 3, 64, 64).numpy()})


def test_static_export_at_opset_17_fixes_the_batch_too(tmp_path):
    model = dat_model(stage_spec=('L', 'S', 'D', 'L'))  # pads the 1x1 last map: Pad and ReduceMean differ in opset 18
    path = tmp_path / 'static.onnx'
    report = export.export_onnx(model, str(path), size=32, batch=2, opset=17, static=True)
    assert report.passed and input_dims(path) == [2, 3, 32, 32]
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ('', 'ai.onnx')] == [17]
    assert report.refused == [((2, 3, 36, 32), True), ((3, 3, 32, 32), True)]
    session = onnx_session(path)
    assert max_diff_onnx(session, model, torch.randn(2, 3, 32, 32)) < TOLERANCE
    for shape in ((3, 3, 32, 32), (1, 3, 32, 32), (2, 3, 64, 64)):
        with pytest.raises(Exception, match='(?i)dimension|shape'):
            session.run(None, {'images': torch.randn(*shape).numpy()})


def opset_18_model(node: onnx.NodeProto, inputs, output, initializers=()) -> onnx.ModelProto:
    graph = onnx.helper.make_graph([node], 'g', inputs, [output], list(initializers))
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', 18)])


def test_opset_17_rewrite_moves_reduce_axes_back_to_an_attribute():
    x = onnx.helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [2, 3, 4])
    y = onnx.helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [2, 1, 4])
    axes = onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), 'axes')
    node = onnx.helper.make_node('ReduceMax', ['x', 'axes'], ['y'], keepdims=1)
    model = to_opset_17(opset_18_model(node, [x], y, [axes]))
    assert model.opset_import[0].version == 17 and list(model.graph.node[0].input) == ['x']
    data = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    (got,) = ort.InferenceSession(model.SerializeToString()).run(None, {'x': data})
    np.testing.assert_array_equal(got, data.max(axis=1, keepdims=True))


@pytest.mark.parametrize('node, why', [
    (onnx.helper.make_node('Split', ['x'], ['y', 'z'], num_outputs=2), 'changed between opset 17 and 18'),
    (onnx.helper.make_node('Mish', ['x'], ['y']), 'does not exist in opset 17'),
])
def test_opset_17_rewrite_refuses_what_opset_17_cannot_express(node, why):
    x = onnx.helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [4])
    y = onnx.helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, None)
    with pytest.raises(ValueError, match=f'cannot write opset 17: {node.op_type} node .* {why}; export with opset 18'):
        to_opset_17(opset_18_model(node, [x], y))


def test_exported_program_round_trip_equals_eager_and_leaves_the_model_usable(tmp_path):
    torch.manual_seed(0)
    model = dat_model()
    path = tmp_path / 'dat.pt2'
    # a size no other test runs: its shift and padding masks are first built while tracing
    report = export.export_program(model, str(path), size=(40, 72))
    assert report.passed and report.format == 'exported-program'
    loaded = torch.export.load(str(path)).module()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 40, 72)
        with torch.no_grad():
            eager = model(x)  # masks made while tracing were not cached for eager calls
            assert type(eager) is torch.Tensor
            torch.testing.assert_close(loaded(x), eager, atol=1e-5, rtol=0)
    with pytest.raises(AssertionError, match=r'Guard failed: x.size\(\)\[3\] == 72'):
        loaded(torch.randn(1, 3, 40, 40))


@pytest.mark.slow
def test_features_only_program_returns_the_four_maps(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('eapt_nano', features_only=True, depths=(1, 1, 1, 1)).eval()
    path = tmp_path / 'features.pt2'
    report = export.export_program(model, str(path), size=64)
    assert report.passed
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, expected = torch.export.load(str(path)).module()(x), model(x)
    assert [tuple(f.shape) for f in got] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_a_failed_check_exits_nonzero_and_writes_nothing(tmp_path):
    path = tmp_path / 'dat.pt2'
    path.write_bytes(b'previous export')
    # no difference is below 0
    with pytest.raises(SystemExit, match=r'the check failed \(max \|diff\| .* is not below 0e\+00.*nothing was written'):
        cli('dat_nano', '--format', 'exported-program', '--output', str(path), '--tolerance', '0',
            '--model-args', '{"stage_spec": ["L", "L", "L", "L"]}')
    assert path.read_bytes() == b'previous export'
    assert [p.name for p in tmp_path.iterdir()] == ['dat.pt2']  # no temporary file left behind


@pytest.mark.parametrize('argv, message', [
    (['dat_nano', '--opset', '16'], 'opset 16 is not supported: ONNX export needs opset 17 or newer'),
    (['dat_gigantic'], "unknown model 'dat_gigantic': expected a registered model"),
    (['dat_nano', '--output', 'missing-folder/dat_nano.onnx'], 'the output folder .*missing-folder does not exist'),
    (['dat_nano', '--output', 'dat_nano.pt2'], 'onnx files are written as .onnx'),
    (['dat_nano', '--size', '16'], 'size 16x16 is smaller than the 32x32 minimum'),
    (['eapt_nano', '--size', '64', '24'], 'size 64x24 is smaller than the 32x32 minimum'),
    (['dat_nano', '--batch', '0'], 'argument --batch: expected a positive integer, got 0'),
    (['dat_nano', '--checkpoint', 'nowhere.safetensors'], 'no checkpoint file at nowhere.safetensors'),
])
def test_cli_errors_name_the_problem(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match='^deformvit export: ' + message):
        cli(*argv)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('task, kind', [('detect', 'detection'), ('segment', 'segmentation')])
def test_dense_task_checkpoints_are_refused(tmp_path, task, kind):
    path = tmp_path / 'best.safetensors'
    save_safetensors({'w': torch.zeros(1)}, str(path), metadata_for('dat_nano', {}, ['a'], 0, task=task))
    with pytest.raises(SystemExit, match=f'is a {kind} checkpoint .* not exportable by this command'):
        cli(str(path), '--output', str(tmp_path / 'm.onnx'))
    with pytest.raises(SystemExit, match=f'is a {kind} checkpoint'):
        cli('dat_nano', '--checkpoint', str(path), '--output', str(tmp_path / 'm.onnx'))
    assert [p.name for p in tmp_path.iterdir()] == ['best.safetensors']


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / 'best.safetensors'
    save_safetensors({'w': torch.zeros(1)}, str(path), metadata_for('dat_nano', {}, ['a'], 0))
    with pytest.raises(SystemExit, match='holds a dat_nano model, not eapt_nano'):
        cli('eapt_nano', '--checkpoint', str(path))
    converted = tmp_path / 'converted.safetensors'  # a state dict without metadata
    save_safetensors(timm.create_model('dat_nano').state_dict(), str(converted))
    with pytest.raises(SystemExit, match=r'converted.safetensors does not fit this model: shapes differ'):
        cli('dat_nano', '--checkpoint', str(converted), '--model-args', '{"embed_dims": [32, 64, 128, 128]}')


def test_model_args_must_be_a_json_object(capsys):
    with pytest.raises(SystemExit):
        cli('dat_nano', '--model-args', '[1, 2]')
    assert 'expected a JSON object' in capsys.readouterr().err


def test_library_refuses_models_it_does_not_know(tmp_path):
    with pytest.raises(ValueError, match=r'expected a DAT, DAT\+\+ or EAPT model'):
        export.export_onnx(torch.nn.Conv2d(3, 8, 3), str(tmp_path / 'conv.onnx'), size=32)
    with pytest.raises(ValueError, match='opset 11 is not supported'):
        export.export_onnx(timm.create_model('dat_nano'), str(tmp_path / 'm.onnx'), opset=11)


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(model)(x).graph_break_count


@pytest.mark.parametrize('name', ['dat_nano', 'eapt_nano'])  # eapt_nano: the MCMD encoding
def test_nano_models_trace_without_graph_breaks(name):
    assert graph_breaks(timm.create_model(name).eval(), torch.randn(2, 3, 32, 32)) == 0


@pytest.mark.parametrize('ablation', list(DAT_ABLATIONS))
def test_dat_ablations_trace_without_graph_breaks(ablation):
    assert graph_breaks(dat_model(**DAT_ABLATIONS[ablation]), torch.randn(1, 3, 32, 32)) == 0


@pytest.mark.parametrize('encoding', [e for e in EAPT_ENCODINGS if e != 'mcmd'])
def test_eapt_position_encodings_trace_without_graph_breaks(encoding):
    model = timm.create_model('eapt_nano', depths=(1, 1, 1, 1), position_encoding=encoding).eval()
    assert graph_breaks(model, torch.randn(1, 3, 32, 32)) == 0


def test_fullgraph_compiled_model_equals_eager():
    torch._dynamo.reset()
    model = dat_model()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')  # fullgraph: a graph break raises
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dat_nano', 'eapt_nano'])
def test_inductor_compiled_model_equals_eager(name):
    torch._dynamo.reset()
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize('kwargs', [
    *DAT_ABLATIONS.values(),
    dict(use_offsets=False, position_bias='none'),
    dict(conv_patch_embed=True, offset_range_factor=None),
], ids=[*DAT_ABLATIONS, 'no_offsets', 'conv_stem_unbounded'])
def test_dat_ablations_export_to_onnx(tmp_path, kwargs):
    model = dat_model(**kwargs)
    report = export.export_onnx(model, str(tmp_path / 'm.onnx'), size=(64, 48))
    assert report.passed, report
    assert max_diff_onnx(onnx_session(tmp_path / 'm.onnx'), model, torch.randn(2, 3, 64, 48)) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize('kwargs', [
    *(dict(position_encoding=e) for e in EAPT_ENCODINGS),
    dict(broaden_size=0, use_endec=False),
], ids=[*EAPT_ENCODINGS, 'no_deformation_no_endec'])
def test_eapt_ablations_export_to_onnx(tmp_path, kwargs):
    model = timm.create_model('eapt_nano', depths=(1, 1, 1, 1), **kwargs).eval()
    size = (32, 32) if kwargs.get('position_encoding') == 'floater' else (64, 48)  # FLOATER unrolls H*W/16 ODE steps
    report = export.export_onnx(model, str(tmp_path / 'm.onnx'), size=size)
    assert report.passed, report
    assert max_diff_onnx(onnx_session(tmp_path / 'm.onnx'), model, torch.randn(2, 3, *size)) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize('name, size', [('dat_tiny', 224), ('eapt_small', 224), ('dat_tiny', 256)])
def test_full_size_models_export_to_onnx(tmp_path, name, size):
    model = timm.create_model(name).eval()
    report = export.export_onnx(model, str(tmp_path / f'{name}.onnx'), size=size)
    assert report.passed, report
    assert max_diff_onnx(onnx_session(tmp_path / f'{name}.onnx'), model, torch.randn(1, 3, size, size)) < TOLERANCE


@pytest.mark.slow
def test_onnx_of_an_official_dat_checkpoint_gives_the_official_logits(fixtures, tmp_path):
    # the logits were computed by the official DAT implementation (tests/test_dat_official.py)
    meta = json.loads((fixtures / 'dat_official_mini.json').read_text())
    path = tmp_path / 'mini.onnx'
    cli('dat_tiny', '--checkpoint', str(fixtures / 'dat_official_mini.pth'), '--size', '224', '--output', str(path),
        '--model-args', json.dumps(meta['deformvit_kwargs']))
    x = structured_input(meta['batch'], meta['official_config']['img_size'])
    (logits,) = onnx_session(path).run(None, {'images': x.numpy()})
    official = np.array(meta['logits'])
    assert np.abs(logits - official).max() / np.abs(official).max() < 1e-4


def test_datpp_onnx_equals_pytorch_through_every_neighborhood_path(tmp_path):
    """A narrow DAT++ at 64x96: stage 1's neighborhood attention gathers (16x24 tokens), stage 2's is
    dense (8x12), stage 3's pads its 4x6 map to the 7x7 window; the batch axis stays dynamic."""
    torch.manual_seed(0)
    model = timm.create_model('datpp_tiny', embed_dims=(16, 32, 64, 128), stage_spec=('ND', 'ND', 'DN', 'D'),
                              num_heads=(1, 2, 4, 8), groups=(1, 1, 2, 4), num_classes=10).eval()
    path = tmp_path / 'datpp.onnx'
    report = export.export_onnx(model, str(path), size=(64, 96))
    assert report.written and report.passed and input_dims(path) == ['batch', 3, 64, 96]
    session = onnx_session(path)
    for batch in (1, 3):
        assert max_diff_onnx(session, model, torch.randn(batch, 3, 64, 96)) < TOLERANCE
