"""Which training run the train stage owes, decided from the configuration, the dataset and the runs on disk.

A run folder ``models/unet/run-<key>`` is keyed by what shapes the model (:func:`shaping`: the model and
noise schedule, the encoders and their weights, the optimiser, learning-rate and loss settings, the global
batch) and by the item set (image md5 and caption). Logging, checkpoint, sampling and speed knobs, and the
run length, are not part of it. Its ``plan.json`` records the run's own plan. The rules:

* nothing changed: the finished run is reused;
* ``train.steps`` (or ``epochs``) changed: the same run continues from its last checkpoint to the new total;
* the item set grew and nothing that shapes the model changed: a new run starts from the champion's weights
  (the last run's before any evaluation) and trains ``train.continue_steps`` (``on_new_data = "retrain"`` trains from scratch instead);
* anything that shapes the model changed, or items were removed or recaptioned: a new run from scratch,
  and the reason names what changed;
* a killed run resumes to the length its own plan says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sd_core.encode.encoders import latent_key_base, text_key_base
from sd_core.encode.pairs import split_marker
from sd_core.encode.stage import EncodeStageConfig
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, read_json, sha256_text, stable_hash
from sd_core.store.metadata import read_metadata
from sd_core.training import checkpoint as ckpt
from sd_core.training.config import TrainStageConfig

CODE_VERSION = 3  # 3: diffusers UNet2DConditionModel, pipeline exports, planned continuation
PLAN = "plan.json"
SHAPING_FIELDS = ("model", "schedule", "lr", "lr_min", "warmup_steps", "weight_decay", "adam_betas", "grad_clip",
                  "caption_dropout", "ema_decay", "ema_warmup", "min_snr_gamma", "noise_offset", "seed",
                  "val_fraction", "split_seed", "mixed_precision")

Kind = Literal["fresh", "continue"]


def shaping(cfg: TrainStageConfig, enc: EncodeStageConfig) -> dict[str, Any]:
    """What shapes the trained model, and so names its run (``enc`` resolved)."""
    dump = cfg.model_dump(mode="json")
    key = {f: dump[f] for f in SHAPING_FIELDS}
    if not cfg.schedule.rescale_betas_zero_snr:  # named only when set, so that earlier runs keep their keys
        del key["schedule"]["rescale_betas_zero_snr"]
    if cfg.timestep_sampling != "uniform":  # named only when set, so that earlier runs keep their keys
        key["timesteps"] = {f: dump[f] for f in ("timestep_sampling", "timestep_logit_mean", "timestep_logit_std")}
    return {
        **key,
        "global_batch": cfg.batch_size * cfg.processes * cfg.gradient_accumulation_steps,
        "latents": latent_key_base(enc.vae),
        "text": text_key_base(enc.text),
        "code_version": CODE_VERSION,
    }


def dataset_items(catalog: Catalog) -> list[list[str]]:
    """(image md5, caption hash) of every dataset row: the item set a run trains on."""
    return [[r["md5"], sha256_text(r["prompt"])[:16]] for r in read_metadata(catalog)]


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    key: str  # the run's identity: shaping settings and item set
    kind: Kind
    steps: int | None  # the run's planned length (``epochs`` when steps is None)
    epochs: int | None
    init_from: Path | None  # the checkpoint a continuation starts from
    reason: str  # why this plan, in a sentence for the log
    shaping: dict[str, Any]
    items: list[list[str]]

    @property
    def stage_key(self) -> str:
        """The train stage's record key: the run and the length it is trained to."""
        return stable_hash({"run": self.key, "steps": self.steps, "epochs": self.epochs})

    def save(self) -> None:
        atomic_write_json(self.run_dir / PLAN, {
            "key": self.key, "kind": self.kind, "steps": self.steps, "epochs": self.epochs,
            "init_from": str(self.init_from.relative_to(self.run_dir.parent)) if self.init_from else None,
            "reason": self.reason, "shaping": self.shaping, "items": self.items,
        })


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two nested settings dicts."""
    out = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def plan_run(cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog) -> RunPlan:
    """The run the train stage owes now (``enc`` resolved). Reads the disk; writes nothing."""
    fields, items = shaping(cfg, enc), dataset_items(catalog)
    split = split_marker([md5 for md5, _ in items], cfg.val_fraction, cfg.split_seed, cfg.val_min_items)
    key = stable_hash({"shaping": fields, "items": items, **split})  # split: {} unless val_min_items moved it
    run_dir = catalog.run_dir(f"run-{key}")
    own = read_json(run_dir / PLAN)
    if own is not None:  # this run exists: it keeps its kind, and a continuation its own length
        if own["kind"] == "continue":
            init = catalog.train_dir / own["init_from"] if own.get("init_from") else None
            return RunPlan(run_dir, key, "continue", own["steps"], None, init, "the planned continuation",
                           fields, items)
        return RunPlan(run_dir, key, "fresh", cfg.steps, cfg.epochs, None, "the configured run", fields, items)
    fresh = RunPlan(run_dir, key, "fresh", cfg.steps, cfg.epochs, None, "a first run", fields, items)
    previous = catalog.champion_run() or catalog.latest_run()  # never build on a run the eval stage rejected
    before = read_json(previous / PLAN) if previous is not None else None
    if before is None:
        return fresh
    changed = _changed(before["shaping"], fields)
    if changed:
        return _why(fresh, "retraining from scratch: settings that shape the model changed: " + ", ".join(changed))
    old, new = {tuple(i) for i in before["items"]}, {tuple(i) for i in items}
    if not old < new:
        return _why(fresh, f"retraining from scratch: {len(old - new)} items of the last run were removed or "
                           "recaptioned")
    if cfg.on_new_data == "retrain":
        return _why(fresh, f"retraining from scratch on {len(new)} items ({len(new - old)} new; on_new_data=retrain)")
    init = ckpt.usable_checkpoint(previous / "checkpoints", move_aside=False)
    if init is None:
        return _why(fresh, f"retraining from scratch: {previous.name} has no checkpoint to continue from")
    return RunPlan(run_dir, key, "continue", cfg.continue_steps, None, init,
                   f"continuing {previous.name} (step {ckpt.load_step(init)}) for {cfg.continue_steps} steps on "
                   f"{len(new)} items ({len(new - old)} new)", fields, items)


def _why(plan: RunPlan, reason: str) -> RunPlan:
    return RunPlan(plan.run_dir, plan.key, plan.kind, plan.steps, plan.epochs, plan.init_from, reason,
                   plan.shaping, plan.items)


def finished(plan: RunPlan) -> bool:
    """Whether the run's export exists and was trained to this plan's length."""
    manifest = read_json(plan.run_dir / "model" / "emoji_sd_model.json")
    if manifest is None:
        return False
    trained = manifest.get("train_config", {})
    return trained.get("steps") == plan.steps and trained.get("epochs") == plan.epochs
