"""Times of 2D neighborhood attention: the one-query-at-a-time oracle against the fast paths.

At DAT++-T-like sizes (stage 1-3 of a 224 classifier, 64 / 128 / 256 channels with 2 / 4 / 8
heads, kernel 7) and one detector-like stage-1 map (100x160), times
:func:`deformvit.layers.neighborhood_attention_reference` and the three methods of
:func:`deformvit.layers.neighborhood_attention` (``dense``: masked attention over the whole map,
only up to ``--dense-max-tokens``; ``neighborhood``: the gather; ``tiled``: query tiles against
key regions), and prints which one the fast path picks and its speed-up over the oracle.

    python benchmarks/neighborhood_attention.py                        # one thread, forward
    python benchmarks/neighborhood_attention.py --threads 2 --repeats 7 --backward
    python benchmarks/neighborhood_attention.py --threads 2 --batch 16 --no-reference --sizes 56x56:64:2:7 28x28:128:4:7
    python benchmarks/neighborhood_attention.py --device cuda --backward
    python benchmarks/neighborhood_attention.py --sizes 200x320:64:2:7 --no-reference --dense-max-tokens 0

Each row also gives the largest difference between the fast path's output and the oracle's
(same device and dtype) and, on CUDA, the fast path's peak memory.
"""
import argparse
import statistics
import time
from typing import Callable, Optional, Tuple

import torch

from deformvit.layers.neighborhood import (
    neighborhood_attention,
    neighborhood_attention_method,
    neighborhood_attention_reference,
)

# (height, width, channels, heads, kernel)
SIZES = [
    (56, 56, 64, 2, 7),
    (28, 28, 128, 4, 7),
    (14, 14, 256, 8, 7),
    (100, 160, 64, 2, 7),
]


def measure(run: Callable[[], torch.Tensor], repeats: int, backward: bool, device: torch.device) -> float:
    """Median milliseconds of ``run`` (and of the backward of its sum when ``backward``), after one warm-up."""
    def once() -> float:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if backward:
            run().float().sum().backward()
        else:
            with torch.no_grad():
                run()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    once()
    return statistics.median(once() for _ in range(repeats))


def peak_mib(run: Callable[[], torch.Tensor], backward: bool, device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one ``run`` (and backward) above what was allocated before, or None off CUDA."""
    if device.type != 'cuda':
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if backward:
        run().float().sum().backward()
    else:
        with torch.no_grad():
            run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def parse_size(text: str) -> Tuple[int, int, int, int, int]:
    """``'HxW:C:heads:k'`` -> ``(H, W, C, heads, k)``."""
    try:
        size, channels, heads, kernel = text.split(':')
        height, width = size.split('x')
        return int(height), int(width), int(channels), int(heads), int(kernel)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HxW:channels:heads:kernel, e.g. 56x56:64:2:7, got {text!r}")


def row(height, width, channels, heads, kernel, args, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, heads, height, width, channels // heads)

    def tensor(*size):
        return torch.randn(*size, generator=generator).to(device, args.dtype).requires_grad_(args.backward)

    q, k, v = tensor(*shape), tensor(*shape), tensor(*shape)
    q = q.detach().mul(shape[-1] ** -0.5).requires_grad_(args.backward)  # scaled, as the module does
    rpb = tensor(heads, 2 * kernel - 1, 2 * kernel - 1)

    def fast(method: Optional[str] = None) -> Callable[[], torch.Tensor]:
        return lambda: neighborhood_attention(q, k, v, rpb, kernel, method=method)

    def oracle() -> torch.Tensor:
        return neighborhood_attention_reference(q, k, v, rpb, kernel)

    tokens = height * width
    picked = neighborhood_attention_method((height, width), kernel, device)
    result = dict(size=f'{height}x{width}', channels=channels, heads=heads, kernel=kernel, picked=picked,
                  reference=None, difference=None, speedup=None)
    result['dense'] = measure(fast('dense'), args.repeats, args.backward, device) \
        if tokens <= args.dense_max_tokens else None
    result['gather'] = measure(fast('neighborhood'), args.repeats, args.backward, device)
    result['tiled'] = measure(fast('tiled'), args.repeats, args.backward, device)
    result['peak'] = peak_mib(fast(), args.backward, device)
    if args.reference:
        result['reference'] = measure(oracle, max(1, args.reference_repeats), args.backward, device)
        with torch.no_grad():
            result['difference'] = (fast()() - oracle()).abs().max().item()
        picked_ms = result[{'dense': 'dense', 'tiled': 'tiled'}.get(picked, 'gather')]
        result['speedup'] = None if picked_ms is None else result['reference'] / picked_ms
    return result


def cell(value: Optional[float], spec: str, unit: str = '') -> str:
    return '-' if value is None else format(value, spec) + unit


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=1, help='torch.set_num_threads (CPU)')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs of the fast paths (median)')
    parser.add_argument('--reference-repeats', type=int, default=1,
                        help='timed runs of the oracle (slow: 100x160 takes seconds)')
    parser.add_argument('--no-reference', dest='reference', action='store_false', help='skip the oracle')
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=SIZES, metavar='HxW:C:heads:k',
                        help='maps to time (default: the DAT++-like sizes above)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--backward', action='store_true', help='time forward + backward instead of forward')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--dense-max-tokens', type=int, default=4096,
                        help='skip the dense method above this many tokens (its memory is quadratic)')
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    what = 'forward + backward' if args.backward else 'forward'
    print(f'{what}, batch {args.batch}, {args.dtype}, {device}, {torch.get_num_threads()} thread(s); '
          f'median ms of {args.repeats} (oracle: {args.reference_repeats})')
    header = ['map', 'C', 'heads', 'k', 'reference ms', 'dense ms', 'neighborhood ms', 'tiled ms', 'fast path',
              'speed-up', 'max diff', 'peak MiB']
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '|'.join(' --- ' for _ in header) + '|')
    for height, width, channels, heads, kernel in args.sizes:
        r = row(height, width, channels, heads, kernel, args, device)
        print(f"| {r['size']} | {r['channels']} | {r['heads']} | {r['kernel']} | {cell(r['reference'], '.1f')} "
              f"| {cell(r['dense'], '.2f')} | {cell(r['gather'], '.2f')} | {cell(r['tiled'], '.2f')} | {r['picked']} "
              f"| {cell(r['speedup'], '.0f', 'x')} | {cell(r['difference'], '.1e')} | {cell(r['peak'], '.0f')} |")


if __name__ == '__main__':
    main()
