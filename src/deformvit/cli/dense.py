"""``deformvit detect`` and ``deformvit segment``: train, eval and predict."""
import argparse
from typing import Callable, Dict

from ..checkpoint import check_output_folder
from ..runtime import init_distributed, resolve_device
from ..tasks import TASK_NAMES, get_task, load_model
from ..tasks.detection import task as detection
from ..tasks.segmentation import task as segmentation
from .common import add_subcommand, non_negative_int, positive_int, probability
from .train import add_training_arguments

__all__ = ['register']

# what predict writes, per command
WRITTEN = {'detect': 'drawings and detections.json', 'segment': 'label maps, overlays and classes.json'}
# the help of each command: the task, its train, eval and predict actions
HELP = {
    'detect': ('object detection / instance segmentation: train, eval, predict',
               'train a detector (no --data: the embedded digit scenes)', 'COCO box/mask AP of a checkpoint',
               'draw detections on images and write detections.json'),
    'segment': ('semantic segmentation: train, eval, predict', 'train a segmentor (no --data: the embedded digit '
                'scenes)', 'mIoU, mAcc and per-class IoU of a checkpoint', 'write label maps and overlays of images'),
}


def _add_commands(commands, name: str, module, data_help: str, evaluate: Callable, predict: Callable, folder: str):
    """The ``train``, ``eval`` and ``predict`` sub-commands of a dense task, with the flags they share;
    returns the eval and predict parsers."""
    task = get_task(name)
    help, train_help, eval_help, predict_help = HELP[name]
    parser = add_subcommand(commands, name, help, module.__doc__)
    actions = parser.add_subparsers(dest='action', required=True)
    add_training_arguments(add_subcommand(actions, 'train', train_help, module.__doc__), task)
    eval_parser = add_subcommand(actions, 'eval', eval_help)
    eval_parser.add_argument('checkpoint', help=f'last.safetensors / best.safetensors of a {TASK_NAMES[name]} run')
    eval_parser.add_argument('--data', help=f'{data_help}; default: the embedded digit scenes')
    eval_parser.set_defaults(func=evaluate, prog=f'deformvit {name} eval')
    predict_parser = add_subcommand(actions, 'predict', predict_help)
    predict_parser.add_argument('checkpoint')
    predict_parser.add_argument('inputs', nargs='+', help='image files or folders')
    predict_parser.add_argument('--output', default=folder, help=f'folder for the {WRITTEN[name]} (default: {folder})')
    predict_parser.set_defaults(func=predict, prog=f'deformvit {name} predict')
    return eval_parser, predict_parser


def _add_device_flags(eval_parser: argparse.ArgumentParser, predict_parser: argparse.ArgumentParser) -> None:
    eval_parser.add_argument('--workers', type=non_negative_int, default=2)
    eval_parser.add_argument('--device', default='auto')
    predict_parser.add_argument('--device', default='cpu')


def _print_skipped(result: Dict, output: str, name: str) -> None:
    for entry in result['skipped']:
        print(f"skipped {entry['file']}: {entry['reason']}")
    skipped = f" ({len(result['skipped'])} image(s) skipped, listed there too)" if result['skipped'] else ''
    print(f'{WRITTEN[name]} in {output}{skipped}')


def detect_eval(args: argparse.Namespace) -> Dict:
    ctx = init_distributed(args.device)
    loaded = load_model(args.checkpoint, task='detect')
    evaluation, images = detection.evaluate_detector(loaded, args.data, ctx, args.batch_size, args.workers)
    m = evaluation.metrics
    print(f'{args.checkpoint} on {evaluation.images} images of {images}'
          + (f' ({evaluation.skipped} unreadable skipped)' if evaluation.skipped else ''))
    for prefix in ('box', 'mask') if loaded.model.has_masks() else ('box',):
        print(f'  {prefix:4s} AP {m[prefix + "_ap"]:5.2f}  AP50 {m[prefix + "_ap50"]:5.2f}  '
              f'AP75 {m[prefix + "_ap75"]:5.2f}'
              f'  APs {m[prefix + "_aps"]:5.2f}  APm {m[prefix + "_apm"]:5.2f}  APl {m[prefix + "_apl"]:5.2f}')
    print('per-class box AP:')
    for name, ap in zip(loaded.classes, m['box_ap_per_class']):
        print(f'  {name:<24} {ap:6.2f}')
    return m


def _check_predict(args: argparse.Namespace) -> None:
    """What predict can check before loading the model: the device and the output folder."""
    resolve_device(args.device)
    check_output_folder(args.output)


def detect_predict(args: argparse.Namespace) -> Dict:
    _check_predict(args)
    result = detection.predict(load_model(args.checkpoint, task='detect'), args.inputs, args.output,
                               args.score_threshold, args.device)
    for record in result['images']:
        found = ', '.join(f"{d['label']} {d['score']:.2f}" for d in record['detections']) or 'nothing'
        print(f"{record['file']}: {found}")
    _print_skipped(result, args.output, 'detect')
    return result


def segment_eval(args: argparse.Namespace) -> Dict:
    ctx = init_distributed(args.device)
    loaded = load_model(args.checkpoint, task='segment')
    evaluation, root = segmentation.evaluate_segmentor(loaded, args.data, ctx, args.mode, args.multi_scale, args.scale,
                                                       args.crop, args.stride, args.workers)
    protocol = ('multi-scale + flip' if args.multi_scale else 'single-scale') + f', {args.mode} inference'
    print(f'{args.checkpoint} on {evaluation.images} images of {root} ({protocol})'
          + (f', {evaluation.skipped} unreadable skipped' if evaluation.skipped else ''))
    print(f'  {segmentation.SegmentationTask().describe(evaluation)}')
    print('per-class IoU / accuracy:')
    for name, iou, acc in zip(loaded.classes, evaluation.detail['iou'], evaluation.detail['acc']):
        print(f'  {name:<24} {iou:6.2f} {acc:6.2f}')
    return evaluation.metrics


def segment_predict(args: argparse.Namespace) -> Dict:
    _check_predict(args)
    result = segmentation.predict(load_model(args.checkpoint, task='segment'), args.inputs, args.output, args.scale,
                                  args.mode, args.multi_scale, args.device)
    for record in result['images']:
        top = sorted(record['classes'].items(), key=lambda kv: -kv[1])[:5]
        print(f"{record['file']}: " + ', '.join(f'{name} {share:.0%}' for name, share in top))
    _print_skipped(result, args.output, 'segment')
    return result


def register(commands) -> None:
    eval_parser, predict_parser = _add_commands(commands, 'detect', detection, 'COCO root', detect_eval,
                                                detect_predict, 'detections')
    eval_parser.add_argument('--batch-size', type=positive_int, default=2)
    predict_parser.add_argument('--score-threshold', type=probability, default=0.5)
    _add_device_flags(eval_parser, predict_parser)

    eval_parser, predict_parser = _add_commands(commands, 'segment', segmentation, 'ADE20K-layout root',
                                                segment_eval, segment_predict, 'segmentations')
    eval_parser.add_argument('--multi-scale', action='store_true', help='ratios 0.5-1.75 and flips, averaged')
    eval_parser.add_argument('--crop', type=positive_int, nargs=2, default=[512, 512], help='sliding window size')
    eval_parser.add_argument('--stride', type=positive_int, nargs=2, default=[341, 341], help='sliding window stride')
    predict_parser.add_argument('--multi-scale', action='store_true')
    for parser in (eval_parser, predict_parser):
        parser.add_argument('--mode', choices=['whole', 'slide'], default='whole')
        parser.add_argument('--scale', type=positive_int, nargs=2, default=[2048, 512],
                            help='test resize (long, short)')
    _add_device_flags(eval_parser, predict_parser)
