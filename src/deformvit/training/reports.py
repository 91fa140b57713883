"""What a run shows and leaves behind: the progress bar, the per-epoch CSV and TensorBoard logs,
the metric curves and the closing summary (rank 0 only)."""
import csv
import os
from typing import Dict, List, Sequence

from ..errors import optional
from ..tasks import Task

__all__ = ['Logger', 'ProgressBar', 'plot_metrics', 'write_reports']


class Logger:
    """CSV and TensorBoard logs plus a summary line per epoch (rank 0 only)."""

    def __init__(self, folder: str, start_epoch: int, metrics: tuple):
        self.fields = ['epoch', 'train_loss', *metrics, 'lr', 'images_per_s', 'skipped', 'seconds']
        self.path = os.path.join(folder, 'metrics.csv')
        # a resumed run keeps the rows of checkpointed epochs and drops those of the interrupted one
        kept = self.rows(start_epoch - 1) if start_epoch and os.path.exists(self.path) else []
        with open(self.path, 'w', newline='') as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(kept)
        tensorboard = optional('torch.utils.tensorboard', 'Training (its TensorBoard logs)', package='tensorboard')
        self.tb = tensorboard.SummaryWriter(os.path.join(folder, 'tensorboard'))

    def log(self, row: Dict) -> None:
        with open(self.path, 'a', newline='') as f:
            csv.writer(f).writerow([row.get(k, '') for k in self.fields])
        if self.tb is not None:
            for key in self.fields[1:]:
                if row.get(key, '') != '':
                    self.tb.add_scalar(key, row[key], row['epoch'])
            self.tb.flush()

    def rows(self, until_epoch: int) -> List[Dict]:
        with open(self.path) as f:
            return [r for r in csv.DictReader(f) if int(r['epoch']) <= until_epoch]


class ProgressBar:
    """tqdm bar of one epoch, updated with loss, lr and images/s (shown on terminals only)."""

    def __init__(self, total: int, epoch: int, epochs: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=f'epoch {epoch + 1}/{epochs}', leave=False, dynamic_ncols=True,
                        disable=None)

    def report(self, loss: float, lr: float, images_per_s: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f'{loss:.3f}', lr=f'{lr:.2e}', img_s=f'{images_per_s:.0f}')

    def close(self) -> None:
        self.bar.close()


def plot_metrics(rows: List[Dict], metrics: Sequence[str], path: str) -> None:
    """Training loss and the evaluation ``metrics`` per epoch, from ``metrics.csv`` rows."""
    Figure = optional('matplotlib.figure', 'Training (its metrics.png)', package='matplotlib').Figure
    epochs = [int(r['epoch']) + 1 for r in rows]
    losses = [m for m in metrics if m.endswith('loss')]
    scores = [m for m in metrics if not m.endswith('loss')]
    fig = Figure(figsize=(10, 4))
    panels = zip(fig.subplots(1, 2), ('loss', '%'), ('Loss', 'Held-out metrics'), (
        [('train_loss', 'train')] + [(m, m.replace('_loss', '').replace('val', 'held out')) for m in losses],
        [(m, m) for m in scores]))
    for ax, unit, title, curves in panels:
        for key, label in curves:
            points = [(e, float(r[key])) for e, r in zip(epochs, rows) if r.get(key, '') != '']
            if points:
                ax.plot(*zip(*points), marker='.', label=label)
        ax.set(xlabel='epoch', ylabel=unit, title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_reports(folder: str, task: Task, metrics: Sequence[str], rows: List[Dict], evaluation,
                  classes: List[str]) -> None:
    """``metrics.png``, the task's figures, and the summary of a finished run naming every output."""
    plot_metrics(rows, metrics, os.path.join(folder, 'metrics.png'))
    lines = task.reports(folder, rows, evaluation, classes)
    print('\n'.join([
        *lines[:1],
        f'  weights:          {os.path.join(folder, "last.safetensors")} (best: best.safetensors)',
        f'  metrics:          {os.path.join(folder, "metrics.csv")}, {os.path.join(folder, "metrics.png")}',
        *lines[1:],
        f'  config:           {os.path.join(folder, "config.yaml")}; TensorBoard logs in {folder}/tensorboard']),
        flush=True)
