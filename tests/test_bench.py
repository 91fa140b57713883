"""``deformvit bench``: round-robin timing, the allocation tracker, DAT Table 8 memory, CLI output."""
import argparse
import copy
import csv
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deformvit import count_macs, count_parameters
from deformvit.cli import bench as bench_cli
from deformvit.cli import main
from deformvit.runtime import autocast_dtype, resolve_device
from deformvit.tasks import create_model
from deformvit.tools import bench, memory

FLOAT = 4  # bytes


@pytest.fixture(scope='module')
def nano_rows():
    """dat_nano and eapt_nano side by side, both modes, at 64x64, batch 2, 1 warm-up, 2 repeats."""
    torch.manual_seed(0)
    return bench.benchmark(['dat_nano', 'eapt_nano'], batch=2, size=64, device='cpu', modes=('infer', 'train'),
                           warmup=1, repeats=2, threads=1, reference='eapt_nano')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser


# --- the allocation tracker against hand-counted bytes -------------------------------------------

def test_tracker_counts_a_chain_of_ops_by_hand():
    x = torch.randn(1000)  # 4000 bytes, the baseline
    with memory.MemoryTracker([x]) as tracker:
        a = x * 2                      # +4000
        b = a.exp()                    # +4000 -> 12000, the peak
        del a                          # -4000
        view = b.view(10, 100)         # a view allocates nothing
        view.add_(1)                   # nor does an in-place op
        total = b.sum()                # +4
        assert tracker.current_bytes == 4000 + 4000 + FLOAT
        del b, view                    # the storage dies with its last view
        assert tracker.current_bytes == 4000 + FLOAT
        y = x
        for _ in range(5):             # each step holds the old and the new tensor at once:
            y = torch.sin(y)           # x, total, old y, new y -> 12004, the peak
        assert tracker.current_bytes == 4000 + FLOAT + 4000
    assert tracker.baseline_bytes == 4000
    assert tracker.peak_bytes == 3 * 4000 + FLOAT
    assert total.numel() == 1


@pytest.mark.parametrize('grad', [False, True])
def test_tracker_sees_what_autograd_keeps(grad):
    x = torch.randn(1000, requires_grad=grad)
    with memory.MemoryTracker([x]) as tracker:
        a = x.exp()
        b = a.exp()   # exp saves its result for the backward pass, so with grad ``a`` survives ``del``
        del a
        live = tracker.current_bytes
    assert live == 4000 + (8000 if grad else 4000)
    assert tracker.peak_bytes == 12000
    assert (b.grad_fn is not None) == grad


@pytest.mark.parametrize('device', ['cpu', 'meta'])
def test_attention_keeps_output_and_logsumexp_only_on_cpu_and_meta(device):
    """Fused CPU attention keeps the output and the log-sum-exp; meta is routed to the same kernel,
    while meta's own choice (the math path) materialises the (B, heads, N, N) attention matrix."""
    b, heads, n, d = 2, 3, 49, 32
    q = torch.randn(b, heads, n, d, device=device)
    mask = torch.randn(1, heads, n, n, device=device)
    with memory.MemoryTracker([q, mask]) as tracker:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert tracker.peak_bytes - tracker.baseline_bytes == (b * heads * n * d + b * heads * n) * FLOAT
    if device == 'meta':
        with memory.MemoryTracker([q, mask], emulate_cpu=False) as math_path:
            F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        assert math_path.peak_bytes - math_path.baseline_bytes >= 2 * b * heads * n * n * FLOAT


@pytest.mark.parametrize('name', ['dat_nano', 'eapt_nano'])
def test_meta_tracking_equals_cpu_tracking(name):
    model = create_model(name)
    peaks = {}
    for device in ('cpu', 'meta'):
        model = model.to(device)
        with_grad = memory.peak_forward_memory(model.train(), (2, 3, 64, 64), device, grad=True)
        without = memory.peak_forward_memory(model.eval(), (2, 3, 64, 64), device, grad=False)
        assert with_grad > without > count_parameters(model) * FLOAT
        peaks[device] = (with_grad, without)
    assert peaks['meta'] == peaks['cpu']


def test_meta_training_step_memory_equals_cpu(nano_rows):
    cpu = next(r for r in nano_rows if (r['model'], r['mode']) == ('dat_nano', 'train'))
    meta = bench.benchmark(['dat_nano'], batch=2, size=64, device='meta', modes=('train',))[0]
    assert meta['peak_memory_mib'] == cpu['peak_memory_mib']
    assert meta['images_per_s'] is None and meta['latency_ms'] is None


# --- benchmark rows ------------------------------------------------------------------------------

def test_rows_have_every_column_with_sane_values(nano_rows):
    assert [(r['model'], r['mode']) for r in nano_rows] == [
        ('dat_nano', 'infer'), ('eapt_nano', 'infer'), ('dat_nano', 'train'), ('eapt_nano', 'train')]
    for row in nano_rows:
        assert set(bench.CSV_COLUMNS) <= set(row)
        assert row['images_per_s'] > 0
        assert row['images_per_s'] == pytest.approx(row['batch'] / (row['latency_ms'] / 1e3))
        assert row['latency_p90_ms'] >= row['latency_ms'] > 0
        assert (row['device'], row['batch'], row['size'], row['threads'], row['precision']) == ('cpu', 2, 64, 1, 'fp32')
        assert row['torch'] == torch.__version__ and row['compile'] is False and row['compile_s'] is None
    by_key = {(r['model'], r['mode']): r for r in nano_rows}
    for name in ('dat_nano', 'eapt_nano'):
        model = create_model(name, 64)
        assert by_key[name, 'infer']['params_m'] == count_parameters(model) / 1e6
        assert by_key[name, 'infer']['gmacs'] == count_macs(model, (3, 64, 64)) / 1e9
        weights = count_parameters(model) * FLOAT
        # inference holds the weights and activations; training also gradients and two AdamW moments
        assert weights < by_key[name, 'infer']['peak_memory_mib'] * 2 ** 20
        assert 4 * weights < by_key[name, 'train']['peak_memory_mib'] * 2 ** 20
    for mode in ('infer', 'train'):
        dat, eapt = by_key['dat_nano', mode], by_key['eapt_nano', mode]
        assert eapt['speed_vs_ref'] == 1.0 and eapt['memory_vs_ref'] == 1.0
        assert dat['speed_vs_ref'] == pytest.approx(dat['images_per_s'] / eapt['images_per_s'])
        assert dat['memory_vs_ref'] == pytest.approx(dat['peak_memory_mib'] / eapt['peak_memory_mib'])


class _Sleeper(nn.Module):
    """Takes ``seconds`` per forward and logs its calls at the benchmark's batch size."""

    def __init__(self, seconds: float, label: str, calls: list):
        super().__init__()
        self.seconds, self.label, self.calls = seconds, label, calls
        self.num_classes = 3
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.shape[0] == 4:
            self.calls.append(self.label)
            time.sleep(self.seconds)
        return self.fc(x.mean((2, 3)))


def test_models_run_in_rotating_interleaved_rounds_and_latency_is_the_median():
    calls, threads = [], torch.get_num_threads()
    models = {'fast': _Sleeper(0.02, 'fast', calls), 'slow': _Sleeper(0.04, 'slow', calls)}
    rows = bench.benchmark(models, batch=4, size=8, device='cpu', warmup=1, repeats=3, threads=1, reference='fast',
                           memory=False)
    assert calls == ['fast', 'slow', 'slow', 'fast', 'fast', 'slow', 'slow', 'fast']
    fast, slow = rows
    assert 20 <= fast['latency_ms'] < 500 and 40 <= slow['latency_ms'] < 500
    assert 0.2 < slow['speed_vs_ref'] < 0.75
    assert fast['peak_memory_mib'] is None
    assert fast['threads'] == 1 and torch.get_num_threads() == threads  # restored


def test_autocast_precisions_run_and_are_recorded():
    """bf16 inference and fp16 training (through a GradScaler) under CPU autocast, on a small convnet."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    before = model[0].weight.detach().clone()
    rows = bench.benchmark({'convnet': model}, batch=2, size=16, device='cpu', precisions=('bf16', 'fp16'),
                           modes=('infer', 'train'), warmup=1, repeats=2, threads=1)
    assert [(r['mode'], r['precision']) for r in rows] == [
        ('infer', 'bf16'), ('infer', 'fp16'), ('train', 'bf16'), ('train', 'fp16')]
    assert all(r['images_per_s'] > 0 and r['peak_memory_mib'] > 0 for r in rows)
    assert not torch.equal(model[0].weight, before)


def test_train_mode_updates_parameters_in_train_mode():
    model = create_model('dat_nano')
    before = copy.deepcopy(model.state_dict())
    bench.benchmark({'nano': model}, batch=2, size=64, device='cpu', modes=('train',), warmup=1, repeats=1,
                    threads=1, memory=False)
    assert model.training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert 'head.fc.weight' in changed and 'stem.conv.weight' in changed


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize('argv, message', [
    (['--device', 'meta', '--precision', 'bf16'], 'bf16 runs under torch.autocast, which is not available on device'),
    (['--device', 'meta', '--compile'], '--compile needs real tensors'),
    (['--models', 'dat_tinny'], "unknown model 'dat_tinny'"),
    (['--ratio-to', 'convnext_tiny', '--references', 'none'], "ratio reference 'convnext_tiny' is not among"),
    (['--device', 'tpu'], "unknown device 'tpu'"),
    (['--repeats', '0'], 'argument --repeats: expected a positive integer, got 0'),
    (['--table8', '--compile'], '--table8 measures memory, at one --precision, without --compile'),
])
def test_cli_bad_input_exits_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit, match='^deformvit bench: ') as err:
        main(['bench', '--models', 'dat_nano', '--size', '64', '--batch', '1', *argv])
    assert message in str(err.value)
    if 'tinny' in message:
        assert 'did you mean dat_tiny' in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message given without a GPU')
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match='no GPU is visible'):
        resolve_device('cuda')
    with pytest.raises(SystemExit, match='deformvit bench: device cuda was asked for'):
        main(['bench', '--device', 'cuda', '--table8'])


def test_bf16_on_a_gpu_without_bfloat16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla V100-SXM2-32GB')
    with pytest.raises(ValueError, match='bf16 is not supported by Tesla V100'):
        autocast_dtype('bf16', torch.device('cuda'))
    assert autocast_dtype('fp16', torch.device('cuda')) is torch.float16
    assert autocast_dtype('bf16', torch.device('cpu')) is torch.bfloat16
    with pytest.raises(ValueError, match='unknown precision'):
        autocast_dtype('int8', torch.device('cpu'))


def test_memory_of_a_model_on_another_device_is_refused():
    with pytest.raises(ValueError, match="model is on cpu, the input on meta"):
        memory.peak_forward_memory(create_model('dat_nano'), (1, 3, 32, 32), 'meta')
    with pytest.raises(ValueError, match='allocator method reads CUDA'):
        memory.measure_peak_memory(lambda: None, [], torch.device('cpu'), method='allocator')


# --- output files --------------------------------------------------------------------------------

def test_cli_prints_and_writes_csv_and_markdown(tmp_path, capsys):
    csv_path, md_path = tmp_path / 'bench.csv', tmp_path / 'bench.md'
    args = _parser().parse_args([
        '--models', 'dat_nano', '--references', 'eapt_nano', '--ratio-to', 'eapt_nano', '--size', '64', '--batch', '2',
        '--threads', '1', '--warmup', '1', '--repeats', '2', '--csv', str(csv_path), '--markdown', str(md_path)])
    rows = bench_cli.run(args)
    printed = capsys.readouterr().out
    with open(csv_path, newline='') as f:
        table = list(csv.DictReader(f))
    assert [r['model'] for r in table] == ['dat_nano', 'eapt_nano']
    assert tuple(table[0]) == bench.CSV_COLUMNS
    for line, row in zip(table, rows):
        assert float(line['images_per_s']) == pytest.approx(row['images_per_s'])
        assert float(line['peak_memory_mib']) == pytest.approx(row['peak_memory_mib'])
        assert (line['device'], line['threads'], line['batch'], line['size']) == ('cpu', '1', '2', '64')
    assert md_path.read_text() == printed
    lines = printed.splitlines()
    assert lines[0].startswith('device cpu (') and 'threads 1, batch 2, 64x64' in lines[0]
    assert lines[0].endswith('ratios to eapt_nano')
    body = [line for line in lines if line.startswith('| ')]
    assert len(body) == 2 + 2 and len({line.count('|') for line in body}) == 1
    cells = [c.strip() for c in body[2].split('|')[1:-1]]
    assert cells[:3] == ['dat_nano', 'infer', 'fp32']
    assert float(cells[5]) == pytest.approx(rows[0]['images_per_s'], abs=0.01)


# --- DAT Table 8 ---------------------------------------------------------------------------------

def test_table8_orders_ddetr_with_many_keys_above_dat(tmp_path, capsys):
    spec = dict(stage_spec=('LS', 'LS', 'LM', 'LM'))
    rows = (
        ('D-DETR 16 keys', 'dat_nano', dict(spec, ddetr_points=16), 10.0),
        ('D-DETR 196 keys', 'dat_nano', dict(spec, ddetr_points=(16, 16, 196, 49)), 30.0),
        ('DAT', 'dat_nano', {}, 12.0),
    )
    results = bench.table8_memory(rows, batch=1, size=64, device='meta')
    by_label = {r['label']: r for r in results}
    few, many, dat = by_label['D-DETR 16 keys'], by_label['D-DETR 196 keys'], by_label['DAT']
    assert many['peak_gib'] > few['peak_gib'] and many['peak_gib'] > dat['peak_gib']
    assert many['peak_no_grad_gib'] > dat['peak_no_grad_gib']
    assert all(r['peak_gib'] > r['peak_no_grad_gib'] for r in results)
    assert dat['ratio'] == 1.0 and many['ratio'] == pytest.approx(many['peak_gib'] / dat['peak_gib'])
    assert many['paper_ratio'] == pytest.approx(30.0 / 12.0)
    assert many['params_m'] > few['params_m']
    # the same row measured on CPU gives the same bytes
    cpu = bench.table8_memory(rows[1:2], batch=1, size=64, device='cpu')[0]
    assert (cpu['peak_gib'], cpu['peak_no_grad_gib']) == (many['peak_gib'], many['peak_no_grad_gib'])
    with pytest.raises(ValueError, match="reference row 'Swin' is not among"):
        bench.table8_memory(rows, batch=1, size=64, reference='Swin')
    table = bench.format_table8_markdown(results)
    assert 'ratios to DAT' in table and '| D-DETR 196 keys |' in table and '2.50x' in table


def test_table8_rows_are_the_papers():
    assert [(label, paper) for label, _, _, paper in bench.DAT_TABLE8_ROWS] == [
        ('D-DETR, 16 / 16 keys', 13.9), ('D-DETR, 49 / 49 keys', 18.8), ('D-DETR, 196 / 49 keys', 37.9),
        ('DAT, 49 / 49 keys', 12.5), ('DAT, 196 / 49 keys (DAT-T)', 14.4)]
    assert bench.DAT_TABLE8_ROWS[2][2]['ddetr_points'] == (16, 16, 196, 49)
    assert bench.DAT_TABLE8_ROWS[3][2] == dict(offset_stride=(4, 2, 2, 1))


# --- detectors (EAPT Table IV's FPS) ---------------------------------------------------------------

TINY_DETECTOR = dict(min_size=64, max_size=64, fpn_channels=16, representation_size=32)


def test_detection_rows_time_each_backbone_and_divide_by_the_first(monkeypatch):
    monkeypatch.setitem(bench.EAPT_TABLE_IV, ('retinanet', 'dat_nano'), dict(fps=20.0))
    monkeypatch.setitem(bench.EAPT_TABLE_IV, ('retinanet', 'resnet18'), dict(fps=15.0))
    calls = []
    real = bench.build_detector

    def counted(name, backbone, num_classes, **kwargs):
        model = real(name, backbone, num_classes, **kwargs)
        forward = model.forward

        def logged(images, targets=None):
            calls.append((backbone, len(images), model.training, torch.is_inference_mode_enabled()))
            return forward(images, targets)
        model.forward = logged
        return model
    monkeypatch.setattr(bench, 'build_detector', counted)
    rows = bench.detection_benchmark(['retinanet'], ['dat_nano', 'resnet18'], (48, 80), batch=2, device='cpu',
                                     warmup=1, repeats=2, threads=1, **TINY_DETECTOR)
    assert [(r['detector'], r['backbone']) for r in rows] == [('retinanet', 'dat_nano'), ('retinanet', 'resnet18')]
    # one warm-up and two timed rounds of each, a batch of two images, in inference mode
    assert sorted(calls) == sorted([('dat_nano', 2, False, True)] * 3 + [('resnet18', 2, False, True)] * 3)
    first, second = rows
    assert first['speed_vs_first'] == 1.0
    assert second['speed_vs_first'] == pytest.approx(second['images_per_s'] / first['images_per_s'])
    assert second['images_per_s'] == pytest.approx(2 / (second['latency_ms'] / 1e3))
    assert (first['paper_fps'], second['paper_vs_first']) == (20.0, 0.75)
    assert first['params_m'] == pytest.approx(count_parameters(real('retinanet', 'dat_nano', 80, **TINY_DETECTOR))
                                              / 1e6)
    table = bench.format_detection_markdown(rows)
    assert '| retinanet | resnet18 |' in table and '0.75x' in table


def test_detection_rows_without_a_paper_row_leave_the_paper_columns_empty():
    rows = bench.detection_benchmark(['faster_rcnn'], ['dat_nano'], (40, 40), device='cpu', warmup=0, repeats=1,
                                     threads=1, **TINY_DETECTOR)
    assert rows[0]['paper_fps'] is None and rows[0]['paper_vs_first'] is None
    assert '| faster_rcnn | dat_nano |' in bench.format_detection_markdown(rows)


@pytest.mark.parametrize('kwargs, message', [
    (dict(detectors=['yolo']), "unknown detectors ['yolo']"),
    (dict(detectors=[]), 'unknown detectors []'),
    (dict(backbones=[]), 'no backbones'),
    (dict(batch=0), 'batch, repeats and the image sides must be >= 1'),
    (dict(image_size=(0, 64)), 'batch, repeats and the image sides must be >= 1'),
    (dict(device='meta'), 'the meta device measures memory only'),
])
def test_bad_detection_benchmarks_are_refused(kwargs, message):
    arguments = dict(dict(detectors=['retinanet'], backbones=['dat_nano'], device='cpu'), **kwargs)
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
        bench.detection_benchmark(**arguments)


@pytest.mark.parametrize('argv, message', [
    (['--mode', 'train'], '--detectors times inference at one --precision'),
    (['--table8'], '--detectors times inference'),
    (['--image-size', '0', '64'], 'argument --image-size: expected a positive integer, got 0'),
])
def test_cli_detection_bad_input_exits_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit, match='^deformvit bench: ') as err:
        main(['bench', '--detectors', 'retinanet', '--backbones', 'dat_nano', *argv])
    assert message in str(err.value)


def test_cli_detection_mode_prints_and_writes_csv(tmp_path, capsys):
    path = tmp_path / 'detectors.csv'
    args = _parser().parse_args(['--detectors', 'retinanet', '--backbones', 'dat_nano', '--image-size', '40', '56',
                                 '--repeats', '1', '--warmup', '0', '--threads', '1', '--csv', str(path)])
    rows = bench_cli.run(args)
    assert rows[0]['batch'] == 1 and (rows[0]['height'], rows[0]['width']) == (40, 56)
    assert 'batch 1 of 56x40' in capsys.readouterr().out
    with open(path, newline='') as f:
        assert [r['backbone'] for r in csv.DictReader(f)] == ['dat_nano']


def test_gpu_check_script_parts_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh is run where a GPU is lent; its Python parts are checked here on the CPU."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_check.py'
    subprocess.run(['bash', '-n', str(script.with_suffix('.sh'))], check=True)
    run = dict(check=True, capture_output=True, text=True, timeout=300)
    subprocess.run([sys.executable, str(script), 'parity', '--out', str(tmp_path), '--device', 'cpu', '--models',
                    'dat_nano', 'eapt_nano', '--size', '32'], **run)
    rows = [line for line in (tmp_path / 'parity.md').read_text().splitlines() if line.startswith('| dat_nano')
            or line.startswith('| eapt_nano')]
    assert len(rows) == 4  # fp32 and bf16 of each model; on the CPU itself both agree to the bit in fp32
    assert rows[0].split('|')[3].strip() == '0'
    subprocess.run([sys.executable, str(script), 'profile', '--out', str(tmp_path), '--device', 'cpu', '--model',
                    'dat_nano', '--batch', '2', '--size', '32', '--warmup', '1', '--steps', '1',
                    '--precision', 'fp32'], **run)
    table = (tmp_path / 'profile.md').read_text()
    shares = [float(line.split('|')[2].strip(' %')) for line in table.splitlines() if line.startswith('| `')]
    assert shares and 0 < sum(shares) <= 100.5 and 'grid_sampler' in table
