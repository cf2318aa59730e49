"""Configuration of the denoiser, its noise schedule and its samplers: pydantic models only, no torch,
so loading a pipeline config (and ``emoji-sd --help``) never imports the model code."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sd_core.common.config_base import StrictModel
from sd_core.diffusion.unet import UNetConfig

SamplerName = Literal["ddpm", "ddim", "dpm++", "euler"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpm++", "euler")


class ScheduleConfig(StrictModel):
    """The forward (noising) process a from-scratch model is trained with. A pretrained model keeps its own."""

    num_train_timesteps: int = Field(1000, ge=2, description="timesteps T of the noising process")
    beta_start: float = Field(0.00085, gt=0, lt=1, description="noise variance beta of the first timestep")
    beta_end: float = Field(0.012, gt=0, lt=1, description="beta of the last timestep")
    beta_schedule: Literal["scaled_linear", "linear"] = Field(
        "scaled_linear", description="how beta goes from beta_start to beta_end: scaled_linear (linear in its "
        "square root, Stable Diffusion's) or linear")
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="what the UNet predicts: the noise (the seed's) or the velocity v = √ᾱ·ε − √(1−ᾱ)·x0")
    rescale_betas_zero_snr: bool = Field(
        False, description="rescale the betas so that the last timestep is pure noise (Lin et al. 2024); needs "
                           "v_prediction, and sampling then starts from t = T (trailing timestep spacing)")

    @model_validator(mode="after")
    def _check_betas(self) -> "ScheduleConfig":
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start ({self.beta_start})")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError("rescale_betas_zero_snr: needs prediction_type = 'v_prediction' (at zero SNR the "
                             "noise alone says nothing about the image)")
        return self

    def scheduler_config(self) -> dict[str, Any]:
        """A diffusers scheduler config: the training betas plus Stable Diffusion's inference conventions
        (leading timestep spacing, ``steps_offset=1``, ``set_alpha_to_one=False``, no sample clipping).
        A zero-terminal-SNR schedule samples with trailing spacing instead, so that its first step is t = T,
        the pure noise it was trained to start from."""
        zero_snr = self.rescale_betas_zero_snr
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "timestep_spacing": "trailing" if zero_snr else "leading",
            **({"rescale_betas_zero_snr": True} if zero_snr else {}),
        }


def check_guidance(scale: float) -> float:
    if scale < 0 or 0 < scale < 1:
        raise ValueError(f"guidance scale {scale}: use 0 (no text), 1 (text, no guidance) or more than 1")
    return scale


ModelKind = Literal["scratch", "pretrained_attn2", "pretrained_attn2_lora"]


class LoRAConfig(StrictModel):
    """LoRA adapters on the cross-attention projections (``pretrained_attn2_lora``)."""

    rank: int = Field(8, ge=1, description="rank r of each adapter")
    alpha: float = Field(8.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (peft's lora_dropout)")


class ModelConfig(StrictModel):
    """Which denoiser to train, and its shape (the scratch model's) or origin (a pretrained one)."""

    kind: ModelKind = Field(
        "scratch", description="scratch: a new UNet shaped by [train.model.unet], every parameter trains; "
        "pretrained_attn2: the UNet of pretrained_model_id, only its cross-attention (attn2) layers train; "
        "pretrained_attn2_lora: that UNet frozen, with LoRA adapters ([train.model.lora]) on its attn2 projections")
    unet: UNetConfig | None = Field(None, description="only for kind = 'scratch', which fills in the defaults")
    pretrained_model_id: str = Field(
        "CompVis/stable-diffusion-v1-4", description="the Stable Diffusion model (Hub id or folder with unet/ and "
        "scheduler/) that the pretrained kinds start from; its noise schedule is the one trained with")
    revision: str | None = Field(None, description="Hub revision of pretrained_model_id; unset: the default branch")
    lora: LoRAConfig | None = Field(None, description="only for kind = 'pretrained_attn2_lora', which fills in "
                                    "the defaults")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "scratch")
        if kind == "scratch" and data.get("unet") is None:
            data = {**data, "unet": UNetConfig()}
        if kind == "pretrained_attn2_lora" and data.get("lora") is None:
            data = {**data, "lora": LoRAConfig()}
        return data

    @model_validator(mode="after")
    def _fields_match_kind(self) -> "ModelConfig":
        if self.kind != "scratch" and self.unet is not None:
            raise ValueError("unet: only for kind='scratch' (a pretrained UNet's shape comes with it)")
        if self.kind != "pretrained_attn2_lora" and self.lora is not None:
            raise ValueError("lora: only for kind='pretrained_attn2_lora'")
        return self

    @property
    def pretrained(self) -> bool:
        return self.kind != "scratch"
