"""Learning-rate schedule: linear warm-up, then cosine annealing to a floor (the seed's 1e-4 → 1e-5)."""

from __future__ import annotations

import math
from typing import Any


class CosineLR:
    """Linear warm-up, then cosine from ``base`` to ``floor`` over ``total`` steps (closed form)."""

    def __init__(self, base: float, floor: float, total: int, warmup: int = 0) -> None:
        self.base, self.floor, self.total, self.warmup = base, floor, total, warmup

    def __call__(self, step: int) -> float:
        """The learning rate of the update that takes the model from ``step`` to ``step + 1``."""
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + 0.5 * (self.base - self.floor) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"kind": "cosine", "base": self.base, "floor": self.floor, "total": self.total,
                "warmup": self.warmup, "step": step, "next_lr": self(step)}
