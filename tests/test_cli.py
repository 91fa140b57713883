"""The command line and the demo job."""
import subprocess
import sys

import pytest
import torch

from deformvit.cli import main


def test_demo_classifies_a_real_photo_and_prints_features_and_points(capsys):
    main(['demo'])
    out = capsys.readouterr().out
    assert 'chelsea' in out and 'top-5 classes' in out
    for shape in ('(1, 96, 56, 56)', '(1, 192, 28, 28)', '(1, 384, 14, 14)', '(1, 768, 7, 7)'):
        assert shape in out
    assert 'deformable block stages.3.blocks.1: 6 offset groups x 7x7' in out


def test_demo_accepts_an_image_file(tmp_path, capsys):
    from PIL import Image
    path = tmp_path / 'photo.png'
    Image.fromarray((torch.rand(90, 130, 3) * 255).byte().numpy()).save(path)
    main(['demo', '--image', str(path)])
    assert '130x90' in capsys.readouterr().out


def test_count_prints_paper_numbers(capsys):
    main(['count', 'dat_tiny'])
    assert capsys.readouterr().out.strip() == 'dat_tiny: 28.32M parameters, 4.59 GMACs at 224x224'


def test_convert_reports_errors_without_traceback(tmp_path):
    src = tmp_path / 'missing.pth'
    result = subprocess.run([sys.executable, '-m', 'deformvit', 'convert', str(src), str(tmp_path / 'o.safetensors')],
                            capture_output=True, text=True)
    assert result.returncode != 0 and 'no checkpoint file' in result.stderr and 'Traceback' not in result.stderr
    torch.save({'model': {'foo.weight': torch.zeros(2)}}, src)
    result = subprocess.run([sys.executable, '-m', 'deformvit', 'convert', str(src), str(tmp_path / 'o.safetensors')],
                            capture_output=True, text=True)
    assert 'not a DAT state dict' in result.stderr and not (tmp_path / 'o.safetensors').exists()


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(['frobnicate'])


def test_help_lists_every_command_and_each_command_documents_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--help'])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    commands = ('train', 'eval', 'detect', 'segment', 'demo', 'profile', 'bench', 'visualize', 'export', 'convert',
                'count')
    for command in commands:
        assert f'    {command} ' in listing or f'    {command}\n' in listing, command
    for command, example in (('profile', 'deformvit profile --paper'), ('bench', 'deformvit bench --table8'),
                             ('visualize', 'deformvit visualize'), ('export', 'deformvit export dat_tiny')):
        with pytest.raises(SystemExit):
            main([command, '--help'])
        assert example in capsys.readouterr().out, command


def test_new_commands_report_bad_input_without_traceback():
    for argv, message in ((['profile'], 'name at least one model'),
                          (['bench', '--models', 'dat_tinyy', '--references', 'none'], 'did you mean'),
                          (['export', 'no_such_model'], 'no_such_model')):
        result = subprocess.run([sys.executable, '-m', 'deformvit', *argv], capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, (argv, result.stderr)
        assert 'Traceback' not in result.stderr, argv


def test_demo_shows_the_moved_key_positions_of_eapt(capsys):
    main(['demo', '--model', 'eapt_nano'])
    out = capsys.readouterr().out
    assert 'eapt_nano' in out and 'top-5 classes' in out
    assert 'deformable block stages.3.blocks.1: 1 offset groups x 1x1 reference points' in out


def test_eval_refuses_a_detection_checkpoint_by_name(tmp_path):
    from deformvit.checkpoint import metadata_for, save_safetensors
    path = tmp_path / 'best.safetensors'
    save_safetensors({'w': torch.zeros(1)}, str(path), metadata_for('mask_rcnn', {}, ['a'], 0, task='detect'))
    with pytest.raises(SystemExit, match='^deformvit eval: .* is a detection checkpoint .*; expected a classification'):
        main(['eval', str(path)])


def test_demo_refuses_a_model_without_deformable_blocks():
    with pytest.raises(SystemExit, match='^deformvit demo: resnet18 is a ResNet; the demo shows the deformable blocks'):
        main(['demo', '--model', 'resnet18'])
