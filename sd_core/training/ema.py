"""Exponential moving average of a model's trainable parameters."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    """float32 shadow copies of the trainable parameters, on the parameters' device.

    With ``warmup`` the decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))``, so early updates
    follow the weights closely; ``restart_warmup`` sets ``n`` back to 0 (a continuation on new data).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        shadow = list(self.shadow.values())
        params = [p.detach().float() for p in self.params.values()]  # no copy for float32 parameters
        torch._foreach_lerp_(shadow, params, 1.0 - d)  # one fused call instead of a Python loop per tensor
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        if state.keys() != self.shadow.keys():
            raise KeyError("EMA state does not match the model's trainable parameters")
        for n, v in state.items():
            self.shadow[n].copy_(v)
        self.num_updates = num_updates

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model's parameters."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])
