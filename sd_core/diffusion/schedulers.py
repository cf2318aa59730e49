"""Noise schedules and samplers, all diffusers classes.

Training uses ``DDPMScheduler`` (the seed's ``scaled_linear`` betas 0.00085 → 0.012 over 1000 steps,
ε-prediction) for ``add_noise`` and ``compute_snr``. Sampling builds any of four samplers with
``from_config`` from a model's own scheduler config, so a Stable Diffusion folder samples with its own
``steps_offset``, ``set_alpha_to_one`` and timestep spacing exactly as ``StableDiffusionPipeline`` does.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from sd_core.common.strict import StrictModel

SamplerName = Literal["ddpm", "ddim", "dpm++", "euler"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpm++", "euler")


class ScheduleConfig(StrictModel):
    """The forward (noising) process a from-scratch model is trained with. A pretrained model keeps its own."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    prediction_type: Literal["epsilon"] = "epsilon"

    @model_validator(mode="after")
    def _check_betas(self) -> "ScheduleConfig":
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start ({self.beta_start})")
        return self

    def scheduler_config(self) -> dict[str, Any]:
        """A diffusers scheduler config: the training betas plus Stable Diffusion's inference conventions
        (leading timestep spacing, ``steps_offset=1``, ``set_alpha_to_one=False``, no sample clipping)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        }


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
