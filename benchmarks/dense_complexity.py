"""Parameters and MACs of the full detectors and segmentors, side by side with the papers.

DAT Tables 3-5 count detectors at 1280x800 and segmentors at 512x2048 with mmcv (modules
only: attention products are not counted); EAPT Table VI counts UperNet at 512x2048. Each
row gives ours in that convention (``modules``), the paper's figure, the difference, ours
with every product counted (``fvcore``) and where the MACs are (backbone / neck / head).

    python benchmarks/dense_complexity.py [--backbones dat_tiny eapt_small]
"""
import argparse
import sys

import torch

from deformvit.tasks import build_detector, build_segmentor
from deformvit.tools.complexity import count_parameters, framework_macs

# (backbone, framework): (GMACs, M params, source) as printed in the papers
PAPER = {
    ('dat_tiny', 'retinanet'): (253, 38, 'DAT Table 3'),
    ('dat_tiny', 'mask_rcnn'): (272, 48, 'DAT Table 4a'),
    ('dat_tiny', 'semantic_fpn'): (198, 32, 'DAT Table 5'),
    ('dat_tiny', 'upernet'): (957, 60, 'DAT Table 5'),
    ('eapt_small', 'upernet'): (1123, 76, 'EAPT Table VI'),
}


def rows(backbones, frameworks):
    for backbone in backbones:
        for framework in frameworks:
            if framework in ('retinanet', 'mask_rcnn'):
                model, size = build_detector(framework, backbone, 80), (800, 1280)
            else:
                model, size = build_segmentor(framework, backbone, 150), (512, 2048)
            modules, fvcore = (framework_macs(model, size, convention=c) for c in ('modules', 'fvcore'))
            yield dict(backbone=backbone, framework=framework, size=f'{size[1]}x{size[0]}',
                       params=count_parameters(model) / 1e6, macs=modules['total'] / 1e9,
                       fvcore=fvcore['total'] / 1e9, split=modules, paper=PAPER.get((backbone, framework)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--backbones', nargs='+', default=['dat_tiny', 'eapt_small'])
    parser.add_argument('--frameworks', nargs='+', default=['retinanet', 'mask_rcnn', 'semantic_fpn', 'upernet'])
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print('| backbone | framework | input | params (M) | paper params (M) | GMACs (modules) | paper GMACs | diff '
          '| GMACs (fvcore) | backbone / neck / head (modules) | source |')
    print('|---|---|---|---:|---:|---:|---:|---:|---:|---|---|')
    for r in rows(args.backbones, args.frameworks):
        paper = r['paper']
        diff = f"{(r['macs'] / paper[0] - 1) * 100:+.1f}%" if paper else '-'
        split = ' / '.join(f"{r['split'].get(k, 0) / 1e9:.1f}" for k in ('backbone', 'neck', 'head'))
        print(f"| {r['backbone']} | {r['framework']} | {r['size']} | {r['params']:.2f} | {paper[1] if paper else '-'} "
              f"| {r['macs']:.1f} | {paper[0] if paper else '-'} | {diff} | {r['fvcore']:.1f} | {split} "
              f"| {paper[2] if paper else 'not in the papers'} |", flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
