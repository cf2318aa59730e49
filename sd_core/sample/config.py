"""What to draw and how."""

from __future__ import annotations

from pydantic import Field, field_validator

from sd_core.caption.template import DEFAULT_PROMPTS
from sd_core.common.strict import StrictModel
from sd_core.diffusion.config import SamplerName, check_guidance


class SampleConfig(StrictModel):
    """Images per prompt, sampler and guidance (``ε_u + s·(ε_c − ε_u)``; seed 000 compared s = 0 … 100)."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    guidance_scale: float = Field(7.5, ge=0, description="0: without the text; 1: text, no guidance")
    steps: int = Field(50, ge=1)
    scheduler: SamplerName = Field("ddim", description="ddpm, ddim, dpm++ (DPM-Solver++ 2M) or euler")
    seed: int = 0
    images_per_prompt: int = Field(4, ge=1, description="columns of the grid: seeds seed, seed+1, ...")
    guidance_sweep: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0, 7.5, 10.0)
    batch_size: int = Field(16, ge=1)
    cell_size: int | None = Field(None, ge=8, description="grid cell side in pixels (default: the image size)")
    label_width: int = Field(220, ge=0)

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

    def seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.images_per_prompt)]
