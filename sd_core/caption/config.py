"""Caption settings: which captioner, and everything that shapes a caption (its cache key)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from sd_core.caption.offline import OFFLINE_VERSION
from sd_core.caption.template import PROMPT_TEMPLATE_V1, RETRY_SUFFIX
from sd_core.common.config_base import StrictModel

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-VL-3B-Instruct"

# Emoji are 128x128 or smaller. qwen-vl-utils and the image processor resize to multiples of 28
# (14-pixel patches merged 2x2, one LLM token per 28x28 cell) and upscale anything under min_pixels.
# 112*112 is a 4x4 grid of tokens (8x8 ViT patches): tiny 32-72 px emoji are upscaled to it, so the
# eyes and mouth still span a patch or more each. 224*224 caps a frame at 64 tokens: a 128 px emoji
# becomes 140x140 (25 tokens), and an oversized upload is shrunk rather than costing hundreds.
DEFAULT_MIN_PIXELS = 112 * 112
DEFAULT_MAX_PIXELS = 224 * 224


class CaptionConfig(StrictModel):
    """Settings that choose the captioner and everything that shapes a caption."""

    captioner: Literal["qwen", "offline"] = Field(
        "qwen", description="qwen: the vision-language model model_id (Qwen2.5-VL) describes each image, told its "
        "title; offline: deterministic template captions from the title's words and the image's colours and shape, "
        "no weights (the demo's)")
    model_id: str = Field(DEFAULT_MODEL_ID, min_length=1, description="Hub id or local folder.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model_id; unset: the "
                                 "default branch")
    prompt_version: str = Field(
        "v1", description="a name for the prompt, in the captions' cache key and the dataset card: changing it "
        "captions every image again (a changed prompt_template does so by itself)")
    prompt_template: str = Field(PROMPT_TEMPLATE_V1, description="`{title}` is replaced by the emoji title.")
    min_pixels: int = Field(DEFAULT_MIN_PIXELS, ge=28 * 28, description="qwen: an image with fewer pixels is "
                            "upscaled to about this many (112 x 112: a small emoji still spans 4 x 4 image tokens)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=28 * 28, description="qwen: an image with more pixels is "
                            "shrunk to about this many (224 x 224: at most 64 image tokens)")
    batch_size: int = Field(8, ge=1, description="images per caption job (the unit the task runner fans out) and "
                            "per call of the captioner")
    max_new_tokens: int = Field(128, ge=1, description="qwen: longest caption generated, in tokens")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="qwen: dtype of the weights; auto: bfloat16 on CUDA, float32 on the CPU")
    device_map: str | None = Field(None, description="None: 'auto' on CUDA, plain CPU otherwise.")
    sidecars: bool = Field(True, description="also write each caption beside its image as images/<name>.txt, "
                           "as kohya, SimpleTuner and OneTrainer read captions (not part of the cache key)")
    user_captions: Literal["keep", "ignore"] = Field(
        "keep",
        description="keep: a caption a person gave stays the image's caption (captioner = user) and is never "
        "overwritten: the source's (a folder's .txt or metadata.csv prompt, a dataset's or URL list's caption "
        "column), or an images/<name>.txt sidecar edited by hand since the caption stage wrote it (it wins "
        "over the source's; delete it to go back). ignore: the captioner captions every image; a hand-edited "
        "sidecar is then left as it is, unused (not part of the cache key)",
    )

    @model_validator(mode="after")
    def _check(self) -> CaptionConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        if "{title}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{title}'")
        return self

    def cache_key(self) -> dict[str, Any]:
        """The fields that determine a caption, for keying a per-item cache."""
        if self.captioner == "offline":
            return {"captioner": "offline", "version": OFFLINE_VERSION, "prompt_version": self.prompt_version}
        prompt = hashlib.sha256((self.prompt_template + RETRY_SUFFIX).encode()).hexdigest()[:16]
        return {
            "captioner": self.captioner,
            "model_id": self.model_id,
            "revision": self.revision,
            "prompt_version": self.prompt_version,
            "prompt_sha": prompt,
            "max_new_tokens": self.max_new_tokens,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "dtype": self.dtype,
        }

    def cache_digest(self) -> str:
        """A short stable hash of `cache_key()`."""
        return hashlib.sha256(json.dumps(self.cache_key(), sort_keys=True).encode()).hexdigest()[:16]
