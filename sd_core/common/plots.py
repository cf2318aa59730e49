"""Plots written as PNG files: a trainer's loss curve, the scores of evaluated runs (matplotlib, Agg)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sd_core.store.files import atomic_write_bytes

__all__ = ["plot_loss_curve", "plot_history"]


def _column(rows: list[dict[str, str]], name: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in rows:
        if r.get(name):
            steps.append(int(r["step"]))
            values.append(float(r[name]))
    return steps, values


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_png: Path) -> Path:
    """Lay out, write as PNG atomically, close."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)


def plot_loss_curve(metrics_csv: Path, out_png: Path, *, smooth: int = 20) -> Path:
    """Train loss (raw and a running mean over ``smooth`` rows) and held-out losses against step."""
    plt = _pyplot()
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, train = _column(rows, "train_loss")
    if train:
        ax.plot(steps, train, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        k = max(1, min(smooth, len(train)))
        running = [sum(train[max(0, i - k + 1) : i + 1]) / len(train[max(0, i - k + 1) : i + 1]) for i in range(len(train))]
        ax.plot(steps, running, color="tab:blue", linewidth=1.5, label=f"train (mean of {k})")
    for name, color in (("val_loss", "tab:orange"), ("ema_val_loss", "tab:green")):
        s, v = _column(rows, name)
        if v:
            ax.plot(s, v, "o-", color=color, markersize=3, label=name.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("ε-MSE")
    if train and min(train) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    return _save(fig, out_png)


def plot_history(rows: list[dict[str, str]], scores: list[str], out_png: Path) -> Path:
    """One panel per score, its value for each evaluated run in order; rejected runs drawn as crosses."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(scores), 1, figsize=(7, 1.8 * len(scores) + 0.6), dpi=100, squeeze=False,
                             sharex=True)
    x = list(range(1, len(rows) + 1))
    for ax, name in zip(axes[:, 0], scores):
        pts = [(i, float(r[name]), r.get("status") == "rejected") for i, r in zip(x, rows) if r.get(name)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="tab:blue", alpha=0.5)
        for i, v, rejected in pts:
            ax.plot(i, v, "x" if rejected else "o", color="tab:red" if rejected else "tab:blue")
        ax.set_ylabel(name.replace("_", " "), fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("evaluated run (o promoted or kept, x rejected)")
    axes[-1, 0].set_xticks(x)
    return _save(fig, out_png)
