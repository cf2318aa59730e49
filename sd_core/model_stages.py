"""The model stages: ``vae`` (the offline default trains a small VAE on the dataset), ``train``
(the denoiser on the cached pairs) and ``sample`` (grids from the trained model)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sd_core import checkpoint as ckpt
from sd_core.catalog import Catalog
from sd_core.dataset import read_metadata
from sd_core.encode_stage import EncodeStageConfig, StorePairs
from sd_core.encode_stage import stage_key as encode_key
from sd_core.fsio import atomic_write_json, read_json, stable_hash
from sd_core.sampling import SampleConfig, sample_to_folder
from sd_core.train import EncoderRefs, TrainConfig, Trainer
from sd_core.vae_train import VAETrainConfig, train_vae

VAE_CODE_VERSION = 1
TRAIN_CODE_VERSION = 1
SAMPLE_CODE_VERSION = 1


# --- vae -----------------------------------------------------------------------------------------


def vae_key(cfg: VAETrainConfig) -> str:
    """The trained VAE depends on its settings only: a refresh that adds images reuses it, so the
    latents of earlier images stay valid (``--force vae`` retrains on the whole dataset)."""
    return stable_hash({"config": cfg.model_dump(mode="json"), "code_version": VAE_CODE_VERSION})


def ensure_vae(cfg: VAETrainConfig, catalog: Catalog, *, force: bool = False, progress: bool = True
               ) -> tuple[bool, dict[str, Any]]:
    """Train the dataset's VAE unless one with these settings exists; returns (trained now, metrics)."""
    marker = catalog.vae_dir / "emoji_sd_vae.json"
    record = read_json(marker)
    if record and record.get("key") == vae_key(cfg) and not force:
        return False, record.get("metrics", {})
    paths = [catalog.image_path(r["file_name"]) for r in read_metadata(catalog)]
    metrics = train_vae(cfg, paths, catalog.vae_dir, progress=progress)
    atomic_write_json(marker, {"key": vae_key(cfg), "images": len(paths), "metrics": metrics})
    return True, metrics


# --- train ---------------------------------------------------------------------------------------


class TrainStageConfig(TrainConfig):
    """The trainer's settings plus what to do when the dataset grew since the last run."""

    on_new_data: Literal["continue", "retrain"] = Field(
        "continue", description="continue: start from the last run's weights and train continue_steps more; "
                                "retrain: train from scratch on the whole dataset")
    continue_steps: int = Field(500, ge=1)

    def trainer_config(self, *, steps: int | None = None) -> TrainConfig:
        data = self.model_dump(exclude={"on_new_data", "continue_steps"})
        if steps is not None:
            data.update(steps=steps, epochs=None)
        return TrainConfig.model_validate(data)


def train_key(cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog) -> str:
    return stable_hash({"train": cfg.trainer_config().model_dump(mode="json"), "data": encode_key(enc, catalog),
                        "code_version": TRAIN_CODE_VERSION})


def latest_run(catalog: Catalog) -> Path | None:
    """The folder of the last completed training run (its ``model/`` export is what samples use)."""
    pointer = read_json(catalog.train_dir / "latest.json")
    return catalog.train_dir / pointer["run"] if pointer else None


def run_training(
    cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog, *, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train on the cached pairs unless a finished run for exactly this data and config exists.

    A killed run resumes from its latest checkpoint. When the dataset grew, ``on_new_data``
    decides between continuing from the previous run's weights and retraining from scratch.
    """
    key = train_key(cfg, enc, catalog)
    run_dir = catalog.train_dir / f"run-{key}"
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    if (run_dir / "model").exists():
        return {"status": "reused", "run": run_dir.name}
    previous = latest_run(catalog)
    resume = bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
    init = None
    steps = None
    if not resume and previous is not None and previous != run_dir and cfg.on_new_data == "continue":
        init = ckpt.latest_checkpoint(previous / "checkpoints")
        steps = cfg.continue_steps if init is not None else None
    pairs = StorePairs(enc, catalog)
    sampler = _validation_sampler(cfg, enc, pairs) if cfg.sample_every else None
    trainer = Trainer(cfg.trainer_config(steps=steps), pairs, run_dir, encoders=EncoderRefs(text_encoder=enc.text,
                      vae=enc.vae), sampler=sampler, progress=progress)
    if init is not None and not resume:
        trainer.init_from(init)
    result = trainer.train(resume=resume)
    atomic_write_json(catalog.train_dir / "latest.json", {"run": run_dir.name, "key": key})
    return {
        "status": "ran", "run": run_dir.name, "items": len(pairs), "steps": result.step,
        "resumed": resume, "continued_from": init.parent.parent.name if init else None,
        "train_loss": _round(result.train_loss), "val_loss": _round(result.val_loss),
        "ema_val_loss": _round(result.ema_val_loss),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 5)


def _validation_sampler(cfg: TrainStageConfig, enc: EncodeStageConfig, pairs: StorePairs):  # type: ignore[no-untyped-def]
    from sd_core.sampling import HFTextEncoder, VaeDecoder, validation_sampler

    probe = pairs.batch([0])["mean"]
    return validation_sampler(HFTextEncoder.load(enc.text), VaeDecoder.load(enc.vae, pairs.scaling_factor),
                              cfg.schedule, tuple(probe.shape[1:]))


# --- sample --------------------------------------------------------------------------------------


def sample_key(cfg: SampleConfig, catalog: Catalog) -> str:
    pointer = read_json(catalog.train_dir / "latest.json") or {}
    return stable_hash({"model": pointer.get("key"), "config": cfg.model_dump(mode="json"),
                        "code_version": SAMPLE_CODE_VERSION})


def run_sampling(cfg: SampleConfig, catalog: Catalog, *, force: bool = False) -> dict[str, Any]:
    """Draw the configured prompts from the latest trained model into ``samples/``."""
    run = latest_run(catalog)
    if run is None or not (run / "model").exists():
        raise FileNotFoundError(f"no trained model in {catalog.train_dir}: run the train stage")
    key = sample_key(cfg, catalog)
    record = read_json(catalog.samples_dir / "samples_key.json")
    if record and record.get("key") == key and (catalog.samples_dir / "grid.png").exists() and not force:
        return {"status": "reused", "grid": str(catalog.samples_dir / "grid.png")}
    result = sample_to_folder(run / "model", cfg, catalog.samples_dir)
    atomic_write_json(catalog.samples_dir / "samples_key.json", {"key": key, "run": run.name})
    return {"status": "ran", "prompts": len(cfg.prompts), "images": sum(len(r) for r in result.images),
            "grid": str(result.grid)}


def report_figures(catalog: Catalog) -> list[tuple[Path, str]]:
    """The pictures worth a look after a run, with captions, where they exist."""
    figs = [(catalog.vae_dir / "reconstructions.png", "the dataset's VAE: originals (top) and reconstructions")]
    run = latest_run(catalog)
    if run is not None:
        figs.append((run / "loss_curve.png", "training loss and held-out loss (fixed timesteps and noise)"))
        figs.extend((p, f"validation samples at {p.stem}") for p in sorted((run / "samples").glob("step-*.png")))
    figs.append((catalog.samples_dir / "grid.png", "samples per prompt (columns: seeds)"))
    figs.append((catalog.samples_dir / "guidance_sweep.png", "classifier-free guidance sweep"))
    return figs
