"""Eval settings: the fixed evaluation set, how its images are drawn, and what promotion asks."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from sd_core.common.config_base import StrictModel
from sd_core.diffusion.config import SamplerName

# score: (better when, margin kind). An absolute margin m lets a rate or κ drop by m, a held-out loss rise by m
# (the ε-MSE of a model that predicts nothing is 1, so 0.01 is 1 % of it; two training seeds of the demo differ
# by about 0.002, at every scale measured); a relative one lets a distance be m·100 % worse. Scores in
# INTERVAL_SCORES get a paired-bootstrap interval; the others are compared by their values alone.
SCORES = {
    "prompt_kappa": ("higher", "absolute"),
    "prompt_kappa_gain": ("higher", "absolute"),
    "prompt_following": ("higher", "absolute"),
    "prompt_following_gain": ("higher", "absolute"),
    "held_out_loss": ("lower", "absolute"),
    "fid": ("lower", "relative"),
    "kid": ("lower", "relative"),
    "clip_score": ("higher", "relative"),
}
INTERVAL_SCORES = ("prompt_kappa", "prompt_kappa_g0", "prompt_kappa_real", "prompt_kappa_vae", "prompt_kappa_gain",
                   "prompt_following", "prompt_following_g0", "prompt_following_real", "prompt_following_vae",
                   "prompt_following_gain", "held_out_loss")


class PromoteIf(StrictModel):
    """When a new run replaces the champion: it is rejected only when, at ``confidence``, it is worse than the
    champion by more than a score's margin on one of ``scores`` (both scored on the same items and seeds)."""

    confidence: float = Field(0.9, gt=0, lt=1, description="level of the paired-bootstrap interval of the "
                              "difference (run - champion): a run is rejected when the whole interval lies beyond "
                              "the margin on the worse side, so a run as good as the champion is rejected with "
                              "probability (1 - confidence) / 2 at most")
    scores: dict[str, float] = Field(
        {"prompt_kappa": 0.05, "held_out_loss": 0.01},
        description="the scores that decide, each with its margin: absolute for rates, kappa and the held-out "
                    "loss (whose untrained value is about 1), relative for fid, kid and clip_score (which have "
                    "no interval and are compared by value)")

    @model_validator(mode="before")
    @classmethod
    def _old_form(cls, data: Any) -> Any:
        """The form before intervals, ``{score = tolerance, ...}``, is read as those scores with those margins
        (the held-out loss's is now absolute)."""
        if isinstance(data, dict) and data and not set(data) & {"confidence", "scores"}:
            return {"scores": data}
        return data

    @field_validator("scores")
    @classmethod
    def _known_scores(cls, v: dict[str, float]) -> dict[str, float]:
        if unknown := sorted(set(v) - set(SCORES)):
            raise ValueError(f"unknown scores {unknown}; choose from {sorted(SCORES)}")
        if any(t < 0 for t in v.values()):
            raise ValueError("margins must be >= 0")
        return v


class EvalConfig(StrictModel):
    """How a trained model is scored, and when a new run replaces the champion."""

    items: int = Field(48, ge=1, description="held-out items scored (a fixed sample of the validation split)")
    seed: int = Field(0, description="image j of held-out item i starts from seed + i * seeds_per_item + j (the "
                                     "guided and the unguided draw alike)")
    seeds_per_item: int = Field(2, ge=1, description="images drawn per held-out prompt: more images, a steadier "
                                                     "prompt-following score")
    guidance_scale: float = Field(7.5, ge=1, description="the guidance prompt following is scored at "
                                                         "(and at 0, without the text)")
    steps: int = Field(20, ge=1, description="sampler steps per image")
    scheduler: SamplerName = Field("dpm++", description="sampler: ddpm, ddim, dpm++ (DPM-Solver++ 2M) or euler")
    batch_size: int = Field(16, ge=1, description="images (or prompts, for the held-out loss) per model call")
    loss_timesteps: int = Field(10, ge=1, description="held-out ε-MSE on this fixed grid of timesteps")
    loss_seed: int = Field(1234, description="seed of the held-out loss's fixed noise")
    grid_items: int = Field(8, ge=0, description="rows of the grid of held-out prompts beside their real images")
    features: str | None = Field(
        "openai/clip-vit-base-patch32", description="CLIP model whose image embeddings FID and KID are computed in "
        "(safetensors weights; Inception's pickled ones are not loaded); null skips them")
    clip_model: str | None = Field("openai/clip-vit-base-patch32", description="CLIP model for the CLIP score; "
                                                                                 "null skips it")
    min_items: int = Field(48, ge=0, description="the held-out split holds at least this many items where the data "
                                                 "allows it (at most about a quarter of the data set); the same "
                                                 "setting as train.val_min_items: it changes what trains")
    varying_share: float = Field(0.9, gt=0, le=1, description="an attribute counts in the headline prompt_kappa "
                                 "when its most common asked value covers less than this share of the held-out "
                                 "prompts")
    bootstrap: int = Field(2000, ge=100, description="paired-bootstrap replicates (items, and seeds within items, "
                                                     "drawn with replacement) behind every interval")
    promote_if: PromoteIf = Field(PromoteIf(), description="the promotion gate (docs/evaluation.md): confidence "
                                                           "and the scores that decide, each with its margin")
