"""Atomic writes: a file appears whole, with a normal file's mode, or not at all."""
import os
from pathlib import Path

import pytest
import torch

from deformvit.checkpoint import load_state_dict_file, save_safetensors, write_atomically


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_saved_weights_get_a_normal_files_mode_and_load_back(tmp_path):
    path = tmp_path / 'weights.safetensors'
    save_safetensors({'w': torch.arange(4.)}, str(path))
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not the temporary file's 0600
    assert torch.equal(load_state_dict_file(str(path))['w'], torch.arange(4.))
    assert os.listdir(tmp_path) == ['weights.safetensors']


def test_a_failed_or_refused_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / 'table.md'
    path.write_text('old')

    def fail(tmp):
        Path(tmp).write_text('half')
        raise OSError('disk full')

    with pytest.raises(OSError, match='disk full'):
        write_atomically(str(path), fail)
    def refuse(tmp):  # written, then refused by a check
        Path(tmp).write_text('unchecked')
        return False

    assert not write_atomically(str(path), refuse)
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['table.md']
    assert write_atomically(str(path), lambda tmp: Path(tmp).write_text('new'))
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['table.md']
