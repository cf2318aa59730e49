"""Loss curve from a trainer's ``metrics.csv`` (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
from pathlib import Path

from sd_core.store.files import atomic_write_bytes

__all__ = ["plot_loss_curve"]


def _column(rows: list[dict[str, str]], name: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in rows:
        if r.get(name):
            steps.append(int(r["step"]))
            values.append(float(r[name]))
    return steps, values


def plot_loss_curve(metrics_csv: Path, out_png: Path, *, smooth: int = 20) -> Path:
    """Train loss (raw and a running mean over ``smooth`` rows) and held-out losses against step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)
