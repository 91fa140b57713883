"""Figures of a training run: metric curves and the confusion matrix (PNG, matplotlib)."""
from typing import Dict, List, Sequence

import numpy as np

__all__ = ['plot_confusion_matrix', 'plot_metrics']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_metrics(rows: List[Dict], metrics: Sequence[str], path: str) -> None:
    """Training loss and the evaluation ``metrics`` per epoch, from ``metrics.csv`` rows."""
    plt = _pyplot()
    epochs = [int(r['epoch']) + 1 for r in rows]
    losses = [m for m in metrics if m.endswith('loss')]
    scores = [m for m in metrics if not m.endswith('loss')]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (('train_loss', 'train'), *((m, m.replace('_loss', '').replace('val', 'held out'))
                                                   for m in losses)):
        points = [(e, float(r[key])) for e, r in zip(epochs, rows) if r.get(key, '') != '']
        if points:
            ax_loss.plot(*zip(*points), marker='.', label=label)
    ax_loss.set(xlabel='epoch', ylabel='loss', title='Loss')
    ax_loss.legend()
    for key in scores:
        points = [(e, float(r[key])) for e, r in zip(epochs, rows) if r.get(key, '') != '']
        if points:
            ax_score.plot(*zip(*points), marker='.', label=key)
    ax_score.set(xlabel='epoch', ylabel='%', title='Held-out metrics')
    ax_score.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: str, max_labels: int = 40) -> None:
    """Row-normalised confusion matrix (true classes as rows)."""
    plt = _pyplot()
    totals = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros_like(confusion, dtype=float), where=totals > 0)
    size = min(12, 3 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalised, cmap='Blues', vmin=0, vmax=1)
    if len(classes) <= max_labels:
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(len(classes)), classes)
        if len(classes) <= 12:
            for i in range(len(classes)):
                for j in range(len(classes)):
                    ax.text(j, i, int(confusion[i, j]), ha='center', va='center', fontsize=8,
                            color='white' if normalised[i, j] > 0.5 else 'black')
    ax.set(xlabel='predicted', ylabel='true', title='Confusion matrix (held out)')
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
