"""The promotion gate: a run is rejected only when it is worse than the champion, beyond a score's margin, at the
configured confidence, on the paired bootstrap of both evaluations (same held-out items, same seeds).

For a score where higher is better, margin ``m`` (absolute, or relative: ``m · |champion|``) and the
``confidence`` interval ``[lo, hi]`` of ``run - champion``, the run is worse when ``hi < -m``: the whole
interval lies beyond the margin on the worse side (for a lower-is-better score, ``lo > m``). A run exactly
as good as the champion is then rejected with probability at most ``(1 - confidence) / 2`` from the eval's
own sampling; the margin covers what the interval does not see: two trainings of one configuration from
different seeds differ for real, not only by the eval's noise. Scores without an interval (FID, KID, CLIP
score) are compared by their values with the margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sd_core.eval.bootstrap import Readings, paired_differences
from sd_core.eval.config import SCORES


@dataclass(frozen=True)
class Verdict:
    """``worse``: a line per score on which the run is worse at the confidence (empty: promote); ``held``: a line
    per score that was compared and did not reject; ``differences``: ``{score: {difference, interval}}``."""

    worse: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)


def same_pairing(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two evaluations read the same held-out items with the same seeds (so they pair)."""
    pa, pb = a.get("paired"), b.get("paired")
    return bool(pa and pb) and all(pa.get(k) == pb.get(k) for k in ("items", "seeds", "seed_stride", "asked"))


def compare(new: dict[str, Any], champion: dict[str, Any], rules: dict[str, float], *, confidence: float,
            replicates: int) -> Verdict:
    """Judge evaluation ``new`` against ``champion``'s on ``rules`` (score → margin)."""
    diffs: dict[str, dict[str, Any]] = {}
    if same_pairing(new, champion):
        diffs = paired_differences(Readings.from_json(new["paired"]), Readings.from_json(champion["paired"]),
                                   new.get("varying", {}).get("attributes", []), confidence=confidence,
                                   replicates=replicates)
    pct = f"{100 * confidence:g} %"
    worse, held = [], []
    for name, margin in rules.items():
        a, b = new["scores"].get(name), champion["scores"].get(name)
        if a is None or b is None:
            continue  # a score one side lacks (skipped) cannot decide
        better, kind = SCORES[name]
        slack = margin if kind == "absolute" else margin * abs(b)
        interval = (diffs.get(name) or {}).get("interval")
        if interval:
            lo, hi = interval
            bad = hi < -slack if better == "higher" else lo > slack
            line = (f"{name} {a:.4g} vs champion {b:.4g}: difference {a - b:+.4g}, {pct} interval [{lo:+.4g}, "
                    f"{hi:+.4g}], margin {margin:g} {kind}")
        else:
            bad = a < b - slack if better == "higher" else a > b + slack
            line = f"{name} {a:.4g} vs champion {b:.4g} (margin {margin:g} {kind}; no interval)"
        (worse if bad else held).append(line)
    return Verdict(worse, held, diffs)
