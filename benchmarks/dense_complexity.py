"""Parameters and MACs of the full detectors and segmentors, side by side with the papers.

DAT Tables 3-5 count detectors at 1280x800 and segmentors at 512x2048 with mmcv (modules
only: attention products are not counted); EAPT Tables IV-V count detectors (Cascade Mask R-CNN,
HTC++) and Table VI UperNet at 512x2048. Each
row gives ours in that convention (``modules``), the paper's figure, the difference, ours
with every product counted (``fvcore``) and where the MACs are (backbone / neck / head).

    python benchmarks/dense_complexity.py [--backbones dat_tiny eapt_small]
    python benchmarks/dense_complexity.py --cascades      # the Cascade Mask R-CNN and HTC++ rows
    python benchmarks/dense_complexity.py --table4        # EAPT Table IV: four frameworks x R-50, Swin-T, EAPT-S
"""
import argparse
import sys

import torch

from deformvit.tasks import DETECTORS, build_detector, build_segmentor
from deformvit.tools.complexity import count_parameters, framework_macs
from deformvit.tools.paper import EAPT_TABLE_IV

# (backbone, framework): (GMACs, M params, source) as printed in the papers
PAPER = {
    ('dat_tiny', 'retinanet'): (253, 38, 'DAT Table 3'),
    ('dat_tiny', 'mask_rcnn'): (272, 48, 'DAT Table 4a'),
    ('dat_tiny', 'semantic_fpn'): (198, 32, 'DAT Table 5'),
    ('dat_tiny', 'upernet'): (957, 60, 'DAT Table 5'),
    ('eapt_small', 'upernet'): (1123, 76, 'EAPT Table VI'),
    ('dat_tiny', 'cascade_mask_rcnn'): (750, 86, 'DAT Table 4b'),
    ('dat_small', 'cascade_mask_rcnn'): (857, 107, 'DAT Table 4b'),
    ('dat_base', 'cascade_mask_rcnn'): (1003, 145, 'DAT Table 4b'),
    ('swin_tiny_patch4_window7_224', 'cascade_mask_rcnn'): (745, 86, 'DAT Table 4b, EAPT Table IV'),
    ('resnet50', 'cascade_mask_rcnn'): (739, 82, 'EAPT Table IV'),
    ('eapt_small', 'cascade_mask_rcnn'): (771, 93, 'EAPT Table IV'),
    ('swin_base_patch4_window7_224', 'htc++'): (1043, 160, 'EAPT Table V (Swin-B HTC++)'),
    ('eapt_medium', 'htc++'): (1183, 182, 'EAPT Table V (EAPT-M HTC+++)'),
}
PAPER.update({(backbone, detector): (row['flops'], row['params'], 'EAPT Table IV')
              for (detector, backbone), row in EAPT_TABLE_IV.items() if (backbone, detector) not in PAPER})
TABLE_IV_ROWS = [(backbone, detector) for detector, backbone in EAPT_TABLE_IV]
CASCADE_ROWS = [(backbone, framework) for backbone, framework in PAPER if framework in ('cascade_mask_rcnn', 'htc++')]


def rows(pairs):
    for backbone, framework in pairs:
        if framework in DETECTORS:
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
    parser.add_argument('--cascades', action='store_true',
                        help='the Cascade Mask R-CNN and HTC++ rows of DAT Table 4b and EAPT Tables IV-V instead')
    parser.add_argument('--table4', action='store_true',
                        help='the twelve rows of EAPT Table IV (Cascade Mask R-CNN, ATSS, RepPoints v2, Sparse R-CNN '
                             'on R-50, Swin-T and EAPT-S) instead')
    args = parser.parse_args(argv)
    pairs = (TABLE_IV_ROWS if args.table4 else CASCADE_ROWS if args.cascades
             else [(b, f) for b in args.backbones for f in args.frameworks])
    torch.set_grad_enabled(False)
    print('| backbone | framework | input | params (M) | paper params (M) | GMACs (modules) | paper GMACs | diff '
          '| GMACs (fvcore) | backbone / neck / head (modules) | source |')
    print('|---|---|---|---:|---:|---:|---:|---:|---:|---|---|')
    for r in rows(pairs):
        paper = r['paper']
        diff = f"{(r['macs'] / paper[0] - 1) * 100:+.1f}%" if paper else '-'
        split = ' / '.join(f"{r['split'].get(k, 0) / 1e9:.1f}" for k in ('backbone', 'neck', 'head'))
        print(f"| {r['backbone']} | {r['framework']} | {r['size']} | {r['params']:.2f} | {paper[1] if paper else '-'} "
              f"| {r['macs']:.1f} | {paper[0] if paper else '-'} | {diff} | {r['fvcore']:.1f} | {split} "
              f"| {paper[2] if paper else 'not in the papers'} |", flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
