"""Tiny from-scratch denoiser and training configs shared by the training, checkpoint and sampling tests."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from sd_core.models import ModelConfig
from sd_core.train import TrainConfig
from sd_core.unet import UNetConfig


def tiny_unet_config(context_dim: int = 16, **overrides: Any) -> UNetConfig:
    """h_dim 32, 8 groups, one layer per block: ~0.75 M parameters."""
    return UNetConfig(**{
        "h_dim": 32, "n_heads": 4, "groups": 8, "context_dim": context_dim, "time_embed_dim": 32,
        "time_mlp_dim": 64, "layers_per_block": 1, **overrides,
    })


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """A short run on ``synthetic_pairs()`` (40 items, latents 4×8×8, text 8×16)."""
    base: dict[str, Any] = {
        "steps": 20, "batch_size": 8, "lr": 1e-3, "lr_min": 1e-4, "val_every": 1000, "save_every": 1000,
        "model": ModelConfig(unet=tiny_unet_config()),
    }
    return TrainConfig(**{**base, **overrides})


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: these models are too small to gain from two, and on a busy 2-core
    machine two spinning OpenMP threads made each step up to 80× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
