"""Every command against what careless users type: one clear line on stderr, the right exit status
(2: an argument the command cannot take, 1: a failure), no traceback, nothing of the user's changed,
no folder left behind by a failed run.

Each case runs in-process through :func:`deformvit.cli.main` from a scratch folder holding the
fixtures below. Add a case here for every bad input found.
"""
import hashlib
import json
import os
import re
import shlex
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from deformvit.checkpoint import metadata_for, save_safetensors
from deformvit.cli import main
from deformvit.tasks import build_detector, build_segmentor, get_task

CLASSES = ['a', 'b', 'c']


@pytest.fixture(scope='module')
def files(tmp_path_factory, bomb_png) -> Path:
    """Checkpoints of every task (good, empty, truncated), photos, and bad recipes, in one folder."""
    root = tmp_path_factory.mktemp('careless')
    torch.manual_seed(0)
    classifier = timm.create_model('dat_nano', num_classes=3)
    save_safetensors(classifier.state_dict(), str(root / 'cls.safetensors'),
                     metadata_for('dat_nano', dict(num_classes=3), CLASSES, 0))
    torch.save({'model': classifier.state_dict()}, root / 'cls3.pth')
    detector = build_detector('faster_rcnn', 'dat_nano', 3, min_size=64, max_size=64, fpn_channels=16,
                              representation_size=32)
    save_safetensors(detector.state_dict(), str(root / 'det.safetensors'), metadata_for(
        'faster_rcnn', {k: v for k, v in detector.config.items() if k != 'detector'}, CLASSES, 0, task='detect'))
    segmentor = build_segmentor('semantic_fpn', 'dat_nano', 3, channels=16, fpn_channels=16)
    save_safetensors(segmentor.state_dict(), str(root / 'seg.safetensors'), metadata_for(
        'semantic_fpn', {k: v for k, v in segmentor.config.items() if k != 'decoder'}, CLASSES, 0, task='segment'))
    for name in ('zero.safetensors', 'zero.pth', 'empty.jpg'):
        (root / name).write_bytes(b'')
    for name in ('cls.safetensors', 'cls3.pth'):
        data = (root / name).read_bytes()
        (root / ('trunc' + Path(name).suffix)).write_bytes(data[:len(data) // 2])
    photos = root / 'photos'
    (photos / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ('x.jpg', 'sub/x.jpg', 'x.png'):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(photos / name)
    bomb_png(root / 'bomb.png')
    (root / 'bad.yaml').write_text('epochs: [1,\n  lr: :')
    (root / 'list.yaml').write_text('- 1\n- 2\n')
    (root / 'notes.txt').write_text('keep me')
    for name in ('a', 'b'):  # training images without the val/ split
        folder = root / 'onlytrain' / 'train' / name
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / '0.png')
    (root / 'brokenrun').mkdir()  # a run whose checkpoint files were cut short
    (root / 'brokenrun' / 'last.safetensors').write_bytes((root / 'cls.safetensors').read_bytes())
    (root / 'brokenrun' / 'last.state.pt').write_bytes((root / 'trunc.pth').read_bytes())
    (root / 'emptyrun').mkdir()
    for name in ('last.safetensors', 'last.state.pt'):
        (root / 'emptyrun' / name).write_bytes(b'')
    (root / 'nanorun').mkdir()  # the config a dat_nano run records when it starts
    (root / 'nanorun' / 'config.yaml').write_text('task: classify\nmodel: dat_nano\nepochs: 3\nrecipe: digits\n')
    return root


def _digests(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


# (command line, exit status, pattern the one stderr line must contain)
CASES = [
    # unknown names, with the closest ones
    ('count dat_nanno', 2, r"unknown model 'dat_nanno'.*did you mean dat_nano"),
    ('demo --model dat_nanno', 2, r"unknown model 'dat_nanno'.*did you mean dat_nano"),
    ('train --model dat_nanno', 2, r"unknown model 'dat_nanno'.*did you mean dat_nano"),
    ('eval cls.safetensors --model dat_nanno', 2, r"unknown model 'dat_nanno'"),
    ('detect train --backbone dat_nanno', 2, r"unknown model 'dat_nanno'"),
    ('segment train --backbone dat_nanno', 2, r"unknown model 'dat_nanno'"),
    ('convert cls3.pth out.safetensors --model dat_nanno', 2, r"unknown model 'dat_nanno'"),
    ('export dat_nanno --no-check', 2, r"unknown model 'dat_nanno'"),
    ('profile dat_nanno', 2, r"unknown model 'dat_nanno'"),
    ('bench --models dat_nanno --no-memory', 2, r"unknown model 'dat_nanno'"),
    ('visualize --model dat_nanno', 2, r"unknown model 'dat_nanno'"),
    ('train --recipe digitz', 2, r"unknown recipe 'digitz'.*did you mean digits"),
    ('detect train --detector nope', 2, r"invalid choice: 'nope'"),
    ('train --set opt=adamx', 2, r"unknown optimizer 'adamx'.*did you mean"),
    ('frobnicate', 2, r"invalid choice: 'frobnicate'"),
    # counts and sizes
    ('count dat_nano --size 0', 2, r'--size: expected a positive integer, got 0'),
    ('count dat_nano --size -5', 2, r'--size: expected a positive integer, got -5'),
    ('train --epochs 0', 2, r'epochs must be a positive integer, got 0'),
    ('train --epochs -1', 2, r'epochs must be a positive integer, got -1'),
    ('detect train --epochs 0', 2, r'epochs must be a positive integer, got 0'),
    ('segment train --epochs 0', 2, r'epochs must be a positive integer, got 0'),
    ('train --accum-steps 0', 2, r'accum_steps must be a positive integer, got 0'),
    ('train --batch-size 0', 2, r'batch_size must be a positive integer, got 0'),
    ('train --batch-size -1', 2, r'batch_size must be a positive integer, got -1'),
    ('train --img-size 0', 2, r'img_size must be a positive integer, got 0'),
    ('train --workers -1', 2, r'workers must be an integer >= 0, got -1'),
    ('train --lr -1', 2, r'lr must be a number >= 0 or null, got -1.0'),
    ('train --set mixup=abc', 2, r"mixup must be a number >= 0, got 'abc'"),
    ('train --set drop_path=2', 2, r'drop_path must be a number in \[0, 1\), got 2'),
    ('train --set augment=maybe', 2, r"augment must be bool like its default True, got 'maybe'"),
    ('train --set scale=[0,2]', 2, r'scale must be a list of 2 numbers in \(0, 1\], got \[0, 2\]'),
    ('segment train --set crop_size=[0,0]', 2, r'crop_size must be a list of 2 positive integers'),
    ('segment train --set test_mode=sliding', 2, r"test_mode must be one of whole, slide, got 'sliding'"),
    ('detect train --set anchor_sizes=[]', 2, r'anchor_sizes must be a list of 5 positive integers or null'),
    ('detect train --set anchor_sizes=[32,64]', 2, r'anchor_sizes must be a list of 5 positive integers or null'),
    ('detect train --set backbone_kwargs=3', 2, r'backbone_kwargs must be dict like its default'),
    ('eval cls.safetensors --img-size 0', 2, r'--img-size: expected a positive integer, got 0'),
    ('eval cls.safetensors --batch-size 0', 2, r'--batch-size: expected a positive integer, got 0'),
    ('eval cls.safetensors --workers -1', 2, r'--workers: expected an integer >= 0, got -1'),
    ('detect eval det.safetensors --batch-size 0', 2, r'--batch-size: expected a positive integer'),
    ('segment eval seg.safetensors --stride 0 0', 2, r'--stride: expected a positive integer, got 0'),
    ('segment eval seg.safetensors --crop 0 0 --mode slide', 2, r'--crop: expected a positive integer, got 0'),
    ('segment eval seg.safetensors --scale 0 0', 2, r'--scale: expected a positive integer, got 0'),
    ('segment predict seg.safetensors photos --scale 0 0 --output out', 2, r'--scale: expected a positive integer'),
    ('detect predict det.safetensors photos --score-threshold 2 --output out', 2,
     r'--score-threshold: expected a number in \[0, 1\], got 2'),
    ('export dat_nano --size 0 --no-check --output x.onnx', 2, r'--size: expected a positive integer, got 0'),
    ('export dat_nano --batch 0 --no-check --output x.onnx', 2, r'--batch: expected a positive integer, got 0'),
    ('profile dat_nano --size 0', 2, r'--size: expected a positive integer, got 0'),
    ('profile dat_nano --depth 0', 2, r'--depth: expected a positive integer, got 0'),
    ('bench --models dat_nano --batch 0 --no-memory', 2, r'--batch: expected a positive integer, got 0'),
    ('bench --models dat_nano --repeats 0 --no-memory', 2, r'--repeats: expected a positive integer, got 0'),
    ('bench --models dat_nano --threads 0 --no-memory', 2, r'--threads: expected a positive integer, got 0'),
    ('visualize --size 0', 2, r'--size: expected a positive integer, got 0'),
    ('visualize --top-k 0', 2, r'--top-k: expected a positive integer, got 0'),
    # devices and precisions
    ('train --device cuda:7', 2, r'(no GPU is visible|does not exist)'),
    ('train --device tpu', 2, r"unknown device 'tpu'"),
    ('train --precision fp16 --device cpu', 2, r'fp16 mixed precision needs a CUDA device'),
    ('eval cls.safetensors --device cuda:7', 2, r'(no GPU is visible|does not exist)'),
    ('bench --models dat_nano --device cuda:7', 2, r'(no GPU is visible|does not exist)'),
    ('visualize --device cuda:7', 2, r'(no GPU is visible|does not exist)'),
    # recipes and overrides
    ('train --recipe bad.yaml', 2, r'recipe bad.yaml is not valid YAML'),
    ('train --recipe list.yaml', 2, r'recipe list.yaml holds a list; expected a mapping'),
    ('train --recipe seg-digits', 2, r"recipe 'seg-digits' is a segment recipe"),
    ('train --set nope=1', 2, r'--set nope: unknown field'),
    ('train --set mixup', 2, r"--set expects key=value, got 'mixup'"),
    ('train --set num_classes=-1', 2, r'--set num_classes: unknown field'),
    ('train --set "mixup=[1,"', 2, r'the value is not valid YAML'),
    # run folders and outputs
    ('train --output notes.txt', 2, r'--output notes.txt is a file; expected the folder of the run'),
    ('train --output notes.txt/run', 2, r'notes.txt is a file, not a folder'),
    ('train --resume', 2, r'--resume needs --output'),
    ('train --resume --output never', 1, r'no resumable checkpoint in never'),
    ('train --resume --output nanorun --model dat_tiny', 2,
     r"the run in nanorun was trained with model='dat_nano'; model='dat_tiny' would not continue it"),
    ('train --resume --output nanorun --recipe dat-in1k', 2, r"trained with recipe='digits'; recipe='dat-in1k'"),
    ('detect train --resume --output nanorun', 2, r'nanorun holds a classify run; `deformvit detect train --resume`'),
    ('train --resume --output brokenrun', 1, r'last.state.pt is not a readable PyTorch checkpoint'),
    ('train --resume --output emptyrun', 1, r'last.safetensors is not a readable safetensors file'),
    ('train --data onlytrain --output newrun --model dat_nano', 1, r"dataset root 'onlytrain/val' does not exist"),
    ('detect predict det.safetensors photos --output notes.txt', 2, r'notes.txt is a file; expected a folder'),
    ('detect predict det.safetensors photos --output photos', 2, r'output folder photos is the input folder photos'),
    ('segment predict seg.safetensors photos --output photos/sub', 2, r'photos/sub is inside the input folder'),
    ('detect predict det.safetensors photos --device cuda:7 --output out', 2, r'(no GPU is visible|does not exist)'),
    ('export dat_nano --output notes.txt --no-check', 2, r'onnx files are written as .onnx; got notes.txt'),
    ('export dat_nano --output photos --no-check', 2, r'onnx files are written as .onnx'),
    ('export dat_nano --output photos.onnx/x.onnx --no-check', 2, r'folder .*photos.onnx does not exist'),
    ('export dat_nano --model-args \'{"nope":1}\' --no-check --output x.onnx', 2, r"dat_nano takes no argument 'nope'"),
    ('convert cls3.pth out.pth --model dat_nano', 2, r'converted files are written as .safetensors; got out.pth'),
    ('convert cls.safetensors cls.safetensors --model dat_nano', 2, r'is also the input'),
    ('convert cls3.pth photos --model dat_nano', 2, r'converted files are written as .safetensors'),
    ('profile dat_nano --output notes.txt', 2, r'--output and --table go with --paper'),
    ('profile --paper --output notes.txt', 2, r'markdown files are written as .md; got notes.txt'),
    ('visualize --output notes.txt', 2, r'output folder notes.txt is a file'),
    # missing, empty, truncated and wrong files
    ('eval missing.safetensors', 1, r'no checkpoint file at missing.safetensors'),
    ('eval zero.safetensors', 1, r'zero.safetensors is not a readable safetensors file'),
    ('eval trunc.safetensors', 1, r'trunc.safetensors is not a readable safetensors file'),
    ('eval zero.pth --model dat_nano', 1, r'zero.pth is not a readable PyTorch checkpoint'),
    ('eval trunc.pth --model dat_nano', 1, r'trunc.pth is not a readable PyTorch checkpoint'),
    ('eval det.safetensors', 1, r'det.safetensors is a detection checkpoint \(faster_rcnn\); expected a classif'),
    ('detect eval seg.safetensors', 1, r'is a segmentation checkpoint .*; expected a detection one'),
    ('detect eval missing.safetensors', 1, r'no checkpoint file at missing.safetensors'),
    ('detect predict missing.pth photos --output out', 1, r'no checkpoint file at missing.pth'),
    ('segment predict det.safetensors photos --output out', 1, r'is a detection checkpoint'),
    ('detect predict zero.safetensors photos --output out', 1, r'not a readable safetensors file'),
    ('detect predict det.safetensors missing --output out', 1, r'missing is neither an image file nor a folder'),
    ('demo --checkpoint missing.pth', 1, r'no checkpoint file at missing.pth'),
    ('demo --checkpoint zero.pth', 1, r'zero.pth is not a readable PyTorch checkpoint'),
    ('demo --checkpoint trunc.safetensors', 1, r'not a readable safetensors file'),
    ('demo --checkpoint det.safetensors', 1, r'is a detection checkpoint'),
    ('demo --checkpoint cls3.pth', 1, r'cls3.pth does not fit this model'),
    ('demo --image missing.jpg', 1, r'no image file at missing.jpg'),
    ('demo --image empty.jpg', 1, r'empty.jpg is not a readable image'),
    ('demo --image bomb.png', 1, r'bomb.png is too large to decode'),
    ('visualize --checkpoint zero.pth', 1, r'zero.pth is not a readable PyTorch checkpoint'),
    ('visualize --image empty.jpg', 1, r'empty.jpg is not a readable image'),
    ('train --data missing', 1, r"dataset root 'missing/train' does not exist"),
    ('train --pretrained missing.pth', 1, r'no checkpoint file at missing.pth'),
    ('train --pretrained zero.pth', 1, r'zero.pth is not a readable PyTorch checkpoint'),
    ('eval cls.safetensors --data missing', 1, r"dataset root 'missing' does not exist"),
    ('detect eval det.safetensors --data missing', 1, r"COCO root 'missing'"),
    ('convert zero.pth out.safetensors', 1, r'zero.pth is not a readable PyTorch checkpoint'),
    ('convert missing.pth out.safetensors', 1, r'no checkpoint file at missing.pth'),
    ('export dat_nano --checkpoint cls3.pth --model-args \'{"num_classes":5}\' --no-check --output x.onnx', 2,
     r'cls3.pth predicts 3 classes; num_classes=5 would replace its classifier'),
]


@pytest.mark.parametrize('command, status, message', CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_with_its_status_and_changes_nothing(files, monkeypatch, capsys, command, status,
                                                                     message):
    monkeypatch.chdir(files)
    monkeypatch.delenv('DEFORMVIT_DEBUG', raising=False)
    before = _digests(files)
    entries = set(os.listdir(files))
    with pytest.raises(SystemExit) as exit_info:
        main(shlex.split(command))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == status, err
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('deformvit'), err
    assert re.search(message, lines[0]), lines[0]
    assert _digests(files) == before, 'a file of the user changed'
    assert set(os.listdir(files)) == entries, f'left behind: {set(os.listdir(files)) - entries}'


def test_debug_shows_the_traceback_and_an_unexpected_error_says_it_is_ours(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    monkeypatch.delenv('DEFORMVIT_DEBUG', raising=False)
    for argv in (['--debug', 'count', 'dat_nanno'], ['count', 'dat_nanno', '--debug']):
        with pytest.raises(ValueError, match="unknown model 'dat_nanno'"):
            main(argv)
    monkeypatch.setenv('DEFORMVIT_DEBUG', '1')
    with pytest.raises(ValueError, match="unknown model 'dat_nanno'"):
        main(['count', 'dat_nanno'])
    monkeypatch.setenv('DEFORMVIT_DEBUG', '0')
    from deformvit.cli import weights

    def broken(args):
        raise RuntimeError('an internal mistake')
    monkeypatch.setattr(weights, 'create_model', broken)
    with pytest.raises(SystemExit) as exit_info:
        main(['count', 'dat_nano'])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith('deformvit count: unexpected RuntimeError: an internal mistake. This is a fault of '
                          'deformvit') and '--debug' in err

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(weights, 'create_model', interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(['count', 'dat_nano'])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == 'deformvit count: interrupted'


def test_models_refuse_impossible_arguments_when_built():
    with pytest.raises(ValueError, match=r'num_classes must be an integer >= 0 \(0: no classifier\), got -1'):
        timm.create_model('dat_nano', num_classes=-1)
    with pytest.raises(ValueError, match=r'drop_path_rate must be in \[0, 1\)'):
        timm.create_model('eapt_nano', drop_path_rate=2)


def test_weights_files_bring_their_class_count_never_a_random_classifier(files):
    from deformvit import load_model
    path = str(files / 'cls3.pth')
    model = timm.create_model('dat_nano', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    expected = torch.load(path, weights_only=True)['model']['head.fc.weight']
    assert model.num_classes == 3 and torch.equal(model.head.fc.weight, expected)
    # fine-tuning to other classes, as in timm: a new classifier on the file's features
    finetune = timm.create_model('dat_nano', pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=path))
    assert finetune.num_classes == 5 and torch.equal(finetune.stem.conv.weight, model.stem.conv.weight)
    # loading to predict: the file's count, or an error naming both counts
    assert load_model('dat_nano', path).model.num_classes == 3
    with pytest.raises(ValueError, match='predicts 3 classes; num_classes=1000 would replace its classifier'):
        load_model('dat_nano', path, num_classes=1000)
    headless = files / 'headless.safetensors'
    state = {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}
    save_safetensors(state, str(headless))
    try:
        features = timm.create_model('dat_nano', pretrained=True, pretrained_cfg_overlay=dict(file=str(headless)))
        assert features.num_classes == 0 and features(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    finally:
        headless.unlink()


def test_every_image_of_an_odd_batch_or_a_batch_of_one_trains():
    from deformvit.tasks.classification import _ClassificationStep
    from deformvit.training import defaults
    config = dict(defaults(get_task('classify')), mixup=0.8, cutmix=1.0, label_smoothing=0.1, channels_last=False)
    step = _ClassificationStep(config, num_classes=2)
    model = timm.create_model('dat_nano', num_classes=2, img_size=32)
    for batch in (1, 3):
        loss, images = step(model, torch.randn(batch, 3, 32, 32), torch.arange(batch) % 2, torch.device('cpu'))
        assert images == batch and torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        assert model.stem.conv.weight.grad.abs().sum() > 0
        model.zero_grad()


@pytest.mark.parametrize('command, summary', [('detect', 'detections.json'), ('segment', 'classes.json')])
def test_predict_skips_what_it_cannot_read_writes_its_summary_and_keeps_every_input(
        files, tmp_path, monkeypatch, capsys, command, summary):
    monkeypatch.chdir(files)
    before = _digests(files)
    checkpoint = 'det.safetensors' if command == 'detect' else 'seg.safetensors'
    out = tmp_path / 'out'
    main([command, 'predict', checkpoint, 'photos', 'bomb.png', 'empty.jpg', '--output', str(out)])
    printed = capsys.readouterr().out
    assert 'skipped bomb.png: too large to decode' in printed and 'skipped empty.jpg: not a readable image' in printed
    record = json.loads((out / summary).read_text())
    assert sorted(image['file'] for image in record['images']) == ['photos/sub/x.jpg', 'photos/x.jpg', 'photos/x.png']
    assert sorted(entry['file'] for entry in record['skipped']) == ['bomb.png', 'empty.jpg']
    written = [name for image in record['images'] for name in image['outputs']]
    assert len(written) == len(set(written)) and all((out / name).is_file() for name in written)
    assert _digests(files) == before


def test_a_predict_run_stopped_halfway_still_lists_what_it_wrote(files, tmp_path, monkeypatch, capsys):
    from deformvit.tasks.detection import task as detection
    monkeypatch.chdir(files)
    drawn = []
    draw = detection.draw_detections

    def draw_once(*args, **kwargs):
        if drawn:
            raise KeyboardInterrupt
        drawn.append(True)
        return draw(*args, **kwargs)
    monkeypatch.setattr(detection, 'draw_detections', draw_once)
    with pytest.raises(SystemExit) as exit_info:
        main(['detect', 'predict', 'det.safetensors', 'photos', '--output', str(tmp_path / 'out')])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == 'deformvit detect predict: interrupted'
    record = json.loads((tmp_path / 'out' / 'detections.json').read_text())
    assert len(record['images']) == 1 and (tmp_path / 'out' / record['images'][0]['outputs'][0]).is_file()
