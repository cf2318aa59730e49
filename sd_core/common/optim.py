"""The optimizer every trainer here uses."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device has one (CUDA, and the CPU since torch
    2.4): one kernel over all tensors instead of a loop of small ops per tensor. Measured here (2 CPU cores,
    72.9M parameters): 35 ms per step against 76 ms for the default implementation. Falls back to the
    default where the fused kernel is missing."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, **kwargs)
