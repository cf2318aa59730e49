"""Noise schedules and samplers, all diffusers classes.

Training uses ``DDPMScheduler`` (the seed's ``scaled_linear`` betas 0.00085 → 0.012 over 1000 steps,
ε-prediction) for ``add_noise`` and ``compute_snr``. Sampling builds any of four samplers with
``from_config`` from a model's own scheduler config, so a Stable Diffusion folder samples with its own
``steps_offset``, ``set_alpha_to_one`` and timestep spacing exactly as ``StableDiffusionPipeline`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from sd_core.diffusion.config import SAMPLERS, SamplerName, ScheduleConfig  # noqa: F401  (defined beside the other config)


def training_scheduler(config: ScheduleConfig | dict[str, Any]) -> Any:
    """The ``DDPMScheduler`` whose ``add_noise`` and ``alphas_cumprod`` training uses."""
    from diffusers import DDPMScheduler

    cfg = config.scheduler_config() if isinstance(config, ScheduleConfig) else dict(config)
    return DDPMScheduler.from_config(cfg)


def sampler(name: str, config: Any) -> Any:
    """Sampler ``name`` built with ``from_config`` from a scheduler config (or a scheduler)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cfg = getattr(config, "config", config)
    if name == "ddpm":
        return DDPMScheduler.from_config(cfg)
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction, ``min(snr, γ) / snr`` (≤ 1), from diffusers' ``compute_snr``."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / snr
