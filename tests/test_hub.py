"""``pretrained=True``: the official weights, downloaded once into timm's cache, from a loopback server.

No test reaches the internet: each serves release-format files from an HTTP server on 127.0.0.1 that
it starts and stops, and points a pretrained cfg's URL at it (``pretrained_cfg_overlay=dict(url=...)``,
or the registered cfg itself for the command-line paths).
"""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
from timm.models._registry import _model_pretrained_cfgs

from deformvit import UnsafeCheckpointError, hub
from deformvit.cli import CommandFailed, main
from deformvit.errors import UsageError
from deformvit.hub import OFFICIAL, WeightsDownloadError
from deformvit.models.dat import check_release_layout
from deformvit.tasks import create_model, get_task, load_model
from deformvit.tasks.necks import create_backbone
from deformvit.training import check_config
from deformvit.training.config import defaults

FIXTURES = Path(__file__).parent / 'fixtures'
MINI = json.loads((FIXTURES / 'dat_official_mini.json').read_text())['deformvit_kwargs']
RELEASED = ('dat_tiny', 'dat_small', 'dat_base', 'dat_base_384', 'datpp_tiny', 'datpp_small', 'datpp_base',
            'datpp_base_384')


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (status, content type, body, bytes sent)``; records every request."""

    def do_GET(self):
        self.server.requests.append(self.path)
        status, kind, body, sent = self.server.routes.get(self.path, (404, 'text/plain', b'not found', None))
        self.send_response(status)
        self.send_header('Content-Type', kind)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body[:sent])  # sent < len(body): the connection closes mid-file

    def log_message(self, *args):
        pass


class Server:
    def __init__(self):
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        self.httpd.routes, self.httpd.requests = {}, []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, status: int = 200, kind: str = 'application/octet-stream',
              sent: int = None) -> str:
        self.httpd.routes[path] = (status, kind, body, sent)
        return f'http://127.0.0.1:{self.httpd.server_address[1]}{path}'

    @property
    def requests(self) -> list:
        return self.httpd.requests

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)  # tests/conftest.py forbids downloads elsewhere
    running = Server()
    yield running
    if running.thread.is_alive():
        running.stop()


def release_bytes() -> bytes:
    return (FIXTURES / 'dat_official_mini.pth').read_bytes()


def mini_dat(url: str, cache: Path, **kwargs) -> torch.nn.Module:
    """``dat_tiny`` at the fixture's widths, with official weights from ``url``."""
    return timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(url=url), cache_dir=str(cache),
                             **dict(MINI, **kwargs))


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_every_released_model_names_its_official_source_and_top1():
    for name in RELEASED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == cfg.origin_url + '?dl=1' and cfg.origin_url.startswith('https://cloud.tsinghua.edu.cn/f/')
        assert 'top-1' in cfg.description
    assert sorted(hub.released_models()) == sorted(RELEASED)
    urls = {timm.models.get_pretrained_cfg(name).url for name in RELEASED}
    assert len(urls) == len(RELEASED)
    path = hub.cached_weights_path(timm.models.get_pretrained_cfg('dat_tiny'))
    assert os.path.basename(path) == 'dat_tiny.in1k-1367349deefc48efa650.pth'


def test_first_call_downloads_once_and_the_second_reads_the_cache(server, tmp_path):
    url = server.serve('/dat_mini_release.pth', release_bytes())
    cache = tmp_path / 'cache'
    model = mini_dat(url, cache).eval()
    path = cache / 'dat_mini_release.pth'
    assert server.requests == ['/dat_mini_release.pth']
    assert path.read_bytes() == release_bytes() and leftovers(cache) == ['dat_mini_release.pth']
    assert model.pretrained_cfg['file'] == str(path)

    from_file = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  **MINI).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), from_file(x), rtol=0, atol=0)

    again = mini_dat(url, cache).eval()
    assert server.requests == ['/dat_mini_release.pth']  # read from the cache, not downloaded again
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_the_default_cache_is_timms_under_torch_home(server, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    url = server.serve('/mini.pth', release_bytes())
    timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(url=url), **MINI)
    assert (tmp_path / 'torch' / 'hub' / 'checkpoints' / 'mini.pth').is_file()


def test_a_share_link_without_a_file_name_is_cached_under_the_models_name(server, tmp_path):
    url = server.serve('/f/0a1b2c/?dl=1', release_bytes())
    mini_dat(url, tmp_path)
    assert leftovers(tmp_path) == ['dat_tiny.in1k-0a1b2c.pth']


@pytest.mark.parametrize('serve, reason', [
    (dict(body=release_bytes(), sent=len(release_bytes()) // 3), 'stopped after'),
    (dict(body=b'gateway on fire', status=500, kind='text/plain'), 'answered 500'),
    (dict(body=b'<html>log in</html>', kind='text/html; charset=utf-8'), 'web page'),
    (dict(body=b''), 'empty file'),
])
def test_a_failed_download_leaves_nothing_and_says_what_to_do(server, tmp_path, serve, reason):
    url = server.serve('/weights.pth', **serve)
    with pytest.raises(WeightsDownloadError, match=reason) as error:
        mini_dat(url, tmp_path)
    message = str(error.value)
    assert url in message and str(tmp_path / 'weights.pth') in message
    assert 'pretrained_cfg_overlay=dict(file=PATH)' in message
    assert leftovers(tmp_path) == []


def test_offline_the_cache_serves_and_a_missing_file_is_explained(server, tmp_path, monkeypatch):
    url = server.serve('/weights.pth', release_bytes())
    server.stop()
    with pytest.raises(WeightsDownloadError, match='no connection') as error:
        mini_dat(url, tmp_path)
    assert str(tmp_path / 'weights.pth') in str(error.value) and leftovers(tmp_path) == []

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(WeightsDownloadError, match='HF_HUB_OFFLINE') as error:
        mini_dat(url, tmp_path)
    assert url in str(error.value) and 'pretrained_cfg_overlay=dict(file=PATH)' in str(error.value)

    (tmp_path / 'weights.pth').write_bytes(release_bytes())  # the file put where the message said
    model = mini_dat(url, tmp_path)
    assert model.num_classes == MINI['num_classes']


def test_a_cached_file_that_fails_to_load_is_removed_and_downloaded_again(server, tmp_path):
    url = server.serve('/weights.pth', release_bytes())
    cached = tmp_path / 'weights.pth'
    cached.write_bytes(release_bytes()[:50_000])  # an interrupted copy
    with pytest.raises(ValueError, match='was removed; the next call downloads it again'):
        mini_dat(url, tmp_path)
    assert not cached.exists() and server.requests == []
    mini_dat(url, tmp_path)
    assert server.requests == ['/weights.pth'] and cached.read_bytes() == release_bytes()


def test_a_file_of_another_release_is_refused_before_loading_and_removed(server, tmp_path):
    url = server.serve('/datpp.pth', (FIXTURES / 'datpp_official_mini.pth').read_bytes())
    refusal = r'holds DAT\+\+ weights, not dat_tiny ones \(DAT \(v1\)\): load them into a DAT\+\+ model'
    with pytest.raises(ValueError, match=refusal):
        mini_dat(url, tmp_path)
    assert leftovers(tmp_path) == []


def test_another_released_size_is_named():
    with torch.device('meta'):
        tiny, small = timm.create_model('dat_tiny'), timm.create_model('dat_small')
        datpp, base, base_384 = timm.create_model('datpp_tiny'), timm.create_model('dat_base'), \
            timm.create_model('dat_base_384')
    with pytest.raises(ValueError, match='holds dat_small weights .*not dat_tiny ones'):
        check_release_layout(tiny, {'model': small.state_dict()}, 'f.pth')
    with pytest.raises(ValueError, match='holds dat_tiny weights .*not datpp_tiny ones'):
        check_release_layout(datpp, tiny.state_dict(), 'f.pth')
    check_release_layout(base_384, base.state_dict(), 'f.pth')  # 224 weights for the 384 model: resized tables
    check_release_layout(tiny, tiny.state_dict(), 'f.pth')


def test_a_model_without_official_weights_says_which_have_them():
    with pytest.raises(UsageError, match='eapt_small has no official weights.*dat_tiny.*datpp_tiny'):
        timm.create_model('eapt_small', pretrained=True)
    with pytest.raises(UsageError, match='pretrained_cfg_overlay=dict\\(file=PATH\\)'):
        load_model('dat_nano', OFFICIAL)


@pytest.fixture
def released_nano(server, monkeypatch, tmp_path):
    """``dat_nano`` given official weights: its registered cfg's URL points at the server."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))

    def release(num_classes: int) -> torch.nn.Module:
        model = create_model('dat_nano', num_classes=num_classes).eval()
        url = server.serve(f'/dat_nano_{num_classes}.pth', _saved({'model': model.state_dict()}, tmp_path))
        monkeypatch.setattr(_model_pretrained_cfgs['dat_nano'], 'url', url)
        return model
    return release


def _saved(obj, folder: Path) -> bytes:
    path = folder / 'release.pth'
    torch.save(obj, path)
    return path.read_bytes()


def test_load_model_official_and_a_models_name_give_its_weights(released_nano):
    reference = released_nano(1000)
    x = torch.randn(2, 3, 32, 32)
    for loaded in (load_model('dat_nano', OFFICIAL), load_model(None, 'dat_nano'), load_model('dat_nano', 'dat_nano')):
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
        assert loaded.weights.startswith('official dat_nano weights') and loaded.classes is None
    with pytest.raises(UsageError, match='would replace its classifier'):
        load_model('dat_nano', OFFICIAL, num_classes=10)
    with pytest.raises(UsageError, match='which model'):
        load_model(None, OFFICIAL)


def test_demo_with_official_imagenet_weights_prints_imagenet_names(released_nano, capsys):
    released_nano(1000)
    main(['demo', '--model', 'dat_nano', '--checkpoint', OFFICIAL])
    out = capsys.readouterr().out
    assert 'weights: official dat_nano weights' in out
    top = out.split('top-5 classes:\n')[1].splitlines()[0].split()
    assert timm.data.ImageNetInfo().index_to_description(int(top[0])).startswith(top[1])


def test_eval_export_and_visualize_take_official(released_nano, tmp_path, capsys):
    released_nano(10)  # the embedded digits' ten classes
    main(['eval', 'dat_nano', '--workers', '0'])
    main(['eval', OFFICIAL, '--model', 'dat_nano', '--workers', '0'])
    lines = [line for line in capsys.readouterr().out.splitlines() if 'top-1' in line]
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith('official dat_nano weights')
    main(['export', 'dat_nano', '--checkpoint', OFFICIAL, '--format', 'exported-program', '--output',
          str(tmp_path / 'nano.pt2')])
    assert 'weights: official dat_nano weights' in capsys.readouterr().out
    main(['visualize', '--model', 'dat_nano', '--checkpoint', OFFICIAL, '--output', str(tmp_path / 'figures'),
          '--figure', 'sampling-points'])
    assert any((tmp_path / 'figures').iterdir())


def test_training_starts_from_the_official_weights(released_nano):
    reference = released_nano(1000)
    task = get_task('classify')
    config = dict(defaults(task), model='dat_nano', pretrained=OFFICIAL, img_size=32)
    check_config(config, task)
    model, _, _ = task.build_model(config, ['a', 'b'])
    own = reference.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith('head.'):
            torch.testing.assert_close(value, own[key], rtol=0, atol=0, msg=key)
    assert model.num_classes == 2

    body = create_backbone('dat_nano', pretrained=OFFICIAL)
    torch.testing.assert_close(body.state_dict()['model.stem.conv.weight'], own['stem.conv.weight'], rtol=0, atol=0)


def test_training_refuses_official_for_a_model_without_them_and_another_models_name():
    task = get_task('classify')
    with pytest.raises(UsageError, match='eapt_nano has no official weights'):
        check_config(dict(defaults(task), model='eapt_nano', pretrained=OFFICIAL), task)
    with pytest.raises(UsageError, match='dat_small is another model than dat_nano'):
        check_config(dict(defaults(task), model='dat_nano', pretrained='dat_small'), task)
    with pytest.raises(CommandFailed):
        main(['train', '--model', 'eapt_nano', '--pretrained', OFFICIAL, '--epochs', '1'])


def test_a_downloaded_file_with_pickled_objects_is_refused_and_kept_for_conversion(server, tmp_path):
    from argparse import Namespace  # any class outside torch's weights_only allowlist
    release = torch.load(FIXTURES / 'dat_official_mini.pth', weights_only=True)
    url = server.serve('/trained.pth', _saved(dict(release, config=Namespace(lr=1e-3)), tmp_path))
    cache = tmp_path / 'cache'
    with pytest.raises(UnsafeCheckpointError, match='--trust-pickle'):
        mini_dat(url, cache)
    assert leftovers(cache) == ['trained.pth']  # complete: downloading it again would not change it


def test_a_tagged_name_reads_its_tags_source(server, tmp_path):
    url = server.serve('/tagged.pth', release_bytes())
    model = timm.create_model('dat_tiny.in1k', pretrained=True, pretrained_cfg_overlay=dict(url=url),
                              cache_dir=str(tmp_path), **MINI)
    assert model.pretrained_cfg['tag'] == 'in1k' and leftovers(tmp_path) == ['tagged.pth']


def test_with_several_processes_one_per_machine_downloads(released_nano, server, monkeypatch, tmp_path):
    from deformvit.runtime import DistributedContext
    from deformvit.training.loop import _fetch_official_weights_once
    released_nano(1000)
    waits = []
    monkeypatch.setattr(torch.distributed, 'barrier', lambda: waits.append(True))
    _fetch_official_weights_once(OFFICIAL, 'dat_nano', DistributedContext(rank=1, world_size=2, local_rank=1))
    assert server.requests == [] and waits == [True]  # waits for local rank 0
    _fetch_official_weights_once(OFFICIAL, 'dat_nano', DistributedContext(rank=0, world_size=2, local_rank=0))
    assert server.requests == ['/dat_nano_1000.pth'] and waits == [True, True]
    _fetch_official_weights_once('weights.pth', 'dat_nano', DistributedContext(rank=0, world_size=2, local_rank=0))
    assert len(waits) == 2  # a file: nothing to fetch


def test_a_zero_byte_file_in_the_cache_is_downloaded_again(server, tmp_path):
    url = server.serve('/weights.pth', release_bytes())
    (tmp_path / 'weights.pth').write_bytes(b'')  # an earlier copy that never got its bytes
    mini_dat(url, tmp_path)
    assert server.requests == ['/weights.pth'] and (tmp_path / 'weights.pth').read_bytes() == release_bytes()
