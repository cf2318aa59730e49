"""The vae stage: train the dataset's own VAE once (the offline default); later runs reuse it."""

from __future__ import annotations

from typing import Any

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, read_json, stable_hash
from sd_core.store.metadata import read_metadata
from sd_core.vae.train import VAETrainConfig, train_vae

CODE_VERSION = 1


def stage_key(cfg: VAETrainConfig) -> str:
    """The trained VAE depends on its settings only: a refresh that adds images reuses it, so the latents of
    earlier images stay valid (``--force vae`` retrains on the whole dataset)."""
    return stable_hash({"config": cfg.model_dump(mode="json"), "code_version": CODE_VERSION})


def ensure_vae(cfg: VAETrainConfig, catalog: Catalog, *, force: bool = False, progress: bool = True
               ) -> tuple[bool, dict[str, Any]]:
    """Train the dataset's VAE unless one with these settings exists; returns (trained now, metrics)."""
    marker = catalog.vae_dir / "emoji_sd_vae.json"
    record = read_json(marker)
    if record and record.get("key") == stage_key(cfg) and not force:
        return False, record.get("metrics", {})
    paths = [(catalog.image_path(r["file_name"]), r.get("fit") or "") for r in read_metadata(catalog)]
    metrics = train_vae(cfg, paths, catalog.vae_dir, progress=progress)
    atomic_write_json(marker, {"key": stage_key(cfg), "images": len(paths), "metrics": metrics})
    return True, metrics
