"""Noise schedules and samplers, all diffusers classes.

Training uses ``DDPMScheduler`` (the seed's ``scaled_linear`` betas 0.00085 → 0.012 over 1000 steps,
ε-prediction by default) for ``add_noise``, ``get_velocity`` and ``compute_snr``. Sampling builds any of four
samplers with ``from_config`` from a model's own scheduler config, so a Stable Diffusion folder samples with its
own ``steps_offset``, ``set_alpha_to_one`` and timestep spacing exactly as ``StableDiffusionPipeline`` does.
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


def prediction_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output for ``x0`` noised with ``noise`` at ``t``: the noise itself, or the
    velocity for a ``v_prediction`` schedule."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"prediction_type {kind!r}: training supports 'epsilon' and 'v_prediction'")


def denoising_sse(unet: Any, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  text: torch.Tensor) -> float:
    """The summed squared error of ``unet``'s prediction for ``x0`` noised with ``noise`` at ``t`` (all on the
    UNet's device), against :func:`prediction_target`: a held-out loss's numerator."""
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample
    target = prediction_target(scheduler, x0, noise, t)
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="sum").item()


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights from diffusers' ``compute_snr``: ``min(snr, γ) / snr`` (≤ 1) for ε-prediction,
    ``min(snr, γ) / (snr + 1)`` for v-prediction (whose loss already carries a factor snr + 1)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    base = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=gamma) / base
