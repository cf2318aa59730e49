"""Noise-schedule math: DDPM forward noising, DDPM / DDIM reverse steps, CFG sampling.

This is the only module that knows about betas and alphas. Coefficients are
computed in float64 and cast to the sample's dtype/device when applied.

Conventions (chosen to match diffusers' ``DDPMScheduler`` / ``DDIMScheduler``
with ``timestep_spacing="leading"``, ``steps_offset=0``, ``clip_sample=False``):

* inference timesteps are ``arange(steps) * (N // steps)`` reversed;
* the step before the last one (``t_prev < 0``) uses ``ᾱ_prev = 1`` (diffusers'
  ``set_alpha_to_one=True``), so the final step returns the model's x0 estimate;
* x0 estimates are never clipped (these are VAE latents, not pixels in [-1, 1]).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ScheduleConfig", "NoiseSchedule", "ModelFn", "sample"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``model_fn(x, t, context, mask) -> eps`` with x (B, C, H, W), t (B,), context (B, T, D), mask (B, T) or None."""


class ScheduleConfig(BaseModel):
    """DDPM training schedule (seed: 1000 steps, scaled-linear 0.00085 → 0.012, ε-prediction)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScheduleConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        return cls.model_validate(data)


def _as_index(t: torch.Tensor | int) -> torch.Tensor:
    """Timesteps as a CPU int64 tensor (for indexing the float64 tables)."""
    return torch.as_tensor(t).detach().to("cpu", torch.int64)


class NoiseSchedule:
    """DDPM schedule with float64 tables ``betas``, ``alphas``, ``alphas_cumprod`` (CPU)."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        c = self.config
        n = c.num_train_timesteps
        if c.beta_schedule == "scaled_linear":
            betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, n, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float64)
        self.betas: torch.Tensor = betas
        self.alphas: torch.Tensor = 1.0 - betas
        self.alphas_cumprod: torch.Tensor = torch.cumprod(self.alphas, dim=0)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _alpha_bar(self, t: int) -> float:
        """ᾱ_t as a float, with ᾱ = 1 for t < 0 (the step past the end of the chain)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def _per_sample(self, table: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` shaped (B, 1, ..., 1) to broadcast against ``like``."""
        vals = table[_as_index(t)].to(device=like.device, dtype=like.dtype)
        if vals.ndim == 0:
            return vals
        return vals.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Forward process q(x_t | x0): ``√ᾱ_t · x0 + √(1−ᾱ_t) · noise``; t is (B,) or scalar."""
        a = self.alphas_cumprod.sqrt()
        s = (1.0 - self.alphas_cumprod).sqrt()
        return self._per_sample(a, t, x0) * x0 + self._per_sample(s, t, x0) * noise

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio ``ᾱ_t / (1 − ᾱ_t)`` (float64, on CPU)."""
        a = self.alphas_cumprod[_as_index(t)]
        return a / (1.0 - a)

    def min_snr_weights(self, t: torch.Tensor | int, gamma: float = 5.0) -> torch.Tensor:
        """Min-SNR-γ loss weights for ε-prediction: ``min(snr, γ) / snr`` (float32, ≤ 1).

        Returned on the device of ``t`` when ``t`` is a tensor.
        """
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        snr = self.snr(t)
        w = torch.clamp(snr, max=gamma) / snr
        device = t.device if isinstance(t, torch.Tensor) else "cpu"
        return w.to(device=device, dtype=torch.float32)

    def timesteps(
        self, num_inference_steps: int, kind: Literal["ddpm", "ddim"] = "ddim"
    ) -> list[int]:
        """Descending inference timesteps with diffusers' "leading" spacing (steps_offset 0).

        Both samplers use the same grid; ``kind`` is validated for symmetry with :func:`sample`.
        """
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
        n = self.num_train_timesteps
        if not 1 <= num_inference_steps <= n:
            raise ValueError(f"num_inference_steps must be in [1, {n}], got {num_inference_steps}")
        ratio = n // num_inference_steps
        return [i * ratio for i in reversed(range(num_inference_steps))]

    def predict_x0(self, eps: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
        """x0 estimate ``(x_t − √(1−ᾱ_t) ε) / √ᾱ_t``."""
        a_t = self._alpha_bar(t)
        return (x_t - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5

    def ddpm_posterior(
        self, eps: torch.Tensor, t: int, x_t: torch.Tensor, t_prev: int | None = None
    ) -> tuple[torch.Tensor, float]:
        """Mean and variance of q(x_{t_prev} | x_t, x0̂) (DDPM eq. 7, "fixed small" β̃).

        ``t_prev`` defaults to ``t − 1``; a strided chain passes the previous grid point.
        """
        t_prev = t - 1 if t_prev is None else t_prev
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        beta_t = 1.0 - a_t / a_prev
        x0 = self.predict_x0(eps, t, x_t)
        coef_x0 = a_prev**0.5 * beta_t / (1.0 - a_t)
        coef_xt = (a_t / a_prev) ** 0.5 * (1.0 - a_prev) / (1.0 - a_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        variance = max((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
        return mean, variance

    def ddpm_step(
        self,
        eps: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
        t_prev: int | None = None,
    ) -> torch.Tensor:
        """Ancestral DDPM step x_t → x_{t_prev}: posterior mean + √β̃ · z (no noise at t = 0)."""
        mean, variance = self.ddpm_posterior(eps, t, x_t, t_prev)
        if t <= 0:
            return mean
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + variance**0.5 * z

    def ddim_step(
        self,
        eps: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM step x_t → x_{t_prev} (eta 0: deterministic; ``t_prev < 0`` uses ᾱ = 1)."""
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        x0 = self.predict_x0(eps, t, x_t)
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        direction = max(1.0 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        x_prev = a_prev**0.5 * x0 + direction
        if eta > 0:
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_prev = x_prev + sigma * z
        return x_prev


def _pad_context(
    ctx: torch.Tensor, mask: torch.Tensor | None, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, T, D) context to ``length`` tokens; padded tokens get mask 0."""
    b, t, d = ctx.shape
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.long, device=ctx.device)
    if t < length:
        ctx = torch.cat([ctx, ctx.new_zeros(b, length - t, d)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(b, length - t)], dim=1)
    return ctx, mask


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    context: torch.Tensor,
    uncond_context: torch.Tensor | None,
    *,
    schedule: NoiseSchedule,
    steps: int,
    guidance_scale: float,
    kind: Literal["ddpm", "ddim"] = "ddim",
    generator: torch.Generator | None = None,
    context_mask: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
    eta: float = 0.0,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample x0 latents of ``shape`` with classifier-free guidance.

    Each step runs one batched ``model_fn`` call on ``cat([cond, uncond])`` and uses
    ``ε = ε_u + s · (ε_c − ε_u)``. ``uncond_context`` may have batch 1 (broadcast) and a
    different token count (the shorter one is zero-padded and masked out). With
    ``uncond_context=None`` or ``guidance_scale == 1`` only the conditional pass runs.
    The start noise is drawn from ``generator`` on ``context``'s device unless ``x_T`` is given.
    """
    if kind not in ("ddpm", "ddim"):
        raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
    b = shape[0]
    if context.shape[0] != b:
        raise ValueError(f"context batch {context.shape[0]} != sample batch {b}")
    device = context.device
    x = (
        x_T.to(device)
        if x_T is not None
        else torch.randn(shape, generator=generator, device=device, dtype=context.dtype)
    )

    use_cfg = uncond_context is not None and guidance_scale != 1.0
    ctx, mask = context, context_mask
    if use_cfg:
        assert uncond_context is not None
        u_ctx, u_mask = uncond_context.to(device=device, dtype=context.dtype), uncond_mask
        if u_ctx.shape[0] == 1 and b > 1:
            u_ctx = u_ctx.expand(b, -1, -1)
            u_mask = None if u_mask is None else u_mask.expand(b, -1)
        if u_ctx.shape[0] != b:
            raise ValueError(f"uncond_context batch {u_ctx.shape[0]} must be 1 or {b}")
        if mask is None and u_mask is None and u_ctx.shape[1] == ctx.shape[1]:
            ctx = torch.cat([ctx, u_ctx], dim=0)  # (2B, T, D)
        else:
            length = max(ctx.shape[1], u_ctx.shape[1])
            c_pad, c_m = _pad_context(ctx, mask, length)
            u_pad, u_m = _pad_context(u_ctx, u_mask, length)
            ctx = torch.cat([c_pad, u_pad], dim=0)  # (2B, T, D)
            mask = torch.cat([c_m.to(u_m.dtype), u_m], dim=0)  # (2B, T)

    ts = schedule.timesteps(steps, kind)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x_in = torch.cat([x, x], dim=0) if use_cfg else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        eps = model_fn(x_in, t_in, ctx, mask)
        if use_cfg:
            eps_c, eps_u = eps.chunk(2, dim=0)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        if kind == "ddim":
            x = schedule.ddim_step(eps, t, t_prev, x, eta=eta, generator=generator)
        else:
            x = schedule.ddpm_step(eps, t, x, generator=generator, t_prev=t_prev)
    return x
