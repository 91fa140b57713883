"""The Python parts of ``benchmarks/gpu_check.sh``: CUDA against CPU logits, and a profile of one training step.

    python benchmarks/gpu_check.py parity  --out DIR [--device cuda] [--models dat_tiny eapt_small datpp_tiny]
    python benchmarks/gpu_check.py profile --out DIR [--device cuda] [--model dat_tiny] [--batch 128]

``parity`` builds each model with the same seed on the CPU and on the device, in eval mode and fp32
(TF32 off), and prints the largest absolute and relative difference of their logits on one batch
(and under bf16 autocast, where the device has it). ``profile`` runs ``--steps`` timed training steps
(forward, cross-entropy, backward, AdamW) under ``torch.profiler`` after warm-up and prints the
operators and kernels that take the most device time, with their share of the step, and what each
is for where a deformvit layer is known to cause it. Both write their table to ``--out``.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src'))
from deformvit.runtime import autocast_context, autocast_dtype, resolve_device  # noqa: E402
from deformvit.tasks import create_model  # noqa: E402

# what the heavy operators of a DAT / EAPT step do (substrings of operator or kernel names)
PURPOSE = (
    ('grid_sampler', 'deformable sampling of keys/values (DAT, DAT++) and of the position bias table'),
    ('scaled_dot_product', 'fused attention (local, shift-window, neighborhood and deformable blocks)'),
    ('flash', 'fused attention kernel'),
    ('efficient_attention', 'fused attention kernel'),
    ('gemm', 'matrix products: qkv / projections / MLP'),
    ('addmm', 'linear layers: qkv / projections / MLP'),
    ('mm', 'matrix products'),
    ('conv', 'offset network (depthwise conv), stem and downsampling'),
    ('layer_norm', 'LayerNorm (blocks, offset network)'),
    ('softmax', 'attention softmax (explicit path and CPU fast paths)'),
    ('copy', 'layout changes (window partition, permutes, contiguous)'),
    ('gelu', 'MLP activation'),
    ('adam', 'optimizer step'),
    ('elementwise', 'element-wise arithmetic'),
    ('reduce', 'reductions'),
)


def purpose(name: str) -> str:
    lowered = name.lower()
    return next((text for key, text in PURPOSE if key in lowered), '')


def parity(args) -> list:
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lines = [f'# CUDA against CPU logits (fp32, TF32 off; batch {args.batch}, {args.size}x{args.size}; '
             f'torch {torch.__version__})', '', '| model | precision | max abs diff | max rel diff |',
             '| --- | --- | ---: | ---: |']
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        with torch.no_grad():
            reference = model(x)
            on_device = model.to(device)
            precisions = ['fp32'] + (['bf16'] if autocast_dtype('bf16', device) is not None else [])
            for precision in precisions:
                with autocast_context(device, autocast_dtype(precision, device))():
                    out = on_device(x.to(device)).float().cpu()
                diff = (out - reference).abs().max().item()
                rel = diff / reference.abs().max().item()
                lines.append(f'| {name} | {precision} | {diff:.3g} | {rel:.3g} |')
        del model, on_device
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return lines


def profile(args) -> list:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    device = resolve_device(args.device)
    model = create_model(args.model).to(device).train(args.mode == 'train')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = autocast_dtype(args.precision, device)
    autocast = autocast_context(device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, model.num_classes, (args.batch,), device=device)

    def step():
        if args.mode == 'infer':
            with torch.inference_mode(), autocast():
                model(x)
            return
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    for _ in range(args.warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    seconds = (time.perf_counter() - start) / args.steps
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    what = 'training step' if args.mode == 'train' else 'inference batch'
    lines = [f'# One {args.model} {what} on {device} ({args.precision}, batch {args.batch}, {args.size}x{args.size}, '
             f'{torch.get_num_threads()} threads; torch {torch.__version__}): {seconds * 1000:.1f} ms a step with '
             'the profiler on', '', '| operator or kernel | self time share | ms a step | what it is for |',
             '| --- | ---: | ---: | --- |']
    for event in events[:args.top]:
        value = getattr(event, key)
        lines.append(f'| `{event.key[:90]}` | {100 * value / total:.1f} % | {value / 1000 / args.steps:.2f} | '
                     f'{purpose(event.key)} |')
    sampling = sum(getattr(e, key) for e in events if 'grid_sampler' in e.key.lower())
    lines += ['', f'grid_sampler (deformable sampling and the sampled position bias), forward and backward: '
                  f'{100 * sampling / max(total, 1):.1f} % of the step']
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=('parity', 'profile'))
    parser.add_argument('--out', required=True, help='folder for the table (created)')
    parser.add_argument('--out-name', action='store_true', help='profile: name the table profile_<model>_<mode>.md')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--models', nargs='+', default=['dat_tiny', 'eapt_small', 'datpp_tiny'])
    parser.add_argument('--model', default='dat_tiny')
    parser.add_argument('--batch', type=int, help='default: 2 (parity), 128 (profile)')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--precision', default='bf16', choices=('fp32', 'bf16', 'fp16'))
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--mode', choices=('train', 'infer'), default='train',
                        help='profile: a training step (default) or inference')
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.what == 'parity' else 128)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = parity(args) if args.what == 'parity' else profile(args)
    os.makedirs(args.out, exist_ok=True)
    name = args.what if args.what == 'parity' else f'profile_{args.model}_{args.mode}' if args.out_name else 'profile'
    with open(os.path.join(args.out, f'{name}.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines), flush=True)


if __name__ == '__main__':
    main()
