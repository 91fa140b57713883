import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch

import deformvit  # noqa: F401  (registers the models with timm)

FIXTURES = Path(__file__).parent / 'fixtures'


@pytest.fixture(autouse=True, scope='session')
def _no_downloads(tmp_path_factory):
    """No test reaches the internet or the user's cache: a download of official weights fails at once
    (tests/test_hub.py lifts this for its loopback server) and the cache is a temporary folder."""
    saved = {k: os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'TORCH_HOME')}
    os.environ.update(HF_HUB_OFFLINE='1', TORCH_HOME=str(tmp_path_factory.mktemp('torch_home')))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


def _write_bomb_png(path: Path) -> Path:
    """A 100-byte PNG whose header claims 60000x60000 RGB pixels: Pillow refuses it as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', 60000, 60000, 8, 2, 0, 0, 0)  # width, height, 8-bit RGB
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
                     + chunk(b'IEND', b''))
    return path


@pytest.fixture(scope='session')
def bomb_png() -> Callable[[Path], Path]:
    """``bomb_png(path)`` writes a decompression bomb's header as a PNG file at ``path`` and returns ``path``."""
    return _write_bomb_png


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', help='also run tests marked slow')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'):
        return
    skip = pytest.mark.skip(reason='slow: run with --runslow (make test-all)')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def small_task_losses():
    """Train a 2-class model for 15 AdamW steps on 8 fixed 64x64 images; returns the losses."""
    def train(model: torch.nn.Module) -> list:
        torch.manual_seed(0)
        x = torch.randn(8, 3, 64, 64)
        y = (x[:, 0].mean((1, 2)) > 0).long()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(15):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
    return train


@pytest.fixture
def refused_before_work(tmp_path, capsys):
    """``refused(argv, message)``: ``deformvit <argv> --output RUN`` exits with status 2 and one line on stderr
    that names the command and holds ``message``, and RUN is not created."""
    def refused(argv: list, message: str) -> None:
        from deformvit.cli import main
        with pytest.raises(SystemExit) as stopped:
            main([*argv, '--output', str(tmp_path / 'run')])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f'deformvit {" ".join(argv[:2])}:') and message in error and '\n' not in error
        assert not (tmp_path / 'run').exists()
    return refused


@pytest.fixture
def two_process_detection():
    """``train(coco_root, out, detector, *settings)``: one epoch of ``deformvit detect train`` on dat_nano at 128x128
    under ``torchrun --nproc_per_node=2`` on the CPU; asserts that it succeeds as a world of two processes."""
    def train(coco_root: str, out: Path, detector: str, *settings: str) -> None:
        result = subprocess.run(
            [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'deformvit',
             'detect', 'train', '--data', coco_root, '--output', str(out), '--detector', detector,
             '--backbone', 'dat_nano', '--epochs', '1', '--workers', '0', '--batch-size', '2', '--device', 'cpu',
             '--set', 'min_size=128', '--set', 'max_size=128', '--set', 'fpn_channels=32',
             '--set', 'warmup_updates=0', '--set', 'eval_batch_size=2', *settings],
            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
        assert result.returncode == 0, result.stderr[-3000:]
        assert 'world_size: 2' in (out / 'config.yaml').read_text()
    return train
