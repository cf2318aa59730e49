"""Figures as a reader takes them in: each rounded to what it means, with its unit.

``21.4 dB``, ``0.31 [0.23, 0.39]`` (κ and its interval), ``37 %``, ``0.955`` (a loss, three significant
digits), ``1,234``, ``3 min 12 s``, ``2026-12-06 03:14 UTC``. :func:`figure` picks the kind from a stage
summary's key (``heldout_psnr_db`` → dB, ``eval_seconds`` → a duration, ``prompt_kappa`` → κ, ...) and
:func:`details` turns a whole stage summary into (label, text) pairs for the report's stage table and the
Prefect artifact.
"""

from __future__ import annotations

import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

Interval = Sequence[float] | None

# stage-summary keys whose words alone do not say what they are (the rest read as their words:
# new_images → "new images")
LABELS = {
    "heldout_psnr_db": "held-out PSNR", "train_psnr_db": "training PSNR",
    "heldout_colours_kept": "held-out colours kept", "train_images": "training images",
    "val_loss": "held-out loss", "ema_val_loss": "held-out loss (EMA)", "train_loss": "training loss",
    "held_out_loss": "held-out loss", "prompt_kappa": "κ (guided)", "prompt_kappa_g0": "κ unguided",
    "prompt_kappa_real": "κ real images", "prompt_kappa_vae": "κ through the VAE", "prompt_kappa_gain": "κ gain",
    "prompt_following": "read back (guided)", "prompt_following_g0": "read back unguided",
    "prompt_following_real": "read back, real images", "prompt_following_vae": "read back through the VAE",
    "chance": "chance", "kappa_attributes": "κ counts", "seeds_per_item": "seeds per item",
    "eval_seconds": "eval time", "seconds": "time", "last_run": "last ran", "why": "why",
    "walk_why": "walk because", "walk_ended": "walk ended at", "ema_decay": "EMA decay",
    "fid": "FID", "kid": "KID", "clip_score": "CLIP score", "md5": "md5",
}

_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
_WITH_INTERVAL = re.compile(rf"^\s*({_NUMBER})\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]\s*$")
_ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?([+-]\d\d:\d\d|Z)?$")


def count(n: int | float, noun: str = "") -> str:
    """``1,234`` (``1,234 items`` with a noun)."""
    text = f"{int(n):,}"
    return f"{text} {noun}" if noun else text


def duration(seconds: float) -> str:
    """``0.4 s``, ``9.5 s``, ``42 s``, ``3 min 12 s``, ``2 h 05 min``."""
    s = float(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 59.5:
        return f"{s:.0f} s"
    total = int(round(s))
    if total < 3600:
        minutes, rest = divmod(total, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(total, 3600)
    return f"{hours} h {rest // 60:02d} min"


def number(x: float) -> str:
    """A measured figure without a known kind: three significant digits, thousands separated above 1,000."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def signed(fmt: Callable[[float], str]) -> Callable[[float], str]:
    """The same format with a sign (differences)."""
    def with_sign(x: float) -> str:
        return ("+" if float(x) > 0 else "") + fmt(x)

    with_sign.percent = fmt is _percent  # type: ignore[attr-defined]
    return with_sign


def _kappa(x: float) -> str:
    return f"{float(x):.2f}"


def _loss(x: float) -> str:
    text = f"{float(x):#.3g}"  # three significant digits, trailing zeros kept: 1.00, 0.955, 0.0574
    return text.rstrip(".") if "e" not in text else text


def _percent(x: float) -> str:
    return f"{100 * float(x):.0f} %"


def with_interval(value: float | None, interval: Interval, fmt: Callable[[float], str]) -> str:
    """``0.31 [0.23, 0.39]``; the value alone when it has no interval; ``–`` when there is none."""
    if value is None:
        return "–"
    if not interval:
        return fmt(value)
    if fmt is _percent:
        return share(value, interval)
    if getattr(fmt, "percent", False):  # a signed share: "+2 % [-1, +6]"
        ends = [round(100 * float(x)) for x in interval]
        return f"{fmt(value)} [{', '.join(f'{e:+d}' if e else '0' for e in ends)}]"
    return f"{fmt(value)} [{fmt(interval[0])}, {fmt(interval[1])}]"


def kappa(value: float | None, interval: Interval = None) -> str:
    """Cohen's κ: two decimals (``0.31 [0.23, 0.39]``)."""
    return with_interval(value, interval, _kappa)


def share(value: float | None, interval: Interval = None) -> str:
    """A share of checks: whole percent, the interval's ends too (``37 % [33, 43]``)."""
    if value is None or not interval:
        return with_interval(value, interval, _percent)
    return f"{_percent(value)} [{100 * float(interval[0]):.0f}, {100 * float(interval[1]):.0f}]"


def loss(value: float | None, interval: Interval = None) -> str:
    """A loss (ε-MSE): three significant digits (``0.955 [0.946, 0.965]``)."""
    return with_interval(value, interval, _loss)


def decibels(value: float) -> str:
    return f"{float(value):.1f} dB"


def timestamp(text: str) -> str:
    """An ISO time as ``2026-12-06 03:14 UTC`` (the text as it is when it does not read as one)."""
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return str(text)
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M") + (" UTC" if t.tzinfo is not None else "")


def size(n_bytes: int) -> str:
    """``512 B``, ``1.2 MB``."""
    n = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def score(name: str) -> Callable[[float], str]:
    """The format of an evaluation score by its name: κ, shares, losses, the rest by :func:`number`."""
    if name.startswith("prompt_kappa"):
        return _kappa
    if name.startswith("prompt_following") or name == "chance":
        return _percent
    if "loss" in name:
        return _loss
    return number


def score_with_interval(name: str, value: float | None, interval: Interval = None) -> str:
    return with_interval(value, interval, score(name))


def _kind(key: str) -> Callable[[float], str]:
    k = key.lower()
    if k.endswith("_db"):
        return decibels
    if k in ("seconds", "time") or k.endswith(("_seconds", "_s")):
        return duration
    if k.startswith(("prompt_kappa", "prompt_following", "chance")) or "loss" in k:
        return score(k)
    if k.endswith(("_kept", "_share", "_fraction", "_rate")):
        return _percent
    return number


def figure(key: str, value: Any, root: Path | None = None) -> str:
    """One stage-summary value as text, by its key: numbers rounded to their kind, ``0.011 [0.0, 0.045]``
    strings reformatted the same way, ISO times shortened, paths inside ``root`` made relative, dicts and
    lists joined."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return _kind(key)(value) if _kind(key) in (duration, decibels) else count(value)
    if isinstance(value, float):
        return _kind(key)(value)
    if isinstance(value, dict):
        return ", ".join(f"{label(k)} {figure(k, v, root)}" for k, v in value.items() if not empty(v)) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(figure(key, v, root) for v in value)
    text = str(value)
    if m := _WITH_INTERVAL.match(text):
        return with_interval(float(m[1]), [float(m[2]), float(m[3])], _kind(key))
    if _ISO_TIME.match(text):
        return timestamp(text)
    if root is not None and os.path.isabs(text):
        try:
            return Path(text).relative_to(root).as_posix()
        except ValueError:
            return text
    return text


def label(key: str) -> str:
    """A summary key as words: ``new_images`` → ``new images`` (see :data:`LABELS` for the rest)."""
    return LABELS.get(key, key.replace("_", " "))


def empty(value: Any) -> bool:
    return value is None or value == "" or value == {} or value == []


# what a stage did first, then the rest as recorded (alphabetical)
FIRST = ("why", "last_run", "decision", "reason", "run", "plan", "walk", "walk_why", "new_images", "images",
         "dataset_rows", "captioned", "items", "steps", "prompt_kappa", "held_out_loss", "heldout_psnr_db")


def details(summary: dict[str, Any], root: Path | None = None, *, skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """A stage summary as (label, text) pairs, rounded to what each figure means, the telling ones first
    (:data:`FIRST`); empty values left out."""
    keys = sorted((k for k, v in summary.items() if not empty(v) and k not in skip),
                  key=lambda k: FIRST.index(k) if k in FIRST else len(FIRST))
    return [(label(k), figure(k, summary[k], root)) for k in keys]
