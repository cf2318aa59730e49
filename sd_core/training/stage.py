"""The train stage: train the denoiser on the cached pairs unless a finished run for exactly this data
and configuration exists; resume a killed run; continue from the last run when the data set grew."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from sd_core.common.images import save_png
from sd_core.diffusion.card import write_model_card
from sd_core.diffusion.models import noise_scheduler
from sd_core.encode.held_out import pick_held_out
from sd_core.encode.stage import EncodeStageConfig, cached_pairs, resolve
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json
from sd_core.store.records import StageResult, Timer, load_stage, record_stage
from sd_core.training import checkpoint as ckpt
from sd_core.training import distributed
from sd_core.training.config import TrainStageConfig
from sd_core.training.metrics import Progress, read_progress
from sd_core.training.plan import finished, plan_run
from sd_core.training.trainer import EncoderRefs, ImageSampler, Trainer

log = logging.getLogger(__name__)


def stage_key(cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog) -> str:
    """The train stage's key now: the run it owes and that run's length (``enc`` resolved)."""
    return plan_run(cfg, enc, catalog).stage_key


VALIDATION_PROMPTS = 4  # held-out captions drawn in the validation grids when train.sample_prompts is empty


def validation_sampler(enc: EncodeStageConfig, scheduler_config: Any, *, guidance_scale: float = 7.5,
                       steps: int = 25, held_out: Sequence[str] = ()) -> ImageSampler:
    """Draws the trainer's validation prompts × seeds with the UNet being trained (its EMA weights), through the
    same pipeline the export will be, into one labelled grid. Where the trainer's ``sample_prompts`` are empty
    it draws ``held_out`` (captions of the held-out split), or the example prompts without them."""
    from sd_core.caption.template import DEFAULT_PROMPTS
    from sd_core.common.devices import device
    from sd_core.diffusion.export import assemble_pipeline
    from sd_core.diffusion.generate import draw_grid
    from sd_core.encode.encoders import load_text_encoder, load_vae

    vae = load_vae(enc.vae)
    tokenizer, text_encoder = load_text_encoder(enc.text)

    def draw(unet: Any, prompts: Sequence[str], seeds: Sequence[int], out_path: Path) -> None:
        prompts = tuple(prompts) or tuple(held_out) or DEFAULT_PROMPTS
        pipe = assemble_pipeline(unet, vae, tokenizer, text_encoder, scheduler_config).to(device())
        _, grid = draw_grid(pipe, prompts, seeds, guidance_scale=guidance_scale, steps=steps)
        save_png(grid, out_path)

    return draw


def run_training(
    cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog, *, force: bool = False, progress: bool = True,
    callbacks: Sequence[Callable[[Progress], None]] = (),
) -> dict[str, Any]:
    """Train the run :func:`~sd_core.training.plan.plan_run` says is owed, unless it is finished (``enc``
    resolved). A killed run resumes from its latest checkpoint to its own planned length. ``force`` trains the
    run again in a folder beside it (``run-<key>.forced``) and swaps it in when it is complete, so the old
    model stays usable meanwhile; an interrupted forced rerun is finished by the next run."""
    procs = distributed.state()
    plan = plan_run(cfg, enc, catalog)
    staged = plan.run_dir.with_name(plan.run_dir.name + FORCED)  # a forced rerun trains beside the old run
    if force and plan.run_dir.exists():
        if procs.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
        plan = replace(plan, run_dir=staged)
    elif staged.exists():  # a forced rerun that was interrupted: finish it, then swap it in
        plan = replace(plan, run_dir=staged, reason=plan.reason + "; finishing an interrupted forced rerun")
    elif finished(plan):
        return {"status": "reused", "run": plan.run_dir.name}
    procs.wait_for_everyone()
    resume = bool(ckpt.list_checkpoints(plan.run_dir / "checkpoints"))
    if procs.is_main_process:
        log.info("train: %s%s", plan.reason, " (resuming its latest checkpoint)" if resume else "")
        plan.save()
    procs.wait_for_everyone()
    pairs = cached_pairs(enc, catalog)
    sample = cfg.sample_every and procs.is_main_process
    held_out = pick_held_out(pairs.ids, pairs.captions, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                             n=VALIDATION_PROMPTS) if sample and not cfg.sample_prompts else []
    sampler = (validation_sampler(enc, noise_scheduler(cfg.model, cfg.schedule).config, held_out=held_out)
               if sample else None)
    trainer = Trainer(cfg.trainer_config(steps=plan.steps, epochs=plan.epochs), pairs, plan.run_dir,
                      encoders=EncoderRefs(text_encoder=enc.text, vae=enc.vae), sampler=sampler,
                      callbacks=callbacks, progress=progress)
    if plan.kind == "continue":
        if not resume:
            trainer.init_from(plan.init_from, ema=cfg.ema_on_continue)
        elif cfg.ema_on_continue == "adapt":
            trainer.adapt_ema()
    result = trainer.train(resume=resume)
    if procs.is_main_process:
        if plan.run_dir.name.endswith(FORCED):
            plan = replace(plan, run_dir=swap_in(plan.run_dir))
        atomic_write_json(catalog.latest_run_json, {"run": plan.run_dir.name, "key": plan.key})
        if (plan.run_dir / "model").is_dir():  # the model card, outside the export's checksums
            write_model_card(plan.run_dir / "model", catalog=catalog)
        pruned = prune_runs(catalog, cfg.keep_runs)
    procs.wait_for_everyone()
    return {
        "status": "ran", "run": plan.run_dir.name, "plan": plan.reason, "items": len(pairs), "steps": result.step,
        "processes": procs.num_processes, "resumed": resume,
        "continued_from": plan.init_from.parent.parent.name if plan.init_from else None,
        "train_loss": _round(result.train_loss), "val_loss": _round(result.val_loss),
        "ema_val_loss": _round(result.ema_val_loss), "runs_pruned": pruned if procs.is_main_process else None,
    }


FORCED = ".forced"


def swap_in(staged: Path) -> Path:
    """Replace the run folder by the finished forced rerun beside it; the old one is kept until the new one is in."""
    final = staged.with_name(staged.name.removesuffix(FORCED))
    if final.exists():
        trash = final.with_name(f".trash-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)
    return final


def prune_runs(catalog: Catalog, keep: int) -> int:
    """Remove all but the ``keep`` newest run folders; the latest run and the champion always stay."""
    latest, champion = catalog.latest_run(), catalog.champion_run()
    def started(run: Path) -> float:  # a run's plan is written when it (re)starts
        plan = run / "plan.json"
        return (plan if plan.exists() else run).stat().st_mtime

    runs = sorted((p for p in catalog.train_dir.glob("run-*") if p.is_dir() and not p.name.endswith(FORCED)),
                  key=started, reverse=True)
    kept = [p for p in (latest, champion) if p is not None]
    kept += [p for p in runs if p not in kept][: max(0, keep - len(kept))]
    removed = 0
    for run in runs:
        if run not in kept:
            shutil.rmtree(run, ignore_errors=True)
            removed += 1
    return removed


def train_stage(cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog, *, force: bool = False,
                progress: bool = True, callbacks: Sequence[Callable[[Progress], None]] = ()) -> StageResult | None:
    """The train stage as the pipeline runs it: train (in ``cfg.processes`` processes when asked), then record
    the stage. Returns the record (None in the processes other than the main one)."""
    if cfg.processes > 1 and not distributed.launched():
        launch_cfg = catalog.state_dir / ".train-launch.json"  # hidden: imagefolder reads train* as a split
        atomic_write_json(launch_cfg, {"data_dir": str(catalog.root), "train": cfg.model_dump(mode="json"),
                                       "encode": enc.model_dump(mode="json")})
        run_dir = plan_run(cfg, resolve(enc, catalog), catalog).run_dir
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
