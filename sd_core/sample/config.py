"""What to draw and how. Every field is also a flag of ``emoji-sd sample`` of the same name (``--images-per-prompt``
for ``images_per_prompt``); the flags and the ``[sample]`` table of a config file are one set of settings."""

from __future__ import annotations

from pydantic import Field, field_validator

from sd_core.common.config_base import StrictModel
from sd_core.diffusion.config import SamplerName, check_guidance

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


class SampleConfig(StrictModel):
    """Images per prompt, sampler and guidance (``ε_u + s·(ε_c − ε_u)``; seed 000 compared s = 0 … 100)."""

    prompts: tuple[str, ...] = Field(
        (), description="what to draw; empty: held_out_prompts captions of the held-out side of the model's "
                        "training split in the data directory (the example prompts for a model without one)")
    held_out_prompts: int = Field(4, ge=1, description="how many held-out captions to draw when prompts is empty")
    negative_prompt: str = Field(
        "", description="what to steer away from: replaces the empty prompt of classifier-free guidance "
                        "(used only when guidance_scale > 1)")
    guidance_scale: float = Field(7.5, ge=0, description="0: without the text; 1: text, no guidance")
    steps: int = Field(50, ge=1, description="sampler steps per image")
    scheduler: SamplerName = Field("ddim", description="ddpm, ddim, dpm++ (DPM-Solver++ 2M) or euler")
    seed: int = Field(0, description="the first seed: image j of a prompt is drawn from seed + j")
    images_per_prompt: int = Field(4, ge=1, description="columns of the grid: seeds seed, seed+1, ...")
    width: int | None = Field(None, ge=8, le=4096, description="image width in pixels, a multiple of the VAE's "
                                                              "factor (8 for Stable Diffusion); default: the model's")
    height: int | None = Field(None, ge=8, le=4096, description="image height in pixels, as width")
    guidance_sweep: tuple[float, ...] = Field(
        (0.0, 1.0, 3.0, 5.0, 7.5, 10.0),
        description="also guidance_sweep.png: one image per prompt (from seed) at each of these guidance scales; "
                    "empty: none. The sample stage draws this; `emoji-sd sample` only with --guidance-sweep")
    batch_size: int = Field(16, ge=1, description="images per pipeline call")
    device: str = Field("auto", pattern=DEVICE_PATTERN,
                        description="where to draw: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N, mps")
    cell_size: int | None = Field(None, ge=8, description="grid cell side in pixels (default: the image size)")
    label_width: int = Field(220, ge=0, description="width in pixels of the grid's prompt column")

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float) -> float:
        return check_guidance(v)

    @field_validator("guidance_sweep")
    @classmethod
    def _sweep(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for s in v:
            check_guidance(s)
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        v = tuple(p.strip() for p in v)
        if any(not p for p in v):
            raise ValueError("an empty prompt (leave prompts empty to draw held-out captions)")
        return v

    def seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.images_per_prompt)]
