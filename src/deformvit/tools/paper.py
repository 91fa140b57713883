"""The rows of the papers' tables that deformvit builds, with the figures the papers print.

Each :class:`PaperRow` is one model or ablation row: the ``timm.create_model`` call that builds
it here and the paper's own numbers. ``deformvit profile --paper`` measures every row and
writes the comparison to ``docs/paper-tables.md``; ``deformvit bench --table8`` measures the
memory column of DAT Table 8.

Tables covered:

- DAT (Xia et al., CVPR 2022): Table 2 (ImageNet-1K models), Table 6 (geometric information),
  Table 7 (deformable attention per stage), Table 8 (Deformable-DETR attention, Appendix A),
  Table 9 (convolutional patch embedding, Appendix B).
- DAT++ (Xia et al. 2023): the ImageNet-1K models of the official release (`datpp_*`).
- EAPT: Table III (ImageNet-1K models), Table VII (component combinations), Table VIII
  (position encodings). Tables VII and VIII print accuracies only, no sizes. Table IV (detection
  frameworks on three backbones) is :data:`EAPT_TABLE_IV`, measured by ``benchmarks/dense_complexity.py``
  (sizes) and ``deformvit bench --detectors`` (speed).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ['EAPT_TABLE_IV', 'MEMORY', 'NOTES', 'PaperRow', 'ROWS', 'TABLE8_BATCH', 'TABLES', 'rows']

MEMORY = 'Memory (GB)'  # DAT Table 8's GPU memory of a forward pass at batch 64
TABLE8_BATCH = 64  # DAT Table 8: "a forward pass with a batch size of 64"


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper's table and the model call that reproduces it.

    Args:
        paper: ``'DAT'``, ``'DAT++'`` or ``'EAPT'``.
        table: the table as the paper numbers it (``'Table 6'``, ``'Table VII'``).
        label: the row as the paper prints it.
        model: registered model name.
        kwargs: keyword arguments of ``timm.create_model(model, **kwargs)``.
        input_size: input side the paper's figures are for.
        params: the paper's ``#Param`` in millions, if it prints one.
        flops: the paper's ``FLOPs`` in G (multiply-accumulates, fvcore's convention), if printed.
        reported: the paper's other columns (accuracy, memory, throughput), by column name.
    """
    paper: str
    table: str
    label: str
    model: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    params: Optional[float] = None
    flops: Optional[float] = None
    reported: Dict[str, float] = field(default_factory=dict)

    def create(self, **overrides):
        """The model of this row (``timm.create_model``), with ``overrides`` applied."""
        from ..tasks import create_model
        return create_model(self.model, **{**self.kwargs, **overrides})

    def call(self) -> str:
        """The row's model as a Python call, for tables and error messages."""
        args = [repr(self.model)] + [f'{k}={v!r}' for k, v in self.kwargs.items()]
        return f"create_model({', '.join(args)})"


_DDETR = dict(stage_spec=('LS', 'LS', 'LMLMLM', 'LM'))


def _dat(table: str, label: str, params: float, flops: float, top1: Optional[float] = None,
         model: str = 'dat_tiny', input_size: int = 224, **kwargs) -> PaperRow:
    reported = {} if top1 is None else {'Top-1': top1}
    return PaperRow('DAT', table, label, model, kwargs, input_size, params, flops, reported)


def _eapt_components(deformable: bool, endec: bool, mcmd: bool, top1: float, box_ap: float, miou: float) -> PaperRow:
    """EAPT Table VII: Comp.1 Deformable Attention, Comp.2 En-DeC, Comp.3 MCMD, on EAPT-S."""
    kwargs = {}
    if not deformable:
        kwargs['broaden_size'] = 0
    if not endec:
        kwargs['use_endec'] = False
    if not mcmd:
        kwargs['position_encoding'] = 'none'
    label = ' '.join(('+' if on else '-') + name for on, name in
                     ((deformable, 'Deformable'), (endec, 'En-DeC'), (mcmd, 'MCMD')))
    return PaperRow('EAPT', 'Table VII', label, 'eapt_small', kwargs,
                    reported={'Top-1': top1, 'AP box (Sparse R-CNN)': box_ap, 'mIoU (UperNet)': miou})


def _eapt_encoding(name: str, encoding: str, top1: float, box_ap: float, miou: float) -> PaperRow:
    """EAPT Table VIII: the position encoding of EAPT-S."""
    kwargs = {} if encoding == 'mcmd' else {'position_encoding': encoding}
    return PaperRow('EAPT', 'Table VIII', name, 'eapt_small', kwargs,
                    reported={'Top-1': top1, 'AP box': box_ap, 'mIoU': miou})


ROWS: Tuple[PaperRow, ...] = (
    # DAT Table 2: FLOPs (G), #Param (M), Top-1.
    _dat('Table 2', 'DAT-T', 29, 4.6, 82.0),
    _dat('Table 2', 'DAT-S', 50, 9.0, 83.7, model='dat_small'),
    _dat('Table 2', 'DAT-B', 88, 15.8, 84.0, model='dat_base'),
    _dat('Table 2', 'DAT-B 384', 88, 49.8, 84.8, model='dat_base_384', input_size=384),
    # DAT Table 6: attention of stages 1-2 (S: shift window, P: PVT's SRA), offsets, position embedding.
    _dat('Table 6', 'S, no offsets, no pos. embed', 28.29, 4.57, 81.4, use_offsets=False, position_bias='none'),
    _dat('Table 6', 'S, no offsets, relative', 28.32, 4.57, 81.7, use_offsets=False),
    _dat('Table 6', 'S, offsets, no pos. embed', 28.29, 4.58, 81.7, position_bias='none'),
    _dat('Table 6', 'S, offsets, fixed', 29.73, 4.58, 81.8, position_bias='fixed'),
    _dat('Table 6', 'S, offsets, DWConv', 28.31, 4.59, 81.8, position_bias='dwconv'),
    _dat('Table 6', 'P, offsets, relative', 30.68, 4.48, 81.7, stage_spec=('PP', 'PP', 'LDLDLD', 'LD')),
    _dat('Table 6', 'S, offsets, relative (DAT-T)', 28.32, 4.59, 82.0),
    # DAT Table 7: the stages with deformable attention.
    _dat('Table 7', 'stages 1-4', 28.39, 4.64, 81.7, deformable_stages=(0, 1, 2, 3)),
    _dat('Table 7', 'stages 2-4', 28.34, 4.60, 81.9, deformable_stages=(1, 2, 3)),
    _dat('Table 7', 'stages 3-4 (DAT-T)', 28.32, 4.59, 82.0),
    _dat('Table 7', 'stage 4', 28.29, 4.51, 81.4, deformable_stages=(3,)),
    _dat('Table 7', 'none (Swin-T)', 28.29, 4.51, 81.3, deformable_stages=()),
    # DAT Table 8: attention, keys in stages 3 / 4, FLOPs, #Param, memory (GB), Top-1.
    *(PaperRow('DAT', 'Table 8', label, 'dat_tiny', kwargs, 224, params, flops, {MEMORY: memory, 'Top-1': top1})
      for label, kwargs, params, flops, memory, top1 in (
          ('D-DETR, 16 / 16 keys', dict(_DDETR, ddetr_points=16), 27.95, 4.44, 13.9, 80.6),
          ('D-DETR, 49 / 49 keys', dict(_DDETR, ddetr_points=49), 31.15, 4.83, 18.8, 80.7),
          ('D-DETR, 196 / 49 keys', dict(_DDETR, ddetr_points=(16, 16, 196, 49)), 37.26, 6.16, 37.9, 79.2),
          ('DAT, 49 / 49 keys', dict(offset_stride=(4, 2, 2, 1)), 28.32, 4.38, 12.5, 81.8),
          ('DAT, 196 / 49 keys (DAT-T)', {}, 28.32, 4.59, 14.4, 82.0))),
    # DAT Table 9 (Appendix B): convolutional patch embeddings.
    _dat('Table 9', 'DAT-T*', 30, 4.8, 82.7, conv_patch_embed=True),
    # DAT++ (Xia et al. 2023), ImageNet-1K models as the release publishes them: #Param (M), FLOPs (G), top-1;
    # DAT-B++ is published with its accuracy only.
    *(PaperRow('DAT++', 'ImageNet-1K', label, model, {}, size, params, flops, {'Top-1': top1})
      for label, model, size, params, flops, top1 in (
          ('DAT-T++', 'datpp_tiny', 224, 24, 4.3, 83.9),
          ('DAT-S++', 'datpp_small', 224, 53, 9.4, 84.6),
          ('DAT-B++', 'datpp_base', 224, None, None, 84.9),
          ('DAT-B++ 384', 'datpp_base_384', 384, None, None, 85.9))),
    # EAPT Table III: #param (M), FLOPs (G), V100 throughput (images/s), top-1.
    *(PaperRow('EAPT', 'Table III', label, model, {}, size, params, flops, {'Throughput (V100)': speed, 'Top-1': top1})
      for label, model, size, params, flops, speed, top1 in (
          ('EAPT-S', 'eapt_small', 224, 39, 6.5, 695.2, 82.9),
          ('EAPT-M', 'eapt_medium', 224, 107, 18.3, 242.6, 84.6),
          ('EAPT-M 384', 'eapt_medium_384', 384, 116, 53.6, 75.3, 86.1))),
    # EAPT Table VII, in the paper's row order.
    _eapt_components(True, True, True, 82.9, 48.9, 47.7),
    _eapt_components(True, True, False, 81.9, 48.5, 47.3),
    _eapt_components(True, False, True, 81.7, 47.6, 46.6),
    _eapt_components(False, True, True, 81.8, 48.1, 47.9),
    _eapt_components(True, False, False, 81.2, 47.4, 45.9),
    _eapt_components(False, True, False, 81.6, 47.9, 47.5),
    _eapt_components(False, False, True, 81.0, 47.3, 46.0),
    _eapt_components(False, False, False, 80.6, 46.8, 45.7),
    # EAPT Table VIII.
    _eapt_encoding('Sinusoidal', 'sinusoidal', 81.6, 47.8, 46.4),
    _eapt_encoding('Embedding', 'embedding', 81.6, 48.0, 46.5),
    _eapt_encoding('Relative', 'relative', 81.8, 48.2, 46.7),
    _eapt_encoding('FLOATER', 'floater', 81.9, 48.2, 46.8),
    _eapt_encoding('MCMD', 'mcmd', 82.9, 48.9, 47.7),
)

# EAPT Table IV: (detector, backbone) -> the paper's COCO box AP, AP50, AP75, #param (M), FLOPs (G, at
# 1280x800) and FPS (frames per second on one GPU). The EAPT-S RepPoints v2 row prints AP50 59.9 below its
# AP of 51.3, which cannot be (AP50 >= AP): a misprint, kept as printed.
EAPT_TABLE_IV: Dict[Tuple[str, str], Dict[str, float]] = {
    (detector, backbone): dict(box_ap=ap, box_ap50=ap50, box_ap75=ap75, params=params, flops=flops, fps=fps)
    for detector, backbone, ap, ap50, ap75, params, flops, fps in (
        ('cascade_mask_rcnn', 'resnet50', 46.3, 64.3, 50.5, 82, 739, 18.0),
        ('cascade_mask_rcnn', 'swin_tiny_patch4_window7_224', 50.5, 69.3, 54.9, 86, 745, 15.3),
        ('cascade_mask_rcnn', 'eapt_small', 51.8, 70.4, 56.2, 93, 771, 13.7),
        ('atss', 'resnet50', 43.5, 61.9, 47.0, 32, 205, 28.3),
        ('atss', 'swin_tiny_patch4_window7_224', 47.2, 66.5, 51.3, 36, 215, 22.3),
        ('atss', 'eapt_small', 48.3, 67.9, 52.6, 42, 236, 19.7),
        ('reppoints_v2', 'resnet50', 46.5, 64.6, 50.3, 42, 274, 13.6),
        ('reppoints_v2', 'swin_tiny_patch4_window7_224', 50.0, 68.5, 54.2, 45, 283, 12.0),
        ('reppoints_v2', 'eapt_small', 51.3, 59.9, 55.7, 53, 301, 10.1),
        ('sparse_rcnn', 'resnet50', 44.5, 63.4, 48.2, 106, 166, 21.0),
        ('sparse_rcnn', 'swin_tiny_patch4_window7_224', 47.9, 67.3, 52.3, 110, 172, 18.4),
        ('sparse_rcnn', 'eapt_small', 48.9, 68.6, 54.1, 129, 201, 15.9))}

TABLES: Tuple[Tuple[str, str], ...] = tuple(dict.fromkeys((row.paper, row.table) for row in ROWS))

# What a reader of the measured tables needs to know about the gaps, by table.
NOTES: Dict[Tuple[str, str], str] = {
    ('DAT', 'Table 2'): 'The table rounds parameters to whole millions: the 29M of DAT-T is the 28.32M of Tables 6-8.',
    ('DAT', 'Table 7'): 'The paper says it also counted the relative position indices and reference grids as '
                        'parameters; ours counts parameters only and still agrees to 0.01M.',
    ('DAT', 'Table 8'): 'The three D-DETR rows are 0.19M under the paper at every number of keys, so the gap does '
                        'not come from the sampling-offset or attention-weight projections, which grow with K; the '
                        'paper does not describe what else its variant holds. Our memory is the peak of a forward pass '
                        'at batch 64 with autograd recording, counted on the meta device as `deformvit bench '
                        '--table8` does; ours are GiB of tensor storage, about 0.6x the paper\'s GPU figures across '
                        'the rows, so compare the ratios to DAT-T (docs/benchmarks.md).',
    ('DAT++', 'ImageNet-1K'): 'Neighborhood attention counts as its two products over each query\'s 49 '
                              'neighbours (docs/datpp.md); DAT-B++ is published with its accuracy only.',
    ('EAPT', 'Table III'): 'The MLP ratios (3.5 for EAPT-S, 4.75 for EAPT-M) are solved from this table; the '
                           'arithmetic and the 384 growth are in docs/eapt.md. The V100 throughput is the paper\'s; '
                           '`deformvit bench` measures ours against timm\'s Swin-T in one run.',
    ('EAPT', 'Table VII'): 'Removing the Deformable Attention removes the offset networks, removing En-DeC its '
                           'encoder and decoder; MCMD has no parameters and no multiply-accumulates in fvcore\'s '
                           'convention (its Gaussians are element-wise), so rows that differ only in MCMD are equal.',
    ('EAPT', 'Table VIII'): 'Embedding is a learned table per block; Relative a per-head bias table; FLOATER runs '
                            'its ODE network at every position of every block (one RK4 step per position), '
                            'hence its extra GMACs. Readings in docs/eapt.md.',
}


def rows(paper: Optional[str] = None, table: Optional[str] = None) -> List[PaperRow]:
    """The rows of one paper and/or table, in the papers' order.

    Raises:
        ValueError: a paper or table that is not covered.
    """
    if paper is not None and paper not in {p for p, _ in TABLES}:
        raise ValueError(f"unknown paper {paper!r}; expected one of {sorted({p for p, _ in TABLES})}")
    found = [row for row in ROWS if (paper is None or row.paper == paper) and (table is None or row.table == table)]
    if table is not None and not found:
        known = ', '.join(f'{p} {t}' for p, t in TABLES)
        raise ValueError(f'no rows for {table!r}' + (f' of {paper}' if paper else '') + f'; covered: {known}')
    return found
