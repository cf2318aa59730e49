"""The eval stage: score the newest run on a fixed held-out set, and make it the champion only if it is no
worse than the current one.

Scores (``<run>/scores/scores.json``, one row per evaluated run in ``models/evaluations.csv``):

* ``held_out_loss``: ε-MSE (v-MSE for a v-prediction model) of the exported (EMA) model on the held-out
  items, at a fixed grid of timesteps with fixed noise, from each image's latent mean under the model's own
  VAE and its prompt under the model's own text encoder: two runs with the same prediction target, VAE, text
  encoder and noise schedule compare number for number (promotion leaves it out otherwise);
* ``prompt_following``: images drawn from the held-out captions are described by the configured
  captioner, and the share of the prompt's attributes that come back is counted (skin colour, head shape,
  background; with Qwen2.5-VL also eyes, mouth, expression). Also reported: the same at guidance 0 (what the
  model draws without the text), for the real held-out images (what the captioner can read at best), for
  those images after a round trip through the model's VAE (what its latent space can hold: the UNet's
  ceiling), and the chance level of the attribute distribution;
* ``fid``, ``kid``, ``clip_score`` where their weights can be loaded (see :mod:`sd_core.eval.distribution`).

Promotion: ``models/current.json`` names the champion and the digest of its evaluated export (written atomically
with a checksum, see :mod:`sd_core.store.champion`; served only through
:func:`sd_core.diffusion.champion.served_model`). The first evaluated run becomes champion; a later
run replaces it only if none of the scores in ``eval.promote_if`` is worse than the champion's by more than
its tolerance, both scored on the same evaluation set (the champion is scored again when the set changed).
Otherwise the run is kept, marked rejected with its figures. ``promote=True`` (``--promote``) forces it.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from sd_core.caption.captioners import build_captioner, caption_batch
from sd_core.caption.config import CaptionConfig
from sd_core.caption.offline import OfflineCaptioner
from sd_core.common.devices import device
from sd_core.common.images import image_to_tensor, make_grid, save_png
from sd_core.diffusion.card import write_model_card
from sd_core.diffusion.champion import ChampionError, find_champion
from sd_core.diffusion.export import conditioning_digest, load_pipeline, model_digest
from sd_core.diffusion.generate import generate
from sd_core.diffusion.schedulers import denoising_sse
from sd_core.encode.pairs import split_ids
from sd_core.eval.attributes import ALL_ATTRIBUTES, PIXEL_ATTRIBUTES, chance_rate, follow_rate
from sd_core.eval.config import SCORES, EvalConfig
from sd_core.eval.distribution import distribution_scores
from sd_core.store.catalog import Catalog
from sd_core.store.champion import write_champion
from sd_core.store.files import (
    DamagedFileError,
    atomic_write_json,
    atomic_write_text,
    json_problem,
    read_json,
    stable_hash,
)
from sd_core.store.metadata import read_metadata

log = logging.getLogger(__name__)

CODE_VERSION = 3  # 2: each held-out image starts from its own seed; 3: held-out loss in the model's own spaces
HISTORY_FIELDS = ("evaluated_at", "run", "status", "dataset_items", "eval_items", "steps", "held_out_loss",
                  "prompt_following", "prompt_following_g0", "prompt_following_real", "chance", "fid", "kid",
                  "clip_score")


@dataclass(frozen=True)
class EvalSet:
    """The held-out rows scored: the validation side of the training split, a fixed sample of it."""

    rows: list[dict[str, str]]
    indices: list[int]  # positions of ``rows`` in the dataset (for the cached pairs)

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]

    def key(self) -> list[tuple[str, str]]:
        return [(r["md5"], r["prompt"]) for r in self.rows]


def eval_set(catalog: Catalog, cfg: EvalConfig, val_fraction: float, split_seed: int) -> EvalSet:
    rows = read_metadata(catalog)
    _, held = split_ids([r["md5"] for r in rows], val_fraction, split_seed)
    held = sorted(held, key=lambda i: stable_hash({"md5": rows[i]["md5"], "seed": cfg.seed}))[: cfg.items]
    held.sort()
    return EvalSet([rows[i] for i in held], held)


def eval_key(digest: str, cfg: EvalConfig, captioner: CaptionConfig, items: EvalSet) -> str:
    """What an evaluation's figures depend on: the model's content, the eval settings, the captioner and the set."""
    settings = cfg.model_dump(mode="json", exclude={"promote_if", "grid_items"})
    return stable_hash({"model": digest, "eval": settings, "captioner": captioner.cache_digest(),
                        "items": items.key(), "code_version": CODE_VERSION})


def _captioner_attributes(captioner: CaptionConfig) -> tuple[str, ...]:
    return PIXEL_ATTRIBUTES if captioner.captioner == "offline" else ALL_ATTRIBUTES


def _read(captioner: Any, images: Sequence[Image.Image], titles: Sequence[str]) -> list[str]:
    """The captioner's descriptions of ``images`` (validated, as the caption stage writes them)."""
    return [r.text for r in caption_batch(captioner, OfflineCaptioner(), list(images), list(titles))]


@torch.no_grad()
def encode_latents(pipe: Any, images: Sequence[Image.Image], *, batch_size: int = 16) -> torch.Tensor:
    """The latent means (unscaled, on the CPU) of ``images`` under the model's own VAE, at the model's
    resolution and with the encode stage's preprocessing."""
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    vae, out = pipe.vae, []
    for s in range(0, len(images), batch_size):
        x = torch.stack([image_to_tensor(im, size) for im in images[s : s + batch_size]])
        out.append(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu())
    return torch.cat(out)


@torch.no_grad()
def vae_round_trip(pipe: Any, latents: torch.Tensor, *, batch_size: int = 16) -> list[Image.Image]:
    """``latents`` (of :func:`encode_latents`) decoded: what the model's latent space keeps of the images, the
    ceiling of what the UNet can draw."""
    vae, out = pipe.vae, []
    for s in range(0, len(latents), batch_size):
        z = latents[s : s + batch_size].to(vae.device, vae.dtype)
        out += pipe.image_processor.postprocess(vae.decode(z).sample.float(), output_type="pil")
    return out


@torch.no_grad()
def held_out_loss(pipe: Any, latents: torch.Tensor, prompts: Sequence[str], cfg: EvalConfig) -> float:
    """ε-MSE (v-MSE for a v-prediction model) at ``cfg.loss_timesteps`` fixed timesteps with fixed noise, from
    each held-out image's latent mean (:func:`encode_latents`) and its prompt, both through the model's own VAE
    and text encoder: each model is scored in the latent space it was trained in, whatever the encode stage
    is set to now."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, dev = pipe.unet, pipe.unet.device
    n, k = len(prompts), cfg.loss_timesteps
    total_steps = int(sched.config.num_train_timesteps)
    g = torch.Generator().manual_seed(cfg.loss_seed)
    noise = torch.randn((k, *latents.shape), generator=g)
    x0 = latents * float(pipe.vae.config.scaling_factor)
    text = torch.cat([pipe.encode_prompt(list(prompts[s : s + cfg.batch_size]), dev, 1, False)[0].float().cpu()
                      for s in range(0, n, cfg.batch_size)])
    total = 0.0
    for j in range(k):
        t_value = int((j + 0.5) * total_steps / k)
        for s in range(0, n, cfg.batch_size):
            b = slice(s, s + cfg.batch_size)
            t = torch.full((x0[b].shape[0],), t_value, dtype=torch.long, device=dev)
            total += denoising_sse(unet, sched, x0[b].to(dev, unet.dtype), noise[j, b].to(dev, unet.dtype), t,
                                   text[b].to(dev, unet.dtype))
    return total / (k * n * noise[0, 0].numel())


SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                   "rescale_betas_zero_snr")


def held_out_basis(model: Path) -> str:
    """What a held-out loss is measured against, besides the prediction type: the VAE and text encoder (see
    :func:`~sd_core.diffusion.export.conditioning_digest`) and the noise schedule, all read from the export's
    content (never from where it lies: a copied or moved data directory compares the same). Two models'
    held-out losses compare only when this is the same."""
    from diffusers import DDPMScheduler

    raw, _ = json_problem(Path(model) / "scheduler" / "scheduler_config.json")
    schedule = None  # a fine-tune's schedule is its base model's, which the conditioning digest names
    if isinstance(raw, dict):
        full = DDPMScheduler.from_config(raw).config  # defaults filled in, as the pipeline loads it
        schedule = {k: full.get(k) for k in SCHEDULE_FIELDS}
    return stable_hash({"conditioning": conditioning_digest(model), "schedule": schedule})


def evaluate(model: Path, *, cfg: EvalConfig, captioner_cfg: CaptionConfig, catalog: Catalog, items: EvalSet,
             captioner: Any = None) -> dict[str, Any]:
    """Score the export at ``model`` (a run's ``model/``) on ``items``; writes the run's scores and grid."""
    started = time.perf_counter()
    pipe = load_pipeline(model, device=device())
    captioner = captioner or build_captioner(captioner_cfg)
    attributes = _captioner_attributes(captioner_cfg)
    prompts, titles = items.prompts, [r["image_title"] for r in items.rows]
    seeds = [cfg.seed + j for j in range(cfg.seeds_per_item)]
    # every image its own noise, the same for the guided and the unguided draw of an item: with one shared
    # set of seeds the unguided score would rest on seeds_per_item images in all (one per seed, whatever the
    # prompt), and moved by 13 points between two sets of 3 seeds on the demo
    common = dict(steps=cfg.steps, sampler_name=cfg.scheduler, batch_size=cfg.batch_size,
                  seed_stride=cfg.seeds_per_item)
    guided = generate(pipe, prompts, seeds, guidance_scale=cfg.guidance_scale, **common)  # [item][seed]
    unguided = generate(pipe, prompts, seeds, guidance_scale=0.0, **common)
    drawn, free = [row[0] for row in guided], [row[0] for row in unguided]
    real = [Image.open(catalog.image_path(r["file_name"])).convert("RGB") for r in items.rows]
    latents = encode_latents(pipe, real, batch_size=cfg.batch_size)  # each image file read and encoded once
    kept = vae_round_trip(pipe, latents, batch_size=cfg.batch_size)
    each, each_title = [p for p in prompts for _ in seeds], [t for t in titles for _ in seeds]  # item-major
    readings = {"guided": _read(captioner, [im for row in guided for im in row], each_title),
                "g0": _read(captioner, [im for row in unguided for im in row], each_title),
                "real": _read(captioner, real, titles), "vae": _read(captioner, kept, titles)}
    follow = {name: follow_rate(each if name in ("guided", "g0") else prompts, texts, attributes)
              for name, texts in readings.items()}

    def dataset() -> list[Image.Image]:  # the reference set of FID/KID: up to 1024 of the dataset's images
        rows = sorted(read_metadata(catalog), key=lambda r: stable_hash({"md5": r["md5"]}))[:1024]
        return [Image.open(catalog.image_path(r["file_name"])).convert("RGB") for r in rows]

    dist, skipped = distribution_scores(cfg, dataset, drawn, prompts)
    scores = {
        "held_out_loss": held_out_loss(pipe, latents, prompts, cfg),
        "prompt_following": follow["guided"]["all"],
        "prompt_following_g0": follow["g0"]["all"],
        "prompt_following_real": follow["real"]["all"],
        "prompt_following_vae": follow["vae"]["all"],
        "prompt_following_gain": follow["guided"]["all"] - follow["g0"]["all"],
        "chance": chance_rate(prompts, attributes),
        **dist,
    }
    per_attribute = {a: {name: f.get(a) for name, f in follow.items()} for a in attributes}
    out_dir = catalog.eval_dir(Path(model).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.grid_items:
        n = min(cfg.grid_items, len(prompts))
        cells = [[real[i], kept[i], drawn[i], free[i]] for i in range(n)]
        grid = make_grid(cells, prompts[:n], ["real", "VAE", f"w = {cfg.guidance_scale:g}", "w = 0"], cell_size=64,
                         label_width=320)
        save_png(grid, out_dir / "grid.png")
    result = {
        "model": str(model), "digest": model_digest(model), "items": len(prompts), "attributes": list(attributes),
        "guidance_scale": cfg.guidance_scale, "scores": scores, "per_attribute": per_attribute, "skipped": skipped,
        "seeds_per_item": cfg.seeds_per_item, "prediction_type": pipe.scheduler.config.prediction_type,
        "held_out_basis": held_out_basis(model),
        "readings": {name: texts[: cfg.grid_items] for name, texts in readings.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(catalog.eval_json(Path(model).parent), result)
    return result


def compare(new: dict[str, float], champion: dict[str, float], promote_if: dict[str, float]) -> list[str]:
    """The scores on which ``new`` is worse than ``champion`` beyond their tolerance (empty: promote)."""
    worse = []
    for name, tol in promote_if.items():
        a, b = new.get(name), champion.get(name)
        if a is None or b is None:
            continue  # a score neither side has (skipped) cannot decide
        better, kind = SCORES[name]
        slack = tol if kind == "absolute" else tol * abs(b)
        if (better == "higher" and a < b - slack) or (better == "lower" and a > b + slack):
            worse.append(f"{name} {a:.4g} vs champion {b:.4g} (tolerance {tol:g} {kind})")
    return worse


def promotion_rules(promote_if: dict[str, float], new: dict[str, Any],
                    champion: dict[str, Any]) -> tuple[dict[str, float], str]:
    """The scores that can decide between two evaluated runs, and a note on any left out: held-out losses
    compare only between models with the same prediction type (ε-MSE against v-MSE), VAE, text encoder and
    noise schedule (see :func:`held_out_basis`)."""
    if "held_out_loss" not in promote_if:
        return dict(promote_if), ""
    kinds = [r.get("prediction_type", "epsilon") for r in (new, champion)]  # records before v-prediction: ε
    if kinds[0] != kinds[1]:
        why = f"{kinds[0]} against the champion's {kinds[1]}"
    elif new.get("held_out_basis") != champion.get("held_out_basis"):
        why = "the champion has another VAE, text encoder or noise schedule"
    else:
        return dict(promote_if), ""
    rules = {k: v for k, v in promote_if.items() if k != "held_out_loss"}
    return rules, f" (held_out_loss not compared: {why})"


def _scores_for(run: Path, key_of: Any, **kw: Any) -> dict[str, Any]:
    """The run's evaluation on the current set: reused from its ``eval.json`` when the key matches."""
    catalog: Catalog = kw["catalog"]
    key = key_of(model_digest(run / "model"))
    done = read_json(catalog.eval_json(run))
    if done is not None and done.get("key") == key:
        return done
    result = evaluate(run / "model", **kw)
    result["key"] = key
    atomic_write_json(catalog.eval_json(run), result)
    return result


def _append_history(catalog: Catalog, run: Path, result: dict[str, Any], status: str) -> None:
    path = catalog.eval_history_csv
    existing = path.read_text("utf-8") if path.exists() else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n", extrasaction="ignore")
    if not existing:
        writer.writeheader()
    manifest = read_json(run / "model" / "emoji_sd_model.json") or {}
    writer.writerow({
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": run.name, "status": status,
        "dataset_items": len(read_metadata(catalog)), "eval_items": result["items"], "steps": manifest.get("step"),
        **{k: round(v, 6) for k, v in result["scores"].items()},
    })
    atomic_write_text(path, existing + buf.getvalue())


def read_history(catalog: Catalog) -> list[dict[str, str]]:
    try:
        with open(catalog.eval_history_csv, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _current_champion(catalog: Catalog, candidate: Path, digest: str, promote: bool) -> tuple[Path | None, str]:
    """The champion's run folder to compare ``candidate`` with (None: no champion yet, or ``promote`` overrides a
    record that cannot be used), and a note when ``promote`` overrode one. The candidate counts as the
    champion only when its export is the very one that was promoted (the same digest): otherwise its
    weights were not evaluated, and without ``promote`` that is an error naming the file."""
    try:
        champ = find_champion(catalog, repair=True)
    except DamagedFileError as e:
        if not promote:
            raise
        return None, f"forced over a damaged champion record: {e}"
    if champ is None:
        return None, ""
    if champ.run == candidate and champ.digest != digest:
        if not promote:
            raise ChampionError(
                f"{catalog.current_json} names {candidate.name} with digest {champ.digest}, but its export now has "
                f"digest {digest}: it was replaced after it was evaluated; evaluate and promote it with "
                "`emoji-sd run --from eval --force eval --promote`, or restore the promoted export")
        return None, f"forced: {candidate.name}'s export had changed since it was promoted"
    if champ.run != candidate and not (champ.run / "model").is_dir():
        if not promote:
            raise ChampionError(f"{catalog.current_json} names {champ.run.name}, whose export is missing, so "
                                f"{candidate.name} cannot be compared with it; restore it, or promote "
                                f"{candidate.name} with `emoji-sd run --from eval --promote`")
        return None, f"forced: the champion {champ.run.name}'s export is missing"
    return champ.run, ""


def run_eval(cfg: EvalConfig, captioner_cfg: CaptionConfig, catalog: Catalog, *, val_fraction: float,
             split_seed: int, force: bool = False, promote: bool = False) -> dict[str, Any]:
    """Evaluate the latest run, compare it with the champion, promote or reject it."""
    if why := catalog.latest_problem():
        raise DamagedFileError(catalog.latest_run_json, why, "run the train stage (`emoji-sd run --from train`), "
                                                             "which rewrites it")
    candidate = catalog.latest_run()
    if candidate is None or not (candidate / "model").is_dir():
        raise FileNotFoundError(f"no trained model in {catalog.train_dir}: run the train stage")
    items = eval_set(catalog, cfg, val_fraction, split_seed)
    if not items.rows:
        raise RuntimeError("the held-out split is empty: raise train.val_fraction to evaluate")

    def key_of(digest: str) -> str:
        return eval_key(digest, cfg, captioner_cfg, items)

    kw = dict(cfg=cfg, captioner_cfg=captioner_cfg, catalog=catalog, items=items)
    before = read_json(catalog.eval_json(candidate))
    fresh_key = key_of(model_digest(candidate / "model"))
    reused = not force and before is not None and before.get("key") == fresh_key and "status" in before
    if force:
        catalog.eval_json(candidate).unlink(missing_ok=True)
    result = _scores_for(candidate, key_of, **kw)
    champion, override = _current_champion(catalog, candidate, result["digest"], promote)
    if champion == candidate:
        status, reason = "champion", "this run is the champion"
    elif reused:
        status, reason = before["status"], before.get("reason", "")
    elif champion is None:
        status, reason = "promoted", override or "the first evaluated run"
    else:
        champ = _scores_for(champion, key_of, **kw)
        # comparability from the exports' content as they are now, whatever older records stored
        result["held_out_basis"], champ["held_out_basis"] = (held_out_basis(r / "model") for r in (candidate, champion))
        rules, note = promotion_rules(cfg.promote_if, result, champ)
        worse = compare(result["scores"], champ["scores"], rules)
        if not worse:
            status, reason = "promoted", f"no worse than {champion.name} on {', '.join(rules)}{note}"
        elif promote:
            status, reason = "promoted", f"forced (--promote) although worse: {'; '.join(worse)}{note}"
        else:
            status, reason = "rejected", f"worse than the champion {champion.name}: {'; '.join(worse)}{note}"
        result["champion_scores"] = champ["scores"]
    if status == "rejected" and promote:
        status, reason = "promoted", f"forced (--promote) after: {reason}"
    if status == "promoted":
        write_champion(catalog, run=candidate.name, digest=result["digest"], scores=result["scores"], reason=reason)
    result.update(status=status, reason=reason)
    atomic_write_json(catalog.eval_json(candidate), result)
    write_model_card(candidate / "model", catalog=catalog)  # the card shows the scores (outside the checksums)
    if not reused:
        _append_history(catalog, candidate, result, status)
    (log.warning if status == "rejected" else log.info)("eval: %s is %s: %s", candidate.name, status, reason)
    s = result["scores"]
    return {
        "status": "reused" if reused else "ran", "run": candidate.name, "decision": status, "reason": reason,
        "items": result["items"], "held_out_loss": round(s["held_out_loss"], 5),
        "prompt_following": round(s["prompt_following"], 3), "prompt_following_g0": round(s["prompt_following_g0"], 3),
        "prompt_following_real": round(s["prompt_following_real"], 3),
        **({"prompt_following_vae": round(s["prompt_following_vae"], 3)} if "prompt_following_vae" in s else {}),
        "chance": round(s["chance"], 3),
        **{k: round(s[k], 4) for k in ("fid", "kid", "clip_score") if k in s},
        "skipped": "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()) or None,
        "eval_seconds": result["seconds"],
    }


def stage_key(cfg: EvalConfig, captioner_cfg: CaptionConfig, catalog: Catalog, *, val_fraction: float,
              split_seed: int) -> str:
    """The eval stage's key now: the latest run's model, the settings and the evaluation set."""
    run = catalog.latest_run()
    digest = model_digest(run / "model") if run is not None and (run / "model").is_dir() else None
    items = eval_set(catalog, cfg, val_fraction, split_seed)
    return stable_hash({"eval": eval_key(str(digest), cfg, captioner_cfg, items), "promote_if": cfg.promote_if})
