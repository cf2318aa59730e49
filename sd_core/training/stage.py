"""The train stage: train the denoiser on the cached pairs unless a finished run for exactly this data
and configuration exists; resume a killed run; continue from the last run when the data set grew; export the
finished run's EMA weights from its final checkpoint (:func:`export_model`) into ``model/``.

A run folder's export, once written, is never replaced by other weights: a longer (or shorter) run is trained
in a new folder (see :mod:`sd_core.training.plan`), and a forced rerun of the champion's run whose weights
come out different is published beside it (``run-<key>-r<digest>``) rather than over it. Whatever the train
stage writes is then scored and gated by the eval stage before it can be served."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sd_core.common.images import save_png
from sd_core.diffusion.card import write_model_card
from sd_core.diffusion.champion import find_champion
from sd_core.diffusion.export import (
    export_complete,
    model_digest,
    write_attn2_export,
    write_lora_export,
    write_scratch_export,
)
from sd_core.diffusion.models import build_unet, load_trainable_state, noise_scheduler
from sd_core.encode.held_out import pick_held_out
from sd_core.encode.stage import EncodeStageConfig, cached_pairs, resolve
from sd_core.store.catalog import Catalog
from sd_core.store.files import DamagedFileError, atomic_write_json
from sd_core.store.gc import remove_aside, run_started
from sd_core.store.records import StageResult, Timer, load_stage, record_stage
from sd_core.training import checkpoint as ckpt
from sd_core.training import distributed
from sd_core.training.config import TrainConfig, TrainStageConfig
from sd_core.training.metrics import Progress, read_progress
from sd_core.training.plan import PLAN, RunPlan, finished, plan_run
from sd_core.training.trainer import EncoderRefs, ImageSampler, NonFiniteError, Trainer

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
    if plan.rebuilt and procs.is_main_process:
        log.warning("%s was damaged (%s); rebuilt from the run's checkpoints and settings", plan.run_dir / PLAN,
                    plan.rebuilt)
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        plan.save()
    staged = plan.run_dir.with_name(plan.run_dir.name + FORCED)  # a forced rerun trains beside the old run
    if force and plan.run_dir.exists():
        if procs.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
        plan = replace(plan, run_dir=staged, extends=None)
    elif staged.exists():  # a forced rerun that was interrupted: finish it, then swap it in
        plan = replace(plan, run_dir=staged, reason=plan.reason + "; finishing an interrupted forced rerun")
    elif finished(plan):
        if procs.is_main_process:
            heal_latest(catalog, plan)
        return {"status": "reused", "run": plan.run_dir.name}
    procs.wait_for_everyone()
    if plan.extends is not None and procs.is_main_process and not ckpt.list_checkpoints(plan.run_dir / "checkpoints"):
        start_from(plan)
    procs.wait_for_everyone()
    resume = bool(ckpt.list_checkpoints(plan.run_dir / "checkpoints"))
    if procs.is_main_process:
        log.info("train: %s%s", plan.reason, " (resuming its latest checkpoint)" if resume else "")
        plan.save()
    procs.wait_for_everyone()
    pairs = cached_pairs(enc, catalog)
    sample = cfg.sample_every and procs.is_main_process
    held_out = (pick_held_out(pairs.ids, pairs.captions, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                              min_items=cfg.val_min_items, n=VALIDATION_PROMPTS)
                if sample and not cfg.sample_prompts else [])
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
        if result.step >= trainer.total_steps and result.checkpoint is not None:
            export_model(result.checkpoint, plan.run_dir / "model", items=len(pairs))
        if plan.run_dir.name.endswith(FORCED):
            plan = replace(plan, run_dir=publish_forced(catalog, plan.run_dir))
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


def export_model(checkpoint: Path, folder: Path, *, items: int) -> Path | None:
    """Export the EMA weights of a run's (final) ``checkpoint`` to ``folder`` in its model kind's format (see
    :mod:`sd_core.diffusion.export`): a from-scratch UNet as a complete pipeline with the encoders it was trained
    against (named in the checkpoint; a run without them, e.g. on synthetic pairs, is not exported and None is
    returned), a fine-tune's attn2 tensors, or its LoRA adapters in diffusers' format. ``items``: the size of
    the data set, recorded in the manifest."""
    c = ckpt.load_checkpoint(checkpoint)
    cfg, state = TrainConfig.model_validate(c.config), c.trainer_state
    ema = {n: v.float() for n, v in (c.ema if c.ema is not None else c.model).items()}
    if not all(torch.isfinite(v).all() for v in ema.values()):
        raise NonFiniteError(f"the EMA weights in {checkpoint} are not finite; nothing is exported")
    latent_shape = list(state["latent_shape"])  # (C, h, w)
    manifest = {"step": c.step, "train_config": c.config, "items": items, "latent_shape": latent_shape,
                "scaling_factor": state["scaling_factor"]}
    m = cfg.model
    if m.kind == "scratch":
        encoders = EncoderRefs.model_validate(state.get("encoders") or {})
        if encoders.vae is None or encoders.text_encoder is None:
            log.info("no encoders named in %s: the from-scratch model is not exported", checkpoint)
            return None
        unet = build_unet(m, sample_size=latent_shape[-1], latent_channels=latent_shape[0], report=lambda _: None)
        load_trainable_state(unet, ema)
        return write_scratch_export(folder, unet=unet, vae_cfg=encoders.vae, text_cfg=encoders.text_encoder,
                                    schedule=cfg.schedule, manifest=manifest)
    if m.kind == "pretrained_attn2":
        return write_attn2_export(folder, weights=ema, base_model=m.pretrained_model_id, revision=m.revision,
                                  manifest=manifest, merged=cfg.export_merged)
    # LoRA: the base UNet with the adapters, whose peft config names the adapters' layout in the export
    unet = build_unet(m, sample_size=latent_shape[-1], latent_channels=latent_shape[0], report=lambda _: None)
    return write_lora_export(folder, unet=unet, weights=ema, base_model=m.pretrained_model_id, revision=m.revision,
                             manifest=manifest, merged=cfg.export_merged)


def heal_latest(catalog: Catalog, plan: RunPlan) -> None:
    """A reused run: rewrite ``latest.json`` (with a warning) when it is missing, does not read or names a run
    folder that is gone, so that the eval stage has the run to score."""
    why = catalog.latest_problem() or ("missing" if not catalog.latest_run_json.exists() else None)
    if why is not None:
        atomic_write_json(catalog.latest_run_json, {"run": plan.run_dir.name, "key": plan.key})
        log.warning("%s was damaged (%s); it now names %s, the finished run of the current settings",
                    catalog.latest_run_json, why, plan.run_dir.name)


def start_from(plan: RunPlan) -> None:
    """A run trained to a new length in a new folder starts from the checkpoint ``plan.extends`` (the same run at
    a shorter length): that checkpoint is adopted, with the metrics and validation grids up to its step."""
    assert plan.extends is not None
    source_run = plan.extends.parent.parent
    step = ckpt.adopt_checkpoint(plan.extends, plan.run_dir / "checkpoints").name
    done = ckpt.load_step(plan.run_dir / "checkpoints" / step)
    if (source_run / "metrics.csv").exists():  # copied: the new run rewrites it, which must not touch the source
        shutil.copy2(source_run / "metrics.csv", plan.run_dir / "metrics.csv")
    for grid in sorted((source_run / "samples").glob("step-*.png")):
        if grid.stem.removeprefix("step-").isdigit() and int(grid.stem.removeprefix("step-")) <= done:
            (plan.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            shutil.copy2(grid, plan.run_dir / "samples" / grid.name)
    log.info("train: %s starts from %s/checkpoints/%s", plan.run_dir.name, source_run.name, step)


def publish_forced(catalog: Catalog, staged: Path) -> Path:
    """Put a finished forced rerun in place of its run folder, unless that folder holds the champion's export
    and the rerun's weights differ from it: then the rerun becomes a new run folder beside it
    (``run-<key>-r<digest>``), so the champion stays exactly what was evaluated and promoted."""
    final = staged.with_name(staged.name.removesuffix(FORCED))
    new = model_digest(staged / "model") if export_complete(staged / "model") else None
    try:
        champ = find_champion(catalog, repair=False)
        protected = champ is not None and champ.run == final and champ.digest != new
    except DamagedFileError:  # which run is the champion cannot be told: keep every export as it is
        protected = final.exists()
    if protected and new is not None:
        aside = final.with_name(f"{final.name}-r{new[:8]}")
        if aside.exists():
            remove_aside(aside)
        os.replace(staged, aside)
        log.warning("train: the forced rerun of %s (the champion's run) came out different; it is %s, "
                    "which the eval stage scores like any refresh", final.name, aside.name)
        return aside
    return swap_in(staged)


def swap_in(staged: Path) -> Path:
    """Replace the run folder by the finished forced rerun beside it; the old one is kept until the new one is in.
    When the rerun's export is the same as the old one (same digest), the old one's scores move with it."""
    final = staged.with_name(staged.name.removesuffix(FORCED))
    if (final / "scores").is_dir() and not (staged / "scores").exists() and export_complete(final / "model") \
            and export_complete(staged / "model") and model_digest(final / "model") == model_digest(staged / "model"):
        os.replace(final / "scores", staged / "scores")
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
    """Remove all but the ``keep`` newest run folders with a complete export; the latest run and the champion
    always stay, and so does every run while the champion cannot be told (a damaged ``current.json``).
    Folders without a complete export are left to ``emoji-sd gc``. Each is renamed aside before it is
    deleted, so a kill leaves no half-deleted run."""
    try:
        champ = find_champion(catalog, repair=False)
    except DamagedFileError as e:
        log.warning("train: no run folder pruned: %s", e)
        return 0
    latest, champion = catalog.latest_run(), champ.run if champ is not None else None
    runs = sorted((p for p in catalog.train_dir.glob("run-*") if p.is_dir() and not p.name.endswith(FORCED)
                   and export_complete(p / "model")), key=run_started, reverse=True)
    kept = [p for p in (latest, champion) if p is not None]
    kept += [p for p in runs if p not in kept][: max(0, keep - len(kept))]
    removed = 0
    for run in runs:
        if run not in kept:
            remove_aside(run)
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
