"""Chance-corrected prompt following and its uncertainty: agreement, chance and Cohen's κ per attribute, and a
paired bootstrap over held-out items and the images drawn for each.

What an evaluation read is kept per item and per image (:class:`Readings`): for each attribute the value the
prompt asked for, and the value the captioner read back from each image of each *condition* (``guided``: drawn
at the evaluated guidance; ``g0``: at guidance 0; ``real``: the real held-out image; ``vae``: that image after
the model's VAE). For one attribute and condition, over the (item, image) pairs:

* agreement ``p_o``: the share of pairs whose reading agrees with the asked value
  (:func:`~sd_core.eval.attributes.agree`: a shared content word);
* chance ``p_e = Σ_u Σ_v P_asked(u) · P_read(v) · agree(u, v)``: the agreement of an image whose reading is
  drawn from the readings' own distribution independently of its prompt (Cohen's chance term, with
  ``agree`` in place of equality; a reading that states no value never agrees);
* ``κ = (p_o - p_e) / (1 - p_e)``: 1 when every reading agrees, 0 for a model whose readings do not depend on
  the prompt, however often its favourite value happens to be asked (undefined when ``p_e = 1``).

``prompt_kappa`` is the mean κ over the *varying* attributes (see
:func:`~sd_core.eval.attributes.varying_attributes`); ``prompt_following`` is the raw share of agreeing
(pair, attribute) checks over all attributes read. ``_g0``, ``_real``, ``_vae`` are the same for the other
conditions; ``_gain`` is guided minus guidance 0.

The bootstrap draws the held-out items with replacement, and for each drawn item its images with
replacement (two levels, so both the prompts and the drawing noise count), and recomputes every score on
the draw (κ's chance term included). Two evaluations of the same items and seeds use the *same* draws, so
the interval of their difference is paired: what both runs share (an item that is hard for both) cancels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from sd_core.eval.attributes import agree

CONDITIONS = {"guided": "", "g0": "_g0", "real": "_real", "vae": "_vae"}  # condition → score-name suffix
_NONE = "\0"  # a reading that states no value: a category of its own that agrees with nothing
SEED = 20240521  # the bootstrap's draws are fixed: the same readings always give the same interval


@dataclass(frozen=True)
class Readings:
    """Per held-out item: the asked values (``asked[attribute][item]``) and what was read back from each image
    of each condition (``read[condition][attribute][item][image]``); ``None`` where nothing was stated.
    ``loss`` is each item's held-out loss, where measured."""

    asked: dict[str, list[str | None]]
    read: dict[str, dict[str, list[list[str | None]]]]
    loss: list[float] | None = None

    @property
    def items(self) -> int:
        return len(next(iter(self.asked.values()), []))

    @property
    def images(self) -> int:
        """Images per item of the drawn conditions (1 when only real images were read)."""
        return max((len(rows[0]) for per in self.read.values() for rows in per.values() if rows), default=1)

    def to_json(self) -> dict[str, Any]:
        return {"asked": self.asked, "read": self.read, "loss": self.loss}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Readings":
        return cls(asked=dict(data["asked"]), read={c: dict(v) for c, v in data["read"].items()},
                   loss=data.get("loss"))


@dataclass(frozen=True)
class Draws:
    """Bootstrap weights: how often each item (``items``, (B, n)) and each (item, image) pair (``pairs``,
    (B, n, s)) was drawn. The point estimate is the one draw of all ones."""

    items: np.ndarray
    pairs: np.ndarray

    @classmethod
    def point(cls, n: int, s: int) -> "Draws":
        return cls(np.ones((1, n)), np.ones((1, n, s)))

    @classmethod
    def bootstrap(cls, n: int, s: int, replicates: int, seed: int = SEED) -> "Draws":
        rng = np.random.default_rng(seed)
        items = rng.integers(0, n, (replicates, n))  # (B, n) drawn item indices
        images = rng.integers(0, s, (replicates, n, s))  # (B, n, s) drawn image indices within each drawn item
        base = np.arange(replicates)[:, None]
        item_w = np.bincount((base * n + items).ravel(), minlength=replicates * n).reshape(replicates, n)
        flat = base[:, :, None] * n * s + items[:, :, None] * s + images
        pair_w = np.bincount(flat.ravel(), minlength=replicates * n * s).reshape(replicates, n, s)
        return cls(item_w.astype(np.float64), pair_w.astype(np.float64))

    def weights(self, images: int) -> np.ndarray:
        """(B, n, images) weights for a condition with ``images`` readings per item."""
        if images == self.pairs.shape[2]:
            return self.pairs
        if images == 1:
            return self.items[:, :, None]
        raise ValueError(f"{images} readings per item, expected 1 or {self.pairs.shape[2]}")


def agreement_stats(asked: list[str | None], read: list[list[str | None]],
                    weights: np.ndarray) -> dict[str, np.ndarray]:
    """Agreement, chance and κ of one attribute and condition under each draw's weights ((B, n, s)): arrays
    of B values, and ``checks``/``hits`` (weighted counts, for the raw share)."""
    n, s = len(read), len(read[0]) if read else 0
    asked_vals = sorted({v for v in asked if v is not None})
    read_vals = sorted({v if v is not None else _NONE for row in read for v in row})
    a_code = np.array([asked_vals.index(v) if v is not None else -1 for v in asked])
    r_code = np.array([[read_vals.index(v if v is not None else _NONE) for v in row] for row in read]).reshape(n, s)
    match = np.array([[v != _NONE and agree(u, v) for v in read_vals] for u in asked_vals], dtype=np.float64)
    valid = (a_code >= 0).astype(np.float64)
    w = weights * valid[None, :, None]  # (B, n, s): items that do not state the attribute are left out
    hit = match[np.maximum(a_code, 0)[:, None], r_code] * valid[:, None]  # (n, s)
    checks = w.sum(axis=(1, 2))
    hits = (w * hit).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = hits / checks
        p_asked = (w.sum(axis=2) @ np.eye(len(asked_vals))[np.maximum(a_code, 0)]) / checks[:, None]  # (B, Va)
        p_read = np.einsum("bij,ijv->bv", w, np.eye(len(read_vals))[r_code]) / checks[:, None]  # (B, Vr)
        p_e = np.einsum("ba,av,bv->b", p_asked, match, p_read)
        kappa = np.where(1 - p_e > 1e-9, (p_o - p_e) / (1 - p_e), np.nan)
    return {"agreement": p_o, "chance": p_e, "kappa": kappa, "checks": checks, "hits": hits}


def score_draws(readings: Readings, varying: Iterable[str], draws: Draws) -> tuple[dict[str, np.ndarray], dict]:
    """Every score under each draw (arrays of B values; NaN where undefined), and the per-attribute
    statistics ``{attribute: {condition: {agreement, chance, kappa}}}`` (arrays)."""
    varying = list(varying)
    scores: dict[str, np.ndarray] = {}
    table: dict[str, dict[str, dict[str, np.ndarray]]] = {a: {} for a in readings.asked}
    for condition, suffix in CONDITIONS.items():
        per = readings.read.get(condition)
        if not per:
            continue
        checks = hits = 0.0
        for a, asked in readings.asked.items():
            if a not in per:
                continue
            stats = agreement_stats(asked, per[a], draws.weights(len(per[a][0]) if per[a] else 1))
            table[a][condition] = stats
            checks, hits = checks + stats["checks"], hits + stats["hits"]
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[f"prompt_following{suffix}"] = hits / checks
        kappas = [table[a][condition]["kappa"] for a in varying if condition in table[a]]
        if kappas:
            with warnings.catch_warnings():  # a draw where every varying attribute is undefined: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                scores[f"prompt_kappa{suffix}"] = np.nanmean(np.stack(kappas), axis=0)
    for name in ("prompt_following", "prompt_kappa"):
        if name in scores and f"{name}_g0" in scores:
            scores[f"{name}_gain"] = scores[name] - scores[f"{name}_g0"]
    if readings.loss is not None:
        loss = np.asarray(readings.loss, dtype=np.float64)
        scores["held_out_loss"] = (draws.items * loss).sum(1) / draws.items.sum(1)
    return scores, table


def point_scores(readings: Readings, varying: Iterable[str]) -> tuple[dict[str, float], dict]:
    """The scores of all items and images, and the per-attribute table (plain numbers; None where undefined)."""
    scores, table = score_draws(readings, varying, Draws.point(readings.items, readings.images))
    flat = {k: _num(v[0]) for k, v in scores.items()}
    rows = {a: {c: {k: _num(st[k][0]) for k in ("agreement", "chance", "kappa")} for c, st in per.items()}
            for a, per in table.items()}
    return {k: v for k, v in flat.items() if v is not None}, rows


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _interval(values: np.ndarray, confidence: float) -> list[float] | None:
    """The central ``confidence`` percentile interval; None when over a tenth of the draws are undefined."""
    defined = values[~np.isnan(values)]
    if defined.size == 0 or defined.size < 0.9 * values.size:
        return None
    lo, hi = np.quantile(defined, [(1 - confidence) / 2, (1 + confidence) / 2])
    return [float(lo), float(hi)]


def intervals(readings: Readings, varying: Iterable[str], *, confidence: float,
              replicates: int) -> dict[str, list[float]]:
    """The ``confidence`` percentile interval of every score (scores whose draws are mostly undefined: none)."""
    draws = Draws.bootstrap(readings.items, readings.images, replicates)
    scores, _ = score_draws(readings, varying, draws)
    out = {k: _interval(v, confidence) for k, v in scores.items()}
    return {k: v for k, v in out.items() if v is not None}


def paired_differences(new: Readings, old: Readings, varying: Iterable[str], *, confidence: float,
                       replicates: int) -> dict[str, dict[str, Any]]:
    """``new - old`` for every score both have, with its paired interval: both scored under the same draws
    of items and images. The two must be readings of the same items (the same asked values) and as many
    images per item (the same seeds)."""
    if new.asked != old.asked or new.items != old.items or new.images != old.images:
        raise ValueError("paired differences need two evaluations of the same held-out items and seeds")
    varying = list(varying)
    point_new, _ = score_draws(new, varying, Draws.point(new.items, new.images))
    point_old, _ = score_draws(old, varying, Draws.point(old.items, old.images))
    draws = Draws.bootstrap(new.items, new.images, replicates)
    a, _ = score_draws(new, varying, draws)
    b, _ = score_draws(old, varying, draws)
    out: dict[str, dict[str, Any]] = {}
    for name in a.keys() & b.keys():
        diff = _num(point_new[name][0] - point_old[name][0])
        if diff is not None:
            out[name] = {"difference": diff, "interval": _interval(a[name] - b[name], confidence)}
    return out
