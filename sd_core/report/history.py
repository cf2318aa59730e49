"""The evaluation history (``models/evaluations.csv``) as the report shows it: the recent runs in a table and a
small plot over time of the headline κ (guided and unguided) and the held-out loss, with their intervals."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_bytes


def _float(row: dict[str, str], name: str) -> float | None:
    try:
        return float(row[name]) if row.get(name) not in (None, "") else None
    except ValueError:
        return None


def _when(row: dict[str, str]) -> datetime | None:
    try:
        return datetime.fromisoformat(row.get("evaluated_at", "").replace("Z", "+00:00"))
    except ValueError:
        return None


def history_plot(catalog: Catalog, rows: list[dict[str, str]], champion: str | None = None) -> Path | None:
    """``models/evaluations.png``: κ (guided, and unguided in grey) and the held-out loss of every evaluated run
    over time, each with its interval; rejected runs as red crosses, the champion ringed."""
    out = catalog.eval_history_csv.with_suffix(".png")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [_when(r) for r in rows]
    x = times if all(times) and len(set(times)) == len(times) else list(range(1, len(rows) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.6), dpi=100)
    panels = (("prompt_kappa", "prompt following, κ"), ("held_out_loss", "held-out loss"))
    for ax, (name, title) in zip(axes, panels):
        if name == "prompt_kappa":
            pts = [(xi, v) for xi, r in zip(x, rows) if (v := _float(r, "prompt_kappa_g0")) is not None]
            if pts:
                ax.plot(*zip(*pts), "-", color="0.6", linewidth=1, label="unguided")
        line = [(xi, v) for xi, r in zip(x, rows) if (v := _float(r, name)) is not None]
        if line:
            ax.plot(*zip(*line), "-", color="tab:blue", alpha=0.4, linewidth=1)
        for xi, r in zip(x, rows):
            v = _float(r, name)
            if v is None:
                continue
            lo, hi = _float(r, f"{name}_lo"), _float(r, f"{name}_hi")
            rejected = r.get("status") == "rejected"
            color = "tab:red" if rejected else "tab:blue"
            if lo is not None and hi is not None:
                ax.errorbar([xi], [v], yerr=[[v - lo], [hi - v]], fmt="none", ecolor=color, alpha=0.6, capsize=2)
            ax.plot([xi], [v], "x" if rejected else "o", color=color, markersize=5)
            if champion and r.get("run") == champion and not rejected:
                ax.plot([xi], [v], "o", markersize=11, markerfacecolor="none", markeredgecolor="black")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
        if name == "prompt_kappa" and any(_float(r, "prompt_kappa_g0") is not None for r in rows):
            ax.legend(fontsize=7, loc="best")
    if x and isinstance(x[0], datetime):
        fig.autofmt_xdate()
    else:
        for ax in axes:
            ax.set_xlabel("evaluated run", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
