"""Distribution scores where the weights exist: FID and KID in a CLIP image-embedding space, and the CLIP
score of each prompt against its image (torchmetrics for FID and KID). When the weights are neither on disk nor reachable,
the score is skipped with the reason, never reported as zero."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def weights_reachable(name: str, timeout_s: float = 3.0) -> str | None:
    """None when ``name`` (a folder or a hub id) can be loaded here, else the reason it cannot."""
    if Path(name).is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
    except Exception:  # an id the cache helper refuses is treated as not cached
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return f"{name} is not in the local cache and HF_HUB_OFFLINE is set"
    with ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(socket.getaddrinfo, "huggingface.co", 443).result(timeout=timeout_s)
        except Exception:
            return f"{name} is not on this machine and huggingface.co cannot be reached"
    return None


class ClipImageFeatures(nn.Module):
    """uint8 images (N, 3, H, W) → CLIP image embeddings (N, D), preprocessed as CLIP's processor does
    (bicubic resize of the short side, centre crop, CLIP's mean and std)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(name, use_safetensors=True).eval()
        self.size = int(self.model.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(CLIP_STD)[None, :, None, None])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float() / 255.0, size=(self.size, self.size), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
        return self.model(pixel_values=(x - self.mean) / self.std).image_embeds.double()


def to_uint8(images: Sequence[Image.Image], size: int = 64) -> torch.Tensor:
    """(N, 3, size, size) uint8 of RGB images (resized bicubically to a common side)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def fid_kid(real: Sequence[Image.Image], fake: Sequence[Image.Image], features: nn.Module) -> dict[str, float]:
    """FID and KID (mean) between two image sets in the feature space of ``features``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    r, f = to_uint8(real), to_uint8(fake)
    fid = FrechetInceptionDistance(feature=features, reset_real_features=True, input_img_size=(3, 64, 64))
    kid = KernelInceptionDistance(feature=features, subset_size=max(2, min(len(r), len(f), 50)), subsets=20)
    for metric in (fid, kid):
        metric.update(r, real=True)
        metric.update(f, real=False)
    kid_mean, _ = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}


@torch.no_grad()
def clip_score(images: Sequence[Image.Image], prompts: Sequence[str], name: str, batch: int = 32) -> float:
    """Mean CLIP score, ``max(100 · cos(image, text), 0)`` of each prompt against its image (the definition
    torchmetrics uses; computed with transformers directly, whose CLIPModel returns both projections)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(name, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(name)
    total = 0.0
    for s in range(0, len(images), batch):
        inputs = processor(text=list(prompts[s : s + batch]), images=[im.convert("RGB") for im in images[s : s + batch]],
                           return_tensors="pt", padding=True, truncation=True)
        out = model(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        total += float((100 * cos).clamp(min=0).sum())
    return total / max(len(images), 1)


def distribution_scores(cfg: Any, real: Callable[[], Sequence[Image.Image]], fake: Sequence[Image.Image],
                        prompts: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """(scores, skipped score → reason) for ``cfg.features`` (FID, KID against the images ``real()`` loads) and
    ``cfg.clip_model`` (CLIP score of ``fake`` against ``prompts``)."""
    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if cfg.features is None:
        skipped["fid"] = skipped["kid"] = "not configured (eval.features = null)"
    elif (why := weights_reachable(cfg.features)) is not None:
        skipped["fid"] = skipped["kid"] = why
    else:
        scores.update(fid_kid(real(), fake, ClipImageFeatures(cfg.features)))
    if cfg.clip_model is None:
        skipped["clip_score"] = "not configured (eval.clip_model = null)"
    elif (why := weights_reachable(cfg.clip_model)) is not None:
        skipped["clip_score"] = why
    else:
        scores["clip_score"] = clip_score(fake, prompts, cfg.clip_model)
    return scores, skipped
