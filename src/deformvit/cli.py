"""``deformvit`` command line: ``train``, ``eval``, ``detect``, ``segment``, ``demo``, ``profile``, ``bench``,
``visualize``, ``export``, ``convert``, ``count``."""
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

    from . import bench, demo, evaluate, export, profile, train, visualize
    from .tasks import detection, segmentation
    for name, module, func, help in (
            ('train', train, 'main', 'train a classifier (no --data: dat_nano on embedded MNIST digits)'),
            ('eval', evaluate, 'main', 'top-1/top-5 and per-class accuracy of a checkpoint'),
            ('detect', detection, None, 'object detection / instance segmentation: train, eval, predict'),
            ('segment', segmentation, None, 'semantic segmentation: train, eval, predict'),
            ('demo', demo, 'run', 'classify a photo and show deformed sampling points'),
            ('profile', profile, 'main', "parameters and MACs per stage; --paper: the papers' tables, measured"),
            ('bench', bench, 'main', 'throughput, latency and peak memory beside timm references; '
                                     '--table8: DAT Table 8 memory'),
            ('visualize', visualize, 'main', "the papers' figures: deformed points, important keys, heat maps, "
                                             'window edges'),
            ('export', export, 'main', 'ONNX or torch.export program, checked against PyTorch')):
        command = commands.add_parser(name, help=help, description=module.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        if func is not None:  # detect and segment set theirs per action
            command.set_defaults(func=getattr(module, func))

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
