"""``deformvit convert`` and ``deformvit count``: official weights to safetensors, and a model's size."""
import argparse

from ..tasks import create_model
from ..tools.complexity import count_macs, count_parameters
from ..tools.convert import convert_checkpoint
from .common import add_command, positive_int

__all__ = ['register']


def convert(args: argparse.Namespace) -> str:
    name = convert_checkpoint(args.src, args.dst, args.model, weights_only=not args.trust_pickle)
    print(f'wrote {args.dst} ({name}); load it with timm.create_model({name!r}, pretrained=True, '
          f'pretrained_cfg_overlay=dict(file={args.dst!r}))')
    return name


def count(args: argparse.Namespace) -> None:
    model = create_model(args.model)
    size = args.size or model.pretrained_cfg['input_size'][-1]
    print(f'{args.model}: {count_parameters(model) / 1e6:.2f}M parameters, '
          f'{count_macs(model, (3, size, size)) / 1e9:.2f} GMACs at {size}x{size}')


def register(commands) -> None:
    parser = add_command(commands, 'convert', 'official DAT checkpoint -> deformvit .safetensors', convert)
    parser.add_argument('src', help='official release file ({"model": state_dict})')
    parser.add_argument('dst', help='output .safetensors file')
    parser.add_argument('--model', help='model name (default: inferred from the weights)')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow pickled Python objects in SRC (training checkpoints); only for trusted files')

    parser = add_command(commands, 'count', 'parameters and MACs (fvcore convention)', count)
    parser.add_argument('model')
    parser.add_argument('--size', type=positive_int, help='input side (default: the model\'s input size)')
