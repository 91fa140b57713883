"""The official weights of the released models: where they come from, and a download that never leaves half a file.

A released model's timm ``pretrained_cfg`` names the official file: ``url`` is its direct download,
``origin_url`` the page it is published on and ``description`` its ImageNet-1k top-1. With
``timm.create_model(name, pretrained=True)`` the file is downloaded once into timm's cache
(:func:`cache_folder`: ``$TORCH_HOME/hub/checkpoints``, or the ``cache_dir`` argument) and read from
there afterwards; :func:`official_weights` is that step alone.

Nothing of a failed download stays behind: the file is written under a temporary name beside its
place and renamed only once it has arrived complete (as many bytes as the server announced, not a
web page), and a cached file that later fails to load is removed with the error
(:func:`discard_on_failure`), so that the next call downloads it again. Offline (no network, or
``HF_HUB_OFFLINE=1`` as for the Hugging Face hub) the error names the URL, the path to put the file
at and the ``pretrained_cfg_overlay=dict(file=...)`` alternative.
"""
import contextlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Iterator, Optional, Set

import timm
import torch
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg
from tqdm import tqdm

from .checkpoint import UnsafeCheckpointError, write_atomically
from .errors import UsageError

__all__ = ['OFFICIAL', 'WeightsDownloadError', 'cache_folder', 'cached_weights_path', 'discard_on_failure',
           'download_weights', 'names_official', 'official_weights', 'released_models', 'resolve_weights_spec']

_logger = logging.getLogger(__name__)

OFFICIAL = 'official'  # the word that names a model's official weights wherever a weights file is taken
_WEIGHT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0  # per connection attempt and per read; a stalled server fails rather than hangs

# the cache files this process has handed out, which a failure to load removes
_CACHED: Set[str] = set()


class WeightsDownloadError(OSError):
    """The official weights could not be downloaded; the message says what to do instead."""


def cache_folder(cache_dir: Optional[str] = None) -> str:
    """Where downloaded weights live: ``cache_dir`` when given, else timm's (and torchvision's) checkpoint cache,
    ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``; ``~/.cache/torch/...`` by default)."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def _cfg_dict(cfg) -> Dict:
    return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)


def cached_weights_path(cfg, cache_dir: Optional[str] = None) -> str:
    """The cache path of the file a pretrained cfg's ``url`` names.

    A URL that ends in a weights file name keeps that name (as in timm); a share link without one
    (``https://host/f/ID/?dl=1``) is cached as ``<model>.<tag>-<ID>.pth``, so that two sources of one
    model never share a file.
    """
    cfg = _cfg_dict(cfg)
    path = urllib.parse.urlparse(cfg['url']).path
    name = os.path.basename(path)
    if not name.endswith(_WEIGHT_SUFFIXES):
        segment = re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(path.rstrip('/'))) or 'weights'
        model = '.'.join(part for part in (cfg.get('architecture'), cfg.get('tag')) if part) or 'model'
        name = f'{model}-{segment}.pth'
    return os.path.join(cache_folder(cache_dir), name)


def _offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '0').strip().lower() not in ('', '0', 'false', 'no')


def _instructions(name: str, url: str, path: str) -> str:
    return (f'Download {url} yourself and put it at {path} (the next call reads it from there), or load a copy '
            f"you have with timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) "
            f'(command line: --checkpoint PATH / --pretrained PATH).')


class _Incomplete(Exception):
    """A response that is not the whole weights file."""


def _fetch(url: str, tmp: str, progress: bool, label: str) -> None:
    request = urllib.request.Request(url, headers={'User-Agent': 'deformvit (python-urllib)'})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        kind = response.headers.get('Content-Type', '')
        if kind.startswith('text/html'):
            raise _Incomplete('the server sent a web page, not a weights file (a login or error page?)')
        length = response.headers.get('Content-Length')
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with open(tmp, 'wb') as f, tqdm(total=expected, unit='B', unit_scale=True, unit_divisor=1024, desc=label,
                                        disable=not progress, leave=False) as bar:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise _Incomplete(f'the download stopped after {received:,} of {expected:,} bytes')
    if received == 0:
        raise _Incomplete('the server sent an empty file')


def download_weights(url: str, path: str, name: str = 'MODEL', progress: bool = True) -> str:
    """Download ``url`` to ``path`` through a temporary file in the same folder, renamed once complete.

    Args:
        url: the file's direct download (http, https or file).
        path: where the file goes; its folder is created.
        name: the model, named in the error's instructions.
        progress: show a progress bar (on stderr).

    Returns:
        ``path``.

    Raises:
        WeightsDownloadError: offline (``HF_HUB_OFFLINE``), no connection, an HTTP error, a web page
            instead of a file, or fewer bytes than announced; no file is left at ``path`` or beside it.
    """
    path = os.fspath(path)
    if _offline():
        raise WeightsDownloadError(f'{name}: the official weights are not in the cache ({path}) and HF_HUB_OFFLINE '
                                   f'forbids downloads. ' + _instructions(name, url, path))
    _logger.info('downloading %s to %s', url, path)
    try:
        write_atomically(path, lambda tmp: _fetch(url, tmp, progress, os.path.basename(path)))
    except urllib.error.HTTPError as err:
        reason = f'the server answered {err.code} {err.reason}'
    except urllib.error.URLError as err:
        reason = f'no connection ({getattr(err, "reason", err)})'
    except (_Incomplete, http.client.HTTPException, OSError) as err:
        reason = str(err) or type(err).__name__
    else:
        return path
    raise WeightsDownloadError(f'{name}: could not download the official weights from {url}: {reason}; nothing was '
                               f'kept. ' + _instructions(name, url, path))


def released_models() -> list:
    """The registered deformvit models whose pretrained cfg names official weights."""
    cfgs = {name: get_pretrained_cfg(name) for name in timm.list_models(['dat_*', 'datpp_*', 'eapt_*'])}
    return sorted(name for name, cfg in cfgs.items() if cfg is not None and cfg.url)


def official_weights(name: str, cache_dir: Optional[str] = None, progress: bool = True,
                     pretrained_cfg=None) -> str:
    """The path of model ``name``'s official weights in the cache, downloaded first if they are not there.

    Args:
        name: a registered model (``dat_tiny``, ``datpp_small.in1k``).
        cache_dir: the cache folder (default: :func:`cache_folder`).
        progress: show a progress bar while downloading.
        pretrained_cfg: the cfg to read the source from (default: ``name``'s registered one), as
            ``timm.create_model``'s ``pretrained_cfg`` / overlay resolve it.

    Raises:
        UsageError: ``name`` has no official weights.
        WeightsDownloadError: the download failed (see :func:`download_weights`).
    """
    cfg = _cfg_dict(pretrained_cfg if pretrained_cfg is not None else resolve_pretrained_cfg(name))
    model = cfg.get('architecture') or name
    if not cfg.get('url'):
        released = ', '.join(released_models())
        raise UsageError(f'{model} has no official weights to download (models with official weights: {released}); '
                         f"pass a weights file: timm.create_model('{model}', pretrained=True, "
                         'pretrained_cfg_overlay=dict(file=PATH)), or --checkpoint PATH / --pretrained PATH')
    path = cached_weights_path(cfg, cache_dir)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        download_weights(cfg['url'], path, model, progress)
    _CACHED.add(os.path.abspath(path))
    return path


@contextlib.contextmanager
def discard_on_failure(path: str) -> Iterator[None]:
    """Remove ``path`` when reading it inside the block fails, if it is a cache file :func:`official_weights` handed
    out: the error (a ValueError, or a RuntimeError of weights that do not fit) is raised as a ValueError that says
    so, and the next call downloads the file again. Other files are never touched, and neither is a complete file
    that holds pickled objects (:class:`~deformvit.checkpoint.UnsafeCheckpointError`): downloading it again would
    not change it, and its error says how to convert it if you trust it."""
    try:
        yield
    except UnsafeCheckpointError:
        raise
    except (ValueError, RuntimeError) as err:
        full = os.path.abspath(os.fspath(path))
        if full not in _CACHED or not os.path.isfile(full):
            raise
        os.remove(full)
        _CACHED.discard(full)
        message = str(err).rstrip()
        stop = '' if message.endswith('.') else '.'
        raise ValueError(f'{message}{stop} The cached file {full} was removed; the next call downloads it '
                         'again.') from err


def names_official(spec: Optional[str]) -> bool:
    """Whether a weights argument asks for official weights (:data:`OFFICIAL` or a registered model's name that is
    no file), not for a file."""
    if not spec or not isinstance(spec, str):
        return False
    return spec == OFFICIAL or (timm.is_model(spec) and not os.path.exists(spec))


def resolve_weights_spec(spec: Optional[str], model: str) -> Optional[str]:
    """What a command's weights argument asks for: None, :data:`OFFICIAL` (``model``'s official weights), or a path.

    ``'official'`` and the name of ``model`` itself both mean its official weights (for timm's own models,
    those ``pretrained=True`` loads); another registered model's name is refused (its weights would not fit
    ``model``); anything else is a path, returned as given.

    Raises:
        UsageError: another model's name, or ``official`` for a model without official weights.
    """
    if not spec:
        return None
    if not isinstance(spec, (str, os.PathLike)):
        raise UsageError(f"weights must be '{OFFICIAL}', a model's name or a file path, got {spec!r}")
    spec = os.fspath(spec)
    if not names_official(spec) and spec != model:
        return spec
    cfg = resolve_pretrained_cfg(model).to_dict()
    has_source = cfg.get('url') or cfg.get('hf_hub_id')  # timm's own models come from the Hugging Face hub
    if spec == OFFICIAL or spec == model:
        if not has_source:
            official_weights(model)  # raises the UsageError that lists the models with official weights
        return OFFICIAL
    official = f", or '{OFFICIAL}' for the official {model} weights" if has_source else ''
    raise UsageError(f'{spec} is another model than {model}; its weights do not fit it: pass a {model} weights '
                     f'file{official}')
