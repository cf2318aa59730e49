"""The train stage: train the denoiser on the cached pairs unless a finished run for exactly this data
and configuration exists; resume a killed run; continue from the last run when the data set grew."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from sd_core.common.images import save_png
from sd_core.diffusion.models import noise_scheduler
from sd_core.encode.stage import EncodeStageConfig, cached_pairs, resolve
from sd_core.encode.stage import stage_key as encode_key
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, stable_hash
from sd_core.store.records import StageResult, Timer, load_stage, record_stage
from sd_core.training import checkpoint as ckpt
from sd_core.training import distributed
from sd_core.training.config import TrainStageConfig
from sd_core.training.metrics import Progress, read_progress
from sd_core.training.trainer import EncoderRefs, ImageSampler, Trainer

CODE_VERSION = 2  # 2: diffusers UNet2DConditionModel, pipeline exports


def stage_key(cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog) -> str:
    return stable_hash({"train": cfg.trainer_config().model_dump(mode="json"), "data": encode_key(enc, catalog),
                        "code_version": CODE_VERSION})


def validation_sampler(enc: EncodeStageConfig, scheduler_config: Any, *, guidance_scale: float = 7.5,
                       steps: int = 25) -> ImageSampler:
    """Draws the trainer's fixed validation prompts × seeds with the UNet being trained (its EMA weights),
    through the same pipeline the export will be, into one labelled grid."""
    from sd_core.common.devices import device
    from sd_core.diffusion.export import assemble_pipeline
    from sd_core.diffusion.generate import draw_grid
    from sd_core.encode.encoders import load_text_encoder, load_vae

    vae = load_vae(enc.vae)
    tokenizer, text_encoder = load_text_encoder(enc.text)

    def draw(unet: Any, prompts: Sequence[str], seeds: Sequence[int], out_path: Path) -> None:
        pipe = assemble_pipeline(unet, vae, tokenizer, text_encoder, scheduler_config).to(device())
        _, grid = draw_grid(pipe, prompts, seeds, guidance_scale=guidance_scale, steps=steps)
        save_png(grid, out_path)

    return draw


def run_training(
    cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog, *, force: bool = False, progress: bool = True,
    callbacks: Sequence[Callable[[Progress], None]] = (),
) -> dict[str, Any]:
    """Train on the cached pairs unless a finished run for exactly this data and config exists.

    A killed run resumes from its latest checkpoint. When the dataset grew, ``on_new_data`` decides
    between continuing from the previous run's weights and retraining from scratch.
    """
    procs = distributed.state()
    key = stage_key(cfg, enc, catalog)
    run_dir = catalog.run_dir(f"run-{key}")
    if force and run_dir.exists() and procs.is_main_process:
        shutil.rmtree(run_dir)
    procs.wait_for_everyone()
    if (run_dir / "model").exists():
        return {"status": "reused", "run": run_dir.name}
    previous = catalog.latest_run()
    resume = bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
    init = None
    steps = None
    if not resume and previous is not None and previous != run_dir and cfg.on_new_data == "continue":
        init = ckpt.latest_checkpoint(previous / "checkpoints")
        steps = cfg.continue_steps if init is not None else None
    pairs = cached_pairs(enc, catalog)
    sample = cfg.sample_every and procs.is_main_process
    sampler = validation_sampler(enc, noise_scheduler(cfg.model, cfg.schedule).config) if sample else None
    trainer = Trainer(cfg.trainer_config(steps=steps), pairs, run_dir,
                      encoders=EncoderRefs(text_encoder=enc.text, vae=enc.vae), sampler=sampler,
                      callbacks=callbacks, progress=progress)
    if init is not None and not resume:
        trainer.init_from(init)
    result = trainer.train(resume=resume)
    if procs.is_main_process:
        atomic_write_json(catalog.latest_run_json, {"run": run_dir.name, "key": key})
    procs.wait_for_everyone()
    return {
        "status": "ran", "run": run_dir.name, "items": len(pairs), "steps": result.step,
        "processes": procs.num_processes, "resumed": resume,
        "continued_from": init.parent.parent.name if init else None,
        "train_loss": _round(result.train_loss), "val_loss": _round(result.val_loss),
        "ema_val_loss": _round(result.ema_val_loss),
    }


def train_stage(cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog, *, force: bool = False,
                progress: bool = True, callbacks: Sequence[Callable[[Progress], None]] = ()) -> StageResult | None:
    """The train stage as the pipeline runs it: train (in ``cfg.processes`` processes when asked), then record
    the stage. Returns the record (None in the processes other than the main one)."""
    if cfg.processes > 1 and not distributed.launched():
        launch_cfg = catalog.state_dir / "train-launch.json"
        atomic_write_json(launch_cfg, {"data_dir": str(catalog.root), "train": cfg.model_dump(mode="json"),
                                       "encode": enc.model_dump(mode="json")})
        run_dir = catalog.run_dir(f"run-{stage_key(cfg, resolve(enc, catalog), catalog)}")
        seen: list[int] = []

        def watch() -> None:  # hand the launched run's progress to this process's callbacks
            report = read_progress(run_dir / "progress.json")
            if report is not None and (not seen or report.step != seen[-1]):
                seen.append(report.step)
                for callback in callbacks:
                    callback(report)

        distributed.launch(cfg.processes, ["train", "--data-dir", str(catalog.root), "--config", str(launch_cfg),
                                           *(["--force"] if force else []), *([] if progress else ["--no-progress"])],
                           watch=watch)
        return load_stage(catalog, "train")
    resolved = resolve(enc, catalog)
    with Timer() as t:
        summary = run_training(cfg, resolved, catalog, force=force, progress=progress, callbacks=callbacks)
    if not distributed.is_main_process():
        return None
    status = summary.pop("status")
    return record_stage(catalog, "train", key=stage_key(cfg, resolved, catalog), summary=summary,
                        seconds=t.seconds, ran=status == "ran")


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 5)
