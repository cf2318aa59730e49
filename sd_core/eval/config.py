"""Eval settings: the fixed evaluation set, how its images are drawn, and what promotion asks."""

from __future__ import annotations

from pydantic import Field, field_validator

from sd_core.common.strict import StrictModel
from sd_core.diffusion.config import SamplerName

# score: (better when, tolerance kind). A relative tolerance t lets a new run be t·100 % worse; an
# absolute one lets a rate in [0, 1] drop by t.
SCORES = {
    "prompt_following": ("higher", "absolute"),
    "prompt_following_gain": ("higher", "absolute"),
    "held_out_loss": ("lower", "relative"),
    "fid": ("lower", "relative"),
    "kid": ("lower", "relative"),
    "clip_score": ("higher", "relative"),
}


class EvalConfig(StrictModel):
    """How a trained model is scored, and when a new run replaces the champion."""

    items: int = Field(48, ge=1, description="held-out items scored (a fixed sample of the validation split)")
    seed: int = Field(0, description="image j of held-out item i starts from seed + i * seeds_per_item + j (the "
                                     "guided and the unguided draw alike)")
    seeds_per_item: int = Field(2, ge=1, description="images drawn per held-out prompt: more images, a steadier "
                                                     "prompt-following score")
    guidance_scale: float = Field(7.5, ge=1, description="the guidance prompt following is scored at "
                                                         "(and at 0, without the text)")
    steps: int = Field(20, ge=1)
    scheduler: SamplerName = "dpm++"
    batch_size: int = Field(16, ge=1)
    loss_timesteps: int = Field(10, ge=1, description="held-out ε-MSE on this fixed grid of timesteps")
    loss_seed: int = 1234
    grid_items: int = Field(8, ge=0, description="rows of the grid of held-out prompts beside their real images")
    features: str | None = Field(
        "openai/clip-vit-base-patch32", description="CLIP model whose image embeddings FID and KID are computed in "
        "(safetensors weights; Inception's pickled ones are not loaded); null skips them")
    clip_model: str | None = Field("openai/clip-vit-base-patch32", description="CLIP model for the CLIP score; "
                                                                                 "null skips it")
    promote_if: dict[str, float] = Field(
        {"prompt_following": 0.05, "held_out_loss": 0.03},
        description="scores a new run must not be worse on than the champion, each with its tolerance "
                    "(absolute for rates in [0, 1], relative for losses and distances)")

    @field_validator("promote_if")
    @classmethod
    def _known_scores(cls, v: dict[str, float]) -> dict[str, float]:
        if unknown := sorted(set(v) - set(SCORES)):
            raise ValueError(f"unknown scores {unknown}; choose from {sorted(SCORES)}")
        if any(t < 0 for t in v.values()):
            raise ValueError("tolerances must be >= 0")
        return v
