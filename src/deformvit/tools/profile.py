"""Parameters and multiply-accumulates of any model, per stage, and against the papers' tables.

    deformvit profile dat_tiny eapt_small                  # per stage, at each model's input size
    deformvit profile dat_tiny --size 512 768 --depth 2    # any input size; blocks too
    deformvit profile --paper                               # every paper row; writes docs/paper-tables.md

MACs follow fvcore's convention (``--convention modules`` gives mmcv's, see
``deformvit.tools.complexity``). ``--paper`` measures every model and ablation row of DAT Tables 2 and
6-9 and EAPT Tables III, VII and VIII that deformvit builds (``deformvit.tools.paper``), prints the
paper's figure, ours and the difference, and writes the same tables to a markdown file.
"""
import datetime
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import fast_paths
from .complexity import count_macs, count_parameters
from .memory import GIB, peak_forward_memory
from .paper import MEMORY, NOTES, ROWS, TABLE8_BATCH, TABLES, PaperRow

__all__ = ['PAPER_TABLES_PATH', 'measure_rows', 'module_profile', 'paper_markdown', 'profile_markdown',
           'select_rows']

PAPER_TABLES_PATH = os.path.join('docs', 'paper-tables.md')

_CAPTIONS = {
    ('DAT', 'Table 2'): 'ImageNet-1K models',
    ('DAT', 'Table 6'): 'geometric information: attention of stages 1-2, offsets, position embedding',
    ('DAT', 'Table 7'): 'deformable attention in different stages',
    ('DAT', 'Table 8'): 'Deformable-DETR attention in place of deformable attention (Appendix A)',
    ('DAT', 'Table 9'): 'convolutional patch embeddings (Appendix B)',
    ('DAT++', 'ImageNet-1K'): 'the models of the official release (LeapLabTHU/DAT, 2023)',
    ('EAPT', 'Table III'): 'ImageNet-1K models',
    ('EAPT', 'Table VII'): 'component combinations on EAPT-S (the paper prints accuracies only)',
    ('EAPT', 'Table VIII'): 'position encodings of EAPT-S (the paper prints accuracies only)',
}


def _units(name: str) -> List[str]:
    """``'stages.0.blocks.1.attn'`` -> ``['stages.0', 'blocks.1', 'attn']``: indices stay with their list."""
    units: List[str] = []
    for part in name.split('.'):
        if part.isdigit() and units:
            units[-1] += '.' + part
        else:
            units.append(part)
    return units


def module_profile(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        depth: int = 1,
        convention: str = 'fvcore',
) -> Tuple[List[Dict], int, int]:
    """Parameters and MACs of a model's parts, for one ``(1, *input_size)`` forward pass.

    Args:
        model: any ``nn.Module`` taking an image batch.
        input_size: ``(C, H, W)``.
        depth: how far to split: 1 gives the top-level parts with list entries kept apart
            (``stem``, ``stages.0`` ... ``stages.3``, ``norm``, ``head``); 2 splits those
            (``stages.2.blocks.1``), and so on.
        convention: MAC convention, ``'fvcore'`` or ``'modules'``.

    Returns:
        ``(parts, total_params, total_macs)``; each part is ``dict(name, params, macs)``, in the
        model's module order, leaving out parts with neither (pooling, dropout). Parameters held
        by no listed part and MACs of functions called outside them appear as a final
        ``'(other)'`` part, so the parts add up to the totals.
    """
    if depth < 1:
        raise ValueError(f'depth must be at least 1, got {depth}')
    total_macs, per_module = count_macs(model, tuple(input_size), by_module=True, convention=convention)
    modules = dict(model.named_modules())
    names = list(dict.fromkeys('.'.join(_units(name)[:depth]) for name in modules if name))
    # A container whose entries are listed (``stages`` beside ``stages.0``) would be counted twice.
    names = [n for n in names if n in modules and not any(m.startswith(n + '.') for m in names)]
    parts = [dict(name=n, params=count_parameters(modules[n]), macs=per_module.get(n, 0)) for n in names]
    parts = [p for p in parts if p['params'] or p['macs']]  # pooling, dropout, flatten
    total_params = count_parameters(model)
    other_params = total_params - sum(p['params'] for p in parts)
    other_macs = total_macs - sum(p['macs'] for p in parts)
    if other_params or other_macs:
        parts.append(dict(name='(other)', params=other_params, macs=other_macs))
    return parts, total_params, total_macs


def profile_markdown(name: str, parts: List[Dict], total_params: int, total_macs: int,
                     input_size: Sequence[int], convention: str) -> str:
    """One model's :func:`module_profile` as a markdown table."""
    lines = [f'### {name}: {total_params / 1e6:.2f}M parameters, {total_macs / 1e9:.3f} GMACs '
             f'at {input_size[1]}x{input_size[2]} ({convention})', '',
             '| part | params (M) | params % | GMACs | MACs % |', '| --- | ---: | ---: | ---: | ---: |']
    for part in parts:
        lines.append(f"| {part['name']} | {part['params'] / 1e6:.3f} | {100 * part['params'] / max(total_params, 1):.1f} "
                     f"| {part['macs'] / 1e9:.3f} | {100 * part['macs'] / max(total_macs, 1):.1f} |")
    lines.append(f'| total | {total_params / 1e6:.3f} | 100.0 | {total_macs / 1e9:.3f} | 100.0 |')
    return '\n'.join(lines)


def _table8_memory(model: nn.Module, input_size: int) -> float:
    """GiB at the peak of DAT Table 8's forward pass: batch 64, autograd recording (meta device), with
    the fast paths off as in :func:`deformvit.tools.bench.table8_memory`."""
    model = model.to('meta').train()
    with fast_paths(False):
        return peak_forward_memory(model, (TABLE8_BATCH, 3, input_size, input_size), 'meta', grad=True) / GIB


def measure_rows(rows: Sequence[PaperRow], progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Parameters and fvcore MACs of every row's model at the row's input size.

    Rows that report a memory column (DAT Table 8) also get the peak memory of their forward
    pass, measured as ``deformvit bench --table8`` does (``memory``, GiB; None for other rows).
    Rows that build the same model are measured once. Returns one
    ``dict(row, params, macs, memory)`` per row, in order.
    """
    measured: Dict[Tuple, Tuple[int, int, Optional[float]]] = {}
    results = []
    for row in rows:
        wants_memory = MEMORY in row.reported
        key = (row.model, repr(sorted(row.kwargs.items())), row.input_size, wants_memory)
        if key not in measured:
            start = time.perf_counter()
            model = row.create()
            params, macs = count_parameters(model), count_macs(model, (3, row.input_size, row.input_size))
            memory = _table8_memory(model, row.input_size) if wants_memory else None
            measured[key] = (params, macs, memory)
            del model
            if progress:
                extra = '' if memory is None else f', {memory:.2f} GiB'
                progress(f'{row.paper} {row.table} {row.label}: {params / 1e6:.2f}M, {macs / 1e9:.3f} GMACs'
                         f'{extra} ({time.perf_counter() - start:.1f} s)')
        params, macs, memory = measured[key]
        results.append(dict(row=row, params=params, macs=macs, memory=memory))
    return results


def _diff(ours: float, paper: Optional[float]) -> str:
    if paper is None:
        return ''
    percent = 100 * (ours - paper) / paper
    return '0.0 %' if abs(percent) < 0.05 else f'{percent:+.1f} %'


def _number(value: float) -> str:
    return str(value)


def _table_markdown(results: List[Dict]) -> List[str]:
    """One table: rows with the paper's sizes compare against them; rows without (EAPT Tables
    VII and VIII) compare against the table's default model, the row built with no arguments."""
    reported = list(dict.fromkeys(k for r in results for k in r['row'].reported))
    has_paper = any(r['row'].params is not None for r in results)
    reference = next((r for r in results if not r['row'].kwargs), None)
    head = ['row', 'model', 'params (M), paper', 'ours', 'diff', 'GFLOPs, paper', 'ours (GMACs)', 'diff']
    if not has_paper:
        head = ['row', 'model', 'params (M)', 'vs default', 'GMACs', 'vs default']
    memory_reference = reference if reference is not None and reference.get('memory') else None
    for k in reported:
        head.append(f'{k}, paper')
        if k == MEMORY and memory_reference is not None:
            head += ['memory (GiB), ours', 'memory vs default, paper', 'ours']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * 2 + ' ---: |' * (len(head) - 2)]
    for r in results:
        row, params, macs = r['row'], r['params'] / 1e6, r['macs'] / 1e9
        cells = [row.label, f'`{row.call()}`']
        if has_paper:
            cells += ['' if row.params is None else _number(row.params), f'{params:.2f}', _diff(params, row.params),
                      '' if row.flops is None else _number(row.flops), f'{macs:.3f}', _diff(macs, row.flops)]
        else:
            ref_params, ref_macs = reference['params'] / 1e6, reference['macs'] / 1e9
            cells += [f'{params:.2f}', f'{params - ref_params:+.2f}', f'{macs:.3f}', f'{macs - ref_macs:+.3f}']
        for k in reported:
            cells.append(_number(row.reported[k]) if k in row.reported else '')
            if k == MEMORY and memory_reference is not None:
                paper_ref = memory_reference['row'].reported.get(MEMORY)
                memory = r.get('memory')
                cells += ['' if memory is None else f'{memory:.2f}',
                          f'{row.reported[MEMORY] / paper_ref:.2f}x' if MEMORY in row.reported and paper_ref else '',
                          '' if memory is None else f"{memory / memory_reference['memory']:.2f}x"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def paper_markdown(results: List[Dict], command: str = 'deformvit profile --paper') -> str:
    """All measured rows as markdown, one section per paper table."""
    lines = [
        '# The papers\' tables, measured',
        '',
        f'Generated by `{command}` on {datetime.date.today().isoformat()} with torch {torch.__version__}; '
        'do not edit by hand.',
        '',
        'Parameters are counted by `deformvit.count_parameters` and FLOPs as multiply-accumulates in '
        'fvcore\'s convention (`deformvit.count_macs`), the convention of both papers\' '
        'classification tables. "diff" is (ours - paper) / paper. The papers round to their last '
        'printed digit. The model column is the `timm.create_model` call that builds the row '
        '(after `import deformvit`); "vs default" compares with the table\'s row built with no '
        'arguments (the paper\'s full model).',
    ]
    by_table: Dict[Tuple[str, str], List[Dict]] = {}
    for r in results:
        by_table.setdefault((r['row'].paper, r['row'].table), []).append(r)
    for (paper, table), table_results in by_table.items():
        lines += ['', f'## {paper} {table}: {_CAPTIONS[(paper, table)]}', '']
        lines += _table_markdown(table_results)
        if (paper, table) in NOTES:
            lines += ['', NOTES[(paper, table)]]
    return '\n'.join(lines) + '\n'


def select_rows(tables: Optional[List[str]]) -> List[PaperRow]:
    """The rows of ``--table`` choices such as ``'Table 6'`` or ``'EAPT Table VII'`` (all rows if none)."""
    if not tables:
        return list(ROWS)
    papers = {paper for paper, _ in TABLES}
    selected: List[PaperRow] = []
    for spec in tables:
        words = spec.split()
        paper = words.pop(0).upper() if words and words[0].upper() in papers else None
        chosen = [(p, t) for p, t in TABLES if t.lower() == ' '.join(words).lower() and paper in (None, p)]
        if not chosen:
            known = ', '.join(f'"{p} {t}"' for p, t in TABLES)
            raise ValueError(f'--table {spec!r} is not a covered table; expected one of {known}')
        selected += [row for row in ROWS if (row.paper, row.table) in chosen and row not in selected]
    return selected
