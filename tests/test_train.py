"""``deformvit train`` / ``eval``: recipes, outputs, errors, DDP equivalence, resume after a kill."""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from deformvit.cli import main
from deformvit.cli.train import add_training_arguments
from deformvit.tasks import get_task
from deformvit.training import check_config, load_recipe, recipe_names, resolve_config

FAST = ['--model', 'dat_nano', '--img-size', '32', '--workers', '0', '--set', 'augment=false', '--set', 'mixup=0',
        '--set', 'cutmix=0', '--set', 'drop_path=0', '--set', 'label_smoothing=0', '--set', 'warmup_epochs=0',
        '--lr', '0.002']


def make_images(root: Path, per_class: int = 16, size: int = 32, seed: int = 0) -> Path:
    """Two classes of real PNG files: noisy textures with a red or a blue cast."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', per_class), ('val', per_class // 2)):
        for channel, name in enumerate(('red', 'blue')):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 160, (size, size, 3))
                img[..., 2 * channel] += 95
                Image.fromarray(img.astype(np.uint8)).save(folder / f'{i}.png')
    return root


def run_cli(*args, check=True, **kwargs):
    return subprocess.run([sys.executable, '-m', 'deformvit', *args], capture_output=True, text=True,
                          check=check, **kwargs)


def test_recipes_follow_the_papers_and_every_field_can_be_overridden(tmp_path):
    assert {'dat-in1k', 'dat-in1k-384-finetune', 'eapt-in1k', 'digits'} <= set(recipe_names())
    dat = load_recipe('dat-in1k')
    assert (dat['opt'], dat['lr_base'], dat['lr_base_size'], dat['min_lr'], dat['warmup_lr']) == ('adamw', 1e-3, 1024, 1e-7, 1e-6)
    assert (dat['warmup_epochs'], dat['weight_decay'], dat['mixup'], dat['cutmix'], dat['epochs']) == (20, 0.05, 0.8, 1.0, 300)
    assert dat['drop_path'] == {'dat_tiny': 0.2, 'dat_small': 0.3, 'dat_base': 0.5, 'dat_base_384': 0.5}
    finetune = load_recipe('dat-in1k-384-finetune')
    assert finetune['lr_base'] / finetune['lr_base_size'] * 1024 == pytest.approx(4e-6)  # Sec. 4.1
    assert (finetune['epochs'], finetune['warmup_epochs'], finetune['weight_decay']) == (30, 0, 1e-8)
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, get_task('classify'))
    config = resolve_config(parser.parse_args(['--recipe', 'dat-in1k', '--model', 'dat_small', '--set', 'mixup=0.5',
                                               '--set', 'scale=[0.5, 1.0]']))
    assert (config['drop_path'], config['mixup'], config['scale']) == (0.3, 0.5, [0.5, 1.0])
    with pytest.raises(ValueError, match='unknown field'):
        resolve_config(parser.parse_args(['--set', 'learning_rate=1']))


@pytest.mark.parametrize('recipe, ratio', [('eapt-in1k', 0.05), ('eapt-det-1x', 0.05), ('eapt-seg-upernet-160k', 0.01),
                                           ('eapt-atss-3x', 0.05), ('eapt-reppoints-v2-3x', 0.05),
                                           ('eapt-sparse-rcnn-3x', 0.05)])
def test_eapt_recipes_warm_up_from_the_papers_ratio_of_the_learning_rate(recipe, ratio):
    fields = load_recipe(recipe)  # EAPT Sec. IV-A: "warmup learning rate is 0.05" (0.01 for segmentation)
    assert fields['warmup_lr'] / fields['lr_base'] == pytest.approx(ratio)
    assert fields.get('model', fields.get('backbone')) == 'eapt_small'


def test_eapt_table_vii_detection_rows_each_have_a_sparse_rcnn_recipe():
    from deformvit.tools.paper import rows
    full = load_recipe('eapt-sparse-rcnn-3x')
    assert (full['detector'], full['backbone'], full['detector_kwargs']['num_proposals']) == \
        ('sparse_rcnn', 'eapt_small', 300)
    table = rows('EAPT', 'Table VII')
    recipes = {name: load_recipe(name) for name in recipe_names('detect') if name.startswith('eapt-sparse-rcnn-3x')}
    assert len(recipes) == len(table) == 8
    by_kwargs = {tuple(sorted(r.get('backbone_kwargs', {}).items())): name for name, r in recipes.items()}
    for row in table:
        name = by_kwargs[tuple(sorted(row.kwargs.items()))]  # every row of the table, once
        recipe = recipes[name]
        # the ablations change the backbone only: the framework, data and schedule are the full row's
        assert {k: v for k, v in recipe.items() if k not in ('backbone_kwargs', 'description')} == \
            {k: v for k, v in full.items() if k not in ('backbone_kwargs', 'description')}


def test_a_recipe_extends_its_base_and_replaces_what_it_names(tmp_path):
    base = tmp_path / 'base.yaml'
    base.write_text('task: detect\ndetector: atss\nepochs: 3\nbackbone_kwargs: {broaden_size: 0, use_endec: false}\n')
    child = tmp_path / 'child.yaml'
    child.write_text(f'base: {base}\nepochs: 5\nbackbone_kwargs: {{use_endec: false}}\n')
    assert load_recipe(str(child)) == dict(task='detect', detector='atss', epochs=5,
                                           backbone_kwargs=dict(use_endec=False))
    shipped = tmp_path / 'shipped.yaml'
    shipped.write_text('base: det-digits\nepochs: 2\n')
    assert load_recipe(str(shipped)) == dict(load_recipe('det-digits'), epochs=2)
    (tmp_path / 'mine').mkdir()
    beside = tmp_path / 'mine' / 'beside.yaml'  # a base file named relative to the recipe's folder
    beside.write_text('base: ../child.yaml\nepochs: 7\n')
    assert load_recipe(str(beside)) == dict(load_recipe(str(child)), epochs=7)


@pytest.mark.parametrize('text, message', [
    ('base: {self}\n', 'is its own base'),
    ('base: 3\n', 'has base 3; expected the name or file of another recipe'),
    ('base: det-digitz\n', "unknown recipe 'det-digitz'"),
])
def test_bad_recipe_bases_are_refused(tmp_path, text, message):
    path = tmp_path / 'recipe.yaml'
    path.write_text(text.format(self=path))
    with pytest.raises(ValueError, match=message):
        load_recipe(str(path))


def test_every_shipped_recipe_passes_the_checks():
    for name in recipe_names():
        task = get_task(load_recipe(name).get('task') or 'classify')
        parser = argparse.ArgumentParser()
        add_training_arguments(parser, task)
        check_config(resolve_config(parser.parse_args(['--recipe', name]), task), task)


def test_train_help_lists_the_options():
    out = run_cli('train', '--help').stdout
    for option in ('--recipe', '--model', '--data', '--epochs', '--batch-size', '--img-size', '--output', '--resume',
                   '--seed', '--device', '--precision', '--compile', '--grad-checkpointing', '--set'):
        assert option in out


def test_training_on_folders_learns_and_writes_every_output(tmp_path, capsys):
    data = make_images(tmp_path / 'data')
    out = tmp_path / 'run'
    main(['train', '--data', str(data), '--output', str(out), '--epochs', '6', '--batch-size', '8', *FAST])
    printed = capsys.readouterr().out
    for name in ('last.safetensors', 'last.state.pt', 'best.safetensors', 'metrics.csv', 'metrics.png',
                 'confusion_matrix.png', 'confusion_matrix.csv', 'config.yaml'):
        assert (out / name).exists(), name
    for name in ('last.safetensors', 'metrics.png', 'confusion_matrix.png', 'config.yaml'):
        assert str(out / name) in printed, name
    assert any((out / 'tensorboard').iterdir())
    rows = (out / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 7
    first, last = rows[1].split(','), rows[-1].split(',')
    assert float(last[1]) < float(first[1])  # training loss falls
    assert float(last[3]) == 100.0  # top-1 on the held-out images
    main(['eval', str(out / 'best.safetensors'), '--data', str(data), '--workers', '0'])
    report = capsys.readouterr().out
    assert 'top-1 100.00%' in report and 'red' in report and 'blue' in report


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, capsys):
    data = make_images(tmp_path / 'data')
    (data / 'train' / 'blue' / 'broken.jpg').write_bytes(b'')
    (data / 'train' / 'red' / 'notes.png').write_text('not an image')
    # batches made odd by skipped files still pass through Mixup, which needs pairs
    main(['train', '--data', str(data), '--output', str(tmp_path / 'run'), '--epochs', '1', '--batch-size', '6',
          *FAST, '--set', 'mixup=0.8', '--set', 'cutmix=1.0'])
    assert '2 unreadable images skipped' in capsys.readouterr().out
    assert (tmp_path / 'run' / 'metrics.csv').read_text().splitlines()[1].split(',')[7] == '2'


@pytest.mark.parametrize('setup, message', [
    (lambda root: None, 'does not exist'),
    (lambda root: (root / 'train' / 'a').mkdir(parents=True), 'no image'),
])
def test_bad_data_folders_fail_before_training(tmp_path, setup, message):
    setup(tmp_path)
    result = run_cli('train', '--data', str(tmp_path), '--output', str(tmp_path / 'run'), *FAST, check=False)
    assert result.returncode == 1 and message in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'run' / 'last.safetensors').exists()


def test_class_count_mismatch_with_checkpoint_is_reported(tmp_path):
    data = make_images(tmp_path / 'data')
    out = tmp_path / 'run'
    main(['train', '--data', str(data), '--output', str(out), '--epochs', '1', '--batch-size', '8', *FAST])
    (data / 'val' / 'diagonal').mkdir()
    Image.new('RGB', (32, 32)).save(data / 'val' / 'diagonal' / '0.png')
    with pytest.raises(SystemExit):
        main(['eval', str(out / 'last.safetensors'), '--data', str(data), '--workers', '0'])
    (data / 'train' / 'diagonal').mkdir()
    Image.new('RGB', (32, 32)).save(data / 'train' / 'diagonal' / '0.png')
    result = run_cli('train', '--data', str(data), '--output', str(out), '--epochs', '2', '--resume', *FAST,
                     check=False)
    assert result.returncode == 1 and 'trained on 2 classes' in result.stderr


def test_existing_run_is_never_overwritten(tmp_path):
    data = make_images(tmp_path / 'data', per_class=8)
    out = tmp_path / 'run'
    main(['train', '--data', str(data), '--output', str(out), '--epochs', '1', '--batch-size', '8', *FAST])
    result = run_cli('train', '--data', str(data), '--output', str(out), '--epochs', '1', *FAST, check=False)
    assert result.returncode == 1 and '--resume' in result.stderr
    # resuming continues the run's own config: without --epochs, its 1 epoch, which is done
    with pytest.raises(SystemExit, match=f'the run in {out} has trained 1 of 1 epochs; pass a larger') as exit_info:
        main(['train', '--data', str(data), '--output', str(out), '--resume', *FAST])
    assert exit_info.value.code == 2


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    data = make_images(tmp_path / 'data', per_class=8)
    out = tmp_path / 'run'
    main(['train', '--data', str(data), '--output', str(out), '--epochs', '1', '--batch-size', '8', *FAST])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, 'forward', lambda self, x, y: (x.sum() * float('nan')))
    with pytest.raises(SystemExit, match='^deformvit train: loss became nan'):
        main(['train', '--data', str(data), '--output', str(out), '--epochs', '2', '--resume', *FAST])
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name in before}
    assert after['last.safetensors'] == before['last.safetensors']
    assert after['last.state.pt'] == before['last.state.pt']


def weights(path: Path) -> dict:
    return load_file(str(path))


def test_two_gloo_processes_train_the_same_model_as_one(tmp_path):
    data = make_images(tmp_path / 'data', per_class=16)
    # SGD: Adam's per-weight normalisation would turn float rounding of near-zero gradients into lr-sized steps
    common = ['train', '--data', str(data), '--epochs', '2', '--device', 'cpu', *FAST, '--set', 'opt=sgd',
              '--lr', '0.05']
    run_cli(*common, '--output', str(tmp_path / 'single'), '--batch-size', '8')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             '-m', 'deformvit', *common, '--output', str(tmp_path / 'ddp'), '--batch-size', '4'],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = weights(tmp_path / 'single' / 'last.safetensors'), weights(tmp_path / 'ddp' / 'last.safetensors')
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    config = (tmp_path / 'ddp' / 'config.yaml').read_text()
    assert 'world_size: 2' in config and 'global_batch: 8' in config
    torch.manual_seed(0)
    initial = timm.create_model('dat_nano', num_classes=2, img_size=32).state_dict()
    assert (initial['stem.conv.weight'] - single['stem.conv.weight']).abs().max() > 1e-3  # it did train


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    data = make_images(tmp_path / 'data', per_class=32)
    common = ['train', '--data', str(data), '--epochs', '4', '--batch-size', '4', *FAST]
    run_cli(*common, '--output', str(tmp_path / 'straight'))
    killed = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, '-m', 'deformvit', *common, '--output', str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / 'last.safetensors').exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / 'last.state.pt', weights_only=True)
    assert state['epoch'] < 3, 'the run finished before it could be killed'
    run_cli(*common, '--output', str(killed), '--resume')
    straight, resumed = weights(tmp_path / 'straight' / 'last.safetensors'), weights(killed / 'last.safetensors')
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [row.split(',')[0] for row in (killed / 'metrics.csv').read_text().splitlines()[1:]] == ['0', '1', '2', '3']


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    data = make_images(tmp_path / 'data', per_class=16)
    common = ['train', '--data', str(data), '--epochs', '1', *FAST, '--set', 'opt=sgd', '--lr', '0.05']
    main([*common, '--output', str(tmp_path / 'big'), '--batch-size', '8'])
    main([*common, '--output', str(tmp_path / 'accum'), '--batch-size', '4', '--accum-steps', '2'])
    big, accum = weights(tmp_path / 'big' / 'last.safetensors'), weights(tmp_path / 'accum' / 'last.safetensors')
    for key in big:
        torch.testing.assert_close(accum[key], big[key], rtol=1e-4, atol=1e-5, msg=key)


def test_bf16_channels_last_and_grad_checkpointing_train(tmp_path, capsys):
    data = make_images(tmp_path / 'data', per_class=8)
    main(['train', '--data', str(data), '--output', str(tmp_path / 'run'), '--epochs', '1', '--batch-size', '8',
          *FAST, '--precision', 'bf16', '--channels-last', '--grad-checkpointing', '--model-ema'])
    out = capsys.readouterr().out
    assert 'bf16' in out and 'top-1' in out
    assert 'precision: bf16' in (tmp_path / 'run' / 'config.yaml').read_text()
    with pytest.raises(SystemExit, match='fp16 mixed precision needs a CUDA device'):
        main(['train', '--data', str(data), '--output', str(tmp_path / 'fp16'), *FAST, '--precision', 'fp16',
              '--device', 'cpu'])


@pytest.mark.slow
def test_torch_compile_option_trains(tmp_path):
    torch._dynamo.reset()  # sizes compiled by earlier tests would make this compilation's shapes dynamic
    data = make_images(tmp_path / 'data', per_class=8)
    main(['train', '--data', str(data), '--output', str(tmp_path / 'run'), '--epochs', '1', '--batch-size', '8',
          *FAST, '--compile'])
    assert (tmp_path / 'run' / 'last.safetensors').exists()


def test_pretrained_weights_initialise_a_run_with_a_new_classifier(tmp_path):
    data = make_images(tmp_path / 'data', per_class=8)
    main(['train', '--data', str(data), '--output', str(tmp_path / 'first'), '--epochs', '1', '--batch-size', '8',
          *FAST])
    first = weights(tmp_path / 'first' / 'last.safetensors')
    for split in ('train', 'val'):
        (data / split / 'green').mkdir()
        for i in range(8):
            Image.fromarray(np.full((32, 32, 3), (20, 200, 20), np.uint8)).save(data / split / 'green' / f'{i}.png')
    main(['train', '--data', str(data), '--output', str(tmp_path / 'second'), '--epochs', '1', '--batch-size', '8',
          *FAST, '--lr', '0', '--pretrained', str(tmp_path / 'first' / 'last.safetensors')])
    second = weights(tmp_path / 'second' / 'last.safetensors')
    assert second['head.fc.weight'].shape == (3, 256)
    torch.testing.assert_close(second['stages.2.blocks.1.attn.offset_net.conv_dw.weight'],
                               first['stages.2.blocks.1.attn.offset_net.conv_dw.weight'])


def test_model_kwargs_build_the_ablated_model_and_are_recorded_for_its_checkpoint():
    from deformvit.training.config import defaults
    task = get_task('classify')
    config = dict(defaults(task), model='eapt_nano', img_size=64, model_kwargs=dict(use_endec=False, broaden_size=0))
    model, name, file_kwargs = task.build_model(config, ['a', 'b'])
    full, _, _ = task.build_model(dict(config, model_kwargs={}), ['a', 'b'])
    assert name == 'eapt_nano' and file_kwargs['use_endec'] is False and file_kwargs['broaden_size'] == 0
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="model_kwargs: eapt_nano takes no argument 'use_endek'"):
        task.build_model(dict(config, model_kwargs=dict(use_endek=False)), ['a', 'b'])
    with pytest.raises(ValueError, match="model_kwargs: resnet18 takes no argument 'use_endec'"):
        task.build_model(dict(config, model='resnet18', model_kwargs=dict(use_endec=False)), ['a', 'b'])


def test_a_run_shorter_than_its_warm_up_still_warms_up_then_decays():
    """--set iterations=2 on a recipe with a one-epoch warm-up (63 updates): the warm-up is cut to the budget."""
    from deformvit.training.loop import _scheduler
    config = dict(resolve_config(argparse.Namespace(recipe='digits', set=None, resume=False), get_task('classify')),
                  iterations=2, lr=None)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = _scheduler(optimizer, config, updates_per_epoch=63)
    lrs = []
    for t in range(3):
        scheduler.step_update(t)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs[0] == pytest.approx(config['warmup_lr']) and lrs[1] == pytest.approx(2e-3)
    assert lrs[2] < lrs[1]
