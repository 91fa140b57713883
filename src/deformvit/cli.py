"""``deformvit`` command line: ``train``, ``eval``, ``detect``, ``segment``, ``demo``, ``convert``, ``count``."""
import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _convert(args: argparse.Namespace) -> None:
    from .checkpoint import UnsafeCheckpointError
    from .convert import convert_checkpoint
    try:
        name = convert_checkpoint(args.src, args.dst, args.model, weights_only=not args.trust_pickle)
    except (UnsafeCheckpointError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f'deformvit convert: {err}') from err
    print(f'wrote {args.dst} ({name}); load it with timm.create_model({name!r}, pretrained=True, '
          f'pretrained_cfg_overlay=dict(file={args.dst!r}))')


def _count(args: argparse.Namespace) -> None:
    import timm
    from . import models  # noqa: F401
    from .complexity import count_macs, count_parameters
    model = timm.create_model(args.model)
    size = args.size or model.pretrained_cfg['input_size'][-1]
    print(f'{args.model}: {count_parameters(model) / 1e6:.2f}M parameters, '
          f'{count_macs(model, (3, size, size)) / 1e9:.2f} GMACs at {size}x{size}')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='deformvit', description='Deformable-attention vision transformers.')
    commands = parser.add_subparsers(dest='command', required=True)

    from . import demo, evaluate, train
    train_parser = commands.add_parser(
        'train', help='train a classifier (no --data: dat_nano on embedded MNIST digits)',
        description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.main)

    eval_parser = commands.add_parser('eval', help='top-1/top-5 and per-class accuracy of a checkpoint',
                                      description=evaluate.__doc__)
    evaluate.add_arguments(eval_parser)
    eval_parser.set_defaults(func=evaluate.main)

    from .tasks import detection, segmentation
    detect_parser = commands.add_parser(
        'detect', help='object detection / instance segmentation: train, eval, predict',
        description=detection.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    detection.add_arguments(detect_parser)
    segment_parser = commands.add_parser(
        'segment', help='semantic segmentation: train, eval, predict',
        description=segmentation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    segmentation.add_arguments(segment_parser)

    demo_parser = commands.add_parser('demo', help='classify a photo and show deformed sampling points')
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.run)

    convert = commands.add_parser('convert', help='official DAT checkpoint -> deformvit .safetensors')
    convert.add_argument('src', help='official release file ({"model": state_dict})')
    convert.add_argument('dst', help='output .safetensors file')
    convert.add_argument('--model', help='model name (default: inferred from the weights)')
    convert.add_argument('--trust-pickle', action='store_true',
                         help='allow pickled Python objects in SRC (training checkpoints); only for trusted files')
    convert.set_defaults(func=_convert)

    count = commands.add_parser('count', help='parameters and MACs (fvcore convention)')
    count.add_argument('model')
    count.add_argument('--size', type=int, help='input side (default: the model\'s input size)')
    count.set_defaults(func=_count)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    main(sys.argv[1:])
