"""Which training run the train stage owes, decided from the configuration, the dataset and the runs on disk.

A run folder ``models/unet/run-<key>`` is keyed by what shapes the model (:func:`shaping`: the model and
noise schedule, the encoders and their weights, the optimiser, learning-rate and loss settings, the global
batch) and by the item set (image md5 and caption). Logging, checkpoint, sampling and speed knobs, and the
run length, are not part of it. Its ``plan.json`` records the run's own plan. The rules:

* nothing changed: the finished run is reused;
* ``train.steps`` (or ``epochs``) changed: the run goes on from its last checkpoint to the new total, in a new
  folder ``run-<key>-s<steps>`` (``-e<epochs>``) once the run has an export: an export, once written, is never
  replaced by other weights (it may be the champion, served and scored as it is), so the longer run is a new
  export that the eval stage scores and gates like any refresh;
* the item set grew and nothing that shapes the model changed: a new run starts from the champion's weights
  (the last run's before any evaluation) and trains ``train.continue_steps`` (``on_new_data = "retrain"`` trains from scratch instead);
* anything that shapes the model changed, or items were removed or recaptioned: a new run from scratch,
  and the reason names what changed;
* a killed run resumes to the length its own plan says.

A ``plan.json`` that does not read (empty, truncated, garbled) is rebuilt from what is on disk when that is
unambiguous: the run's key fixes its settings and items, its checkpoints or export its length; the train
stage writes it back with a warning. Otherwise the error names the file and says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sd_core.diffusion.champion import champion_run
from sd_core.encode.encoders import KEYED_FITS, latent_key_base, text_key_base
from sd_core.encode.pairs import split_marker
from sd_core.encode.stage import EncodeStageConfig
from sd_core.store.catalog import Catalog
from sd_core.store.files import (
    DamagedFileError,
    atomic_write_json,
    json_problem,
    read_json,
    sha256_text,
    stable_hash,
)
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
    """(image md5, caption hash) of every dataset row, and how a non-square image is made square (pad, crop)
    where that changes its latents: the item set a run trains on."""
    return [[r["md5"], sha256_text(r["prompt"])[:16], *([r["fit"]] if r.get("fit") in KEYED_FITS else [])]
            for r in read_metadata(catalog)]


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
    extends: Path | None = None  # a checkpoint of the same run at a shorter length, that a new length goes on from
    rebuilt: str = ""  # what was wrong with plan.json, when it was rebuilt from the disk

    @property
    def stage_key(self) -> str:
        """The train stage's record key: the run and the length it is trained to."""
        return stable_hash({"run": self.key, "steps": self.steps, "epochs": self.epochs})

    def save(self) -> None:
        atomic_write_json(self.run_dir / PLAN, {
            "key": self.key, "kind": self.kind, "steps": self.steps, "epochs": self.epochs,
            "init_from": str(self.init_from.relative_to(self.run_dir.parent)) if self.init_from else None,
            "extends": str(self.extends.relative_to(self.run_dir.parent)) if self.extends else None,
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


def length_tag(steps: int | None, epochs: int | None) -> str:
    """``s<steps>`` or ``e<epochs>``: the suffix of a run folder trained to another length than its first."""
    return f"s{steps}" if steps is not None else f"e{epochs}"


def run_family(catalog: Catalog, key: str) -> list[Path]:
    """The folders of one run (one key): ``run-<key>`` and those trained on to other lengths."""
    base = f"run-{key}"
    return sorted(p for p in catalog.train_dir.glob(f"{base}*")
                  if p.is_dir() and (p.name == base or p.name.startswith(f"{base}-")) and "." not in p.name)


def _exported_length(run_dir: Path) -> tuple[int | None, int | None] | None:
    """The length a run folder's export was trained to (None: no export). A ``model/`` whose manifest does not
    read counts as an export of unknown length, never to be written over."""
    if not (run_dir / "model").exists():
        return None
    manifest, _ = json_problem(run_dir / "model" / "emoji_sd_model.json")
    trained = manifest.get("train_config") if isinstance(manifest, dict) else None
    return (trained.get("steps"), trained.get("epochs")) if isinstance(trained, dict) else (-1, -1)


def _extends(catalog: Catalog, key: str, steps: int | None, epochs: int | None, exclude: Path) -> Path | None:
    """The furthest checkpoint of the run ``key`` (in any of its folders) that a run of ``steps`` (or
    ``epochs``) can go on from: at or before that length. None when there is none (train from scratch)."""
    best: tuple[int, Path] | None = None
    for run in run_family(catalog, key):
        if run == exclude:
            continue
        for folder in ckpt.list_checkpoints(run / "checkpoints"):
            state, _ = json_problem(folder / "trainer_state.json")
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                continue
            per_epoch = state.get("steps_per_epoch")
            limit = steps if steps is not None else epochs * per_epoch if isinstance(per_epoch, int) else -1
            if state["step"] <= limit and (best is None or state["step"] > best[0]):
                best = (state["step"], folder)
    return best[1] if best else None


def _recorded_length(run_dir: Path) -> tuple[int | None, int | None] | None:
    """The length a run folder was trained to or towards, from its export or else its newest checkpoint."""
    manifest, _ = json_problem(run_dir / "model" / "emoji_sd_model.json")
    trained = manifest.get("train_config") if isinstance(manifest, dict) else None
    if not isinstance(trained, dict):
        for folder in reversed(ckpt.list_checkpoints(run_dir / "checkpoints")):
            trained, _ = json_problem(folder / "config.json")
            if isinstance(trained, dict):
                break
    if not isinstance(trained, dict):
        return None
    return trained.get("steps"), trained.get("epochs")


def _own_plan(cfg: TrainStageConfig, run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """A run folder's own plan (``kind``, ``steps``, ``epochs``, ``init_from``) and, when ``plan.json`` does not
    read, what was wrong with it (the plan then rebuilt from the folder's checkpoints or export)."""
    path = run_dir / PLAN
    data, why = json_problem(path)
    if why is None and data is not None:
        if isinstance(data, dict) and data.get("kind") in ("fresh", "continue") and \
                (isinstance(data.get("steps"), int) or isinstance(data.get("epochs"), int)):
            return data, ""
        why = "not a run plan"
    if why is None:
        return None, ""  # no plan: a run that does not exist yet
    length = _recorded_length(run_dir)
    if length is None:  # nothing trained: nothing to lose, planned again as a new run
        return None, why
    if length == (cfg.steps, cfg.epochs):
        return {"kind": "fresh", "steps": cfg.steps, "epochs": cfg.epochs, "init_from": None}, why
    if length == (cfg.continue_steps, None):
        return {"kind": "continue", "steps": cfg.continue_steps, "epochs": None, "init_from": None}, why
    steps, epochs = length
    raise DamagedFileError(path, why, f"its run was trained to {steps or epochs} {'steps' if steps else 'epochs'}, "
                                      "neither train.steps nor train.continue_steps, so its plan cannot be rebuilt; "
                                      f"set train.steps={steps} to go on with it, or delete {run_dir} to retrain it")


def plan_run(cfg: TrainStageConfig, enc: EncodeStageConfig, catalog: Catalog) -> RunPlan:
    """The run the train stage owes now (``enc`` resolved). Reads the disk; writes nothing."""
    fields, items = shaping(cfg, enc), dataset_items(catalog)
    split = split_marker([item[0] for item in items], cfg.val_fraction, cfg.split_seed, cfg.val_min_items)
    key = stable_hash({"shaping": fields, "items": items, **split})  # split: {} unless val_min_items moved it
    run_dir = catalog.run_dir(f"run-{key}")
    own, damaged = _own_plan(cfg, run_dir)
    note = {"rebuilt": damaged} if damaged else {}
    if own is not None:  # this run exists: it keeps its kind, and a continuation its own length
        if own["kind"] == "continue":
            init = catalog.train_dir / own["init_from"] if own.get("init_from") else None
            return RunPlan(run_dir, key, "continue", own["steps"], None, init, "the planned continuation",
                           fields, items, **note)
        exported = _exported_length(run_dir)
        if exported is None or exported == (cfg.steps, cfg.epochs):  # no export yet, or this length's
            return RunPlan(run_dir, key, "fresh", cfg.steps, cfg.epochs, None, "the configured run", fields, items,
                           **note)
        # another length than the run's export: a new folder, so that export stays exactly as it was scored
        longer = run_dir.with_name(f"{run_dir.name}-{length_tag(cfg.steps, cfg.epochs)}")
        mine, damaged_too = _own_plan(cfg, longer)
        if mine is not None:
            return RunPlan(longer, key, "fresh", cfg.steps, cfg.epochs, None, "the configured run", fields, items,
                           rebuilt=damaged_too)
        start = _extends(catalog, key, cfg.steps, cfg.epochs, exclude=longer)
        was = ("of unknown length" if exported == (-1, -1) else
               f"of {exported[0]} steps" if exported[0] else f"of {exported[1]} epochs")
        length = f"{cfg.steps} steps" if cfg.steps else f"{cfg.epochs} epochs"
        how = (f"going on from {start.parent.parent.name}'s step {ckpt.load_step(start)}" if start else
               "from scratch")
        return RunPlan(longer, key, "fresh", cfg.steps, cfg.epochs, None,
                       f"training {run_dir.name} to {length} in a new folder, {how} ({run_dir.name}'s export "
                       f"{was} stays as it was evaluated)", fields, items, extends=start, rebuilt=damaged_too)
    fresh = RunPlan(run_dir, key, "fresh", cfg.steps, cfg.epochs, None, "a first run", fields, items, **note)
    previous = champion_run(catalog, repair=False) or catalog.latest_run()  # never build on a rejected run
    if previous is None:
        return fresh
    before, broken = json_problem(previous / PLAN)
    if broken is not None or (before is not None and not isinstance(before, dict)):
        return _why(fresh, f"retraining from scratch: {previous / PLAN} is damaged ({broken or 'not a run plan'}), "
                           "so what that run was trained on is unknown")
    if before is None:
        return fresh
    if not isinstance(before.get("shaping"), dict) or not isinstance(before.get("items"), list):
        return _why(fresh, f"retraining from scratch: {previous / PLAN} is damaged (not a run plan), so what that "
                           "run was trained on is unknown")
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
    return replace(fresh, kind="continue", steps=cfg.continue_steps, epochs=None, init_from=init,
                   reason=f"continuing {previous.name} (step {ckpt.load_step(init)}) for {cfg.continue_steps} steps "
                          f"on {len(new)} items ({len(new - old)} new)")


def _why(plan: RunPlan, reason: str) -> RunPlan:
    return replace(plan, reason=reason)


def finished(plan: RunPlan) -> bool:
    """Whether the run's export exists and was trained to this plan's length."""
    manifest = read_json(plan.run_dir / "model" / "emoji_sd_model.json")
    if manifest is None:
        return False
    trained = manifest.get("train_config", {})
    return trained.get("steps") == plan.steps and trained.get("epochs") == plan.epochs
