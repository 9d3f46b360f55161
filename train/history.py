"""Per-epoch metrics: a JSONL file (one line per epoch, with its evaluation) and a PNG of the curves."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Sequence

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def write_metrics(output_dir: str, history: Sequence[Dict[str, Any]]) -> str:
    """Rewrite the whole file from ``history`` (after a resume it then matches the checkpoint)."""
    path = os.path.join(output_dir, METRICS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in history)
    os.replace(tmp, path)
    return path


def plot_curves(output_dir: str, history: Sequence[Dict[str, Any]]) -> str:
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    def series(key: str):
        points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        loss_ax.plot(*series(key), marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    for key, label in (("train_top1", "train top-1"), ("val_top1", "val top-1"),
                       ("val_top5", "val top-5")):
        acc_ax.plot(*series(key), marker="o", label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, PLOT_FILE)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
