"""The eval stage: score the newest run on a fixed held-out set, and make it the champion unless it is worse
than the current one at the stated confidence.

Scores (``<run>/scores/scores.json``, one row per evaluated run in ``models/evaluations.csv``; see
docs/evaluation.md):

* ``prompt_kappa`` (the headline): images drawn from the held-out captions are described by the configured
  captioner; per attribute (skin colour, head shape, background; with Qwen2.5-VL also eyes, mouth,
  expression) the agreement with what was asked, its chance level and Cohen's κ
  (:mod:`sd_core.eval.bootstrap`), averaged over the attributes the prompts vary in. Also at guidance 0, for
  the real held-out images and for those images after the model's VAE; ``prompt_following`` is the raw share
  of attributes read back, as before;
* ``held_out_loss``: ε-MSE (v-MSE for a v-prediction model) of the exported (EMA) model on each held-out item,
  at a fixed grid of timesteps with fixed noise, from its latent mean under the model's own VAE and its prompt
  under the model's own text encoder: two runs with the same prediction target, VAE, text encoder and noise
  schedule compare number for number (promotion leaves it out otherwise);
* ``fid``, ``kid``, ``clip_score`` where their weights can be loaded (see :mod:`sd_core.eval.distribution`).

Every reading is kept per item and image, so each score gets a paired-bootstrap interval and a run's
difference from the champion (scored on the same items and seeds) gets one too.

Promotion: ``models/current.json`` names the champion and the digest of its evaluated export (written atomically
with a checksum, see :mod:`sd_core.store.champion`; served only through
:func:`sd_core.diffusion.champion.served_model`). The first evaluated run becomes champion; a later run replaces it
unless it is worse than the champion, beyond a score's margin at ``eval.promote_if``'s confidence, on one of its
scores (:mod:`sd_core.eval.gate`); the champion is scored again when the set changed. Otherwise the run is kept,
marked rejected with its figures. ``promote=True`` (``--promote``) forces it.
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
from sd_core.common.images import image_to_tensor, make_grid, open_fitted, save_png
from sd_core.diffusion.card import write_model_card
from sd_core.diffusion.champion import ChampionError, find_champion
from sd_core.diffusion.export import conditioning_digest, load_pipeline, model_digest
from sd_core.diffusion.generate import generate
from sd_core.diffusion.schedulers import prediction_target
from sd_core.encode.pairs import split_ids
from sd_core.eval.attributes import ALL_ATTRIBUTES, PIXEL_ATTRIBUTES, attribute_values, chance_rate, varying_attributes
from sd_core.eval.bootstrap import Readings, intervals, point_scores
from sd_core.eval.config import INTERVAL_SCORES, EvalConfig
from sd_core.eval.distribution import distribution_scores
from sd_core.eval.gate import compare
from sd_core.eval.table import attribute_table, stack, table_image
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

# 2: each held-out image starts from its own seed; 3: held-out loss in the model's own spaces; 4: readings kept
# per item and image, κ per attribute, bootstrap intervals (the scores' figures are those of 3 where both exist)
CODE_VERSION = 4
_DECIDING = ("prompt_kappa", "prompt_following", "held_out_loss")
HISTORY_FIELDS = ("evaluated_at", "run", "status", "dataset_items", "eval_items", "steps", "held_out_loss",
                  "prompt_following", "prompt_following_g0", "prompt_following_real", "chance", "fid", "kid",
                  "clip_score",
                  # added with intervals (version 4): after the columns above, so earlier files keep their layout
                  "prompt_following_vae", "prompt_following_gain", "prompt_kappa", "prompt_kappa_g0",
                  "prompt_kappa_real", "prompt_kappa_vae", "prompt_kappa_gain", "kappa_attributes",
                  "seeds_per_item", "confidence",
                  *(f"{name}_{end}" for name in INTERVAL_SCORES for end in ("lo", "hi")),
                  "versus", *(f"{name}_diff{end}" for name in _DECIDING for end in ("", "_lo", "_hi")),
                  "images_drawn", "eval_seconds")


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
    _, held = split_ids([r["md5"] for r in rows], val_fraction, split_seed, cfg.min_items)
    held = sorted(held, key=lambda i: stable_hash({"md5": rows[i]["md5"], "seed": cfg.seed}))[: cfg.items]
    held.sort()
    return EvalSet([rows[i] for i in held], held)


def eval_key(digest: str, cfg: EvalConfig, captioner: CaptionConfig, items: EvalSet) -> str:
    """What an evaluation's figures depend on: the model's content, the eval settings, the captioner and the set."""
    # the decision's settings and the interval's replicates are applied to stored readings; min_items acts
    # through the set itself
    settings = cfg.model_dump(mode="json", exclude={"promote_if", "grid_items", "bootstrap", "min_items"})
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
def held_out_losses(pipe: Any, latents: torch.Tensor, prompts: Sequence[str], cfg: EvalConfig) -> torch.Tensor:
    """Each held-out item's ε-MSE (v-MSE for a v-prediction model), averaged over ``cfg.loss_timesteps`` fixed
    timesteps with fixed noise, from its latent mean (:func:`encode_latents`) and its prompt, both through the
    model's own VAE and text encoder: each model is scored in the latent space it was trained in, whatever the
    encode stage is set to now. Kept per item, so that two models' losses can be compared item by item."""
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
    sse = torch.zeros(n, dtype=torch.float64)
    for j in range(k):
        t_value = int((j + 0.5) * total_steps / k)
        for s in range(0, n, cfg.batch_size):
            b = slice(s, s + cfg.batch_size)
            x, eps = x0[b].to(dev, unet.dtype), noise[j, b].to(dev, unet.dtype)
            t = torch.full((x.shape[0],), t_value, dtype=torch.long, device=dev)
            pred = unet(sched.add_noise(x, eps, t), t, encoder_hidden_states=text[b].to(dev, unet.dtype)).sample
            err = (pred.float() - prediction_target(sched, x, eps, t).float()) ** 2  # (B, C, h, w)
            sse[b] += err.flatten(1).sum(1).double().cpu()
    return sse / (k * noise[0, 0].numel())


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
    drawn_s = time.perf_counter() - started
    drawn, free = [row[0] for row in guided], [row[0] for row in unguided]
    real = [open_fitted(catalog.image_path(r["file_name"]), r.get("fit")) for r in items.rows]  # as trained on
    latents = encode_latents(pipe, real, batch_size=cfg.batch_size)  # each image file read and encoded once
    kept = vae_round_trip(pipe, latents, batch_size=cfg.batch_size)
    each_title = [t for t in titles for _ in seeds]  # item-major
    readings = {"guided": _read(captioner, [im for row in guided for im in row], each_title),
                "g0": _read(captioner, [im for row in unguided for im in row], each_title),
                "real": _read(captioner, real, titles), "vae": _read(captioner, kept, titles)}
    per_item = {name: len(texts) // len(prompts) for name, texts in readings.items()}  # seeds, or 1 (real, vae)
    paired = Readings(
        asked=attribute_values(prompts, attributes),
        read={name: {a: [vals[i * per_item[name]:(i + 1) * per_item[name]] for i in range(len(prompts))]
                     for a, vals in attribute_values(texts, attributes).items()} for name, texts in readings.items()},
        loss=held_out_losses(pipe, latents, prompts, cfg).tolist())
    varying, top_share = varying_attributes(paired.asked, cfg.varying_share)
    scores, table = point_scores(paired, varying)

    def dataset() -> list[Image.Image]:  # the reference set of FID/KID: up to 1024 of the dataset's images
        rows = sorted(read_metadata(catalog), key=lambda r: stable_hash({"md5": r["md5"]}))[:1024]
        return [open_fitted(catalog.image_path(r["file_name"]), r.get("fit")) for r in rows]

    dist, skipped = distribution_scores(cfg, dataset, drawn, prompts)
    scores.update(chance=chance_rate(prompts, attributes), **dist)
    if not varying:
        skipped["prompt_kappa"] = (f"no attribute varies among the {len(prompts)} held-out prompts (each one's most "
                                   f"common value covers {100 * cfg.varying_share:g} % of them or more)")
    out_dir = catalog.eval_dir(Path(model).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "model": str(model), "digest": model_digest(model), "items": len(prompts), "attributes": list(attributes),
        "guidance_scale": cfg.guidance_scale, "scores": scores, "skipped": skipped,
        "confidence": cfg.promote_if.confidence, "bootstrap": cfg.bootstrap,
        "intervals": intervals(paired, varying, confidence=cfg.promote_if.confidence, replicates=cfg.bootstrap),
        "varying": {"attributes": varying, "top_share": top_share, "share": cfg.varying_share},
        "agreement": table,
        "per_attribute": {a: {name: st["agreement"] for name, st in per.items()} for a, per in table.items()},
        "seeds_per_item": cfg.seeds_per_item, "prediction_type": pipe.scheduler.config.prediction_type,
        "held_out_basis": held_out_basis(model),
        "readings": {name: texts[: cfg.grid_items] for name, texts in readings.items()},
        "paired": {"items": [r["md5"] for r in items.rows], "seeds": seeds, "seed_stride": cfg.seeds_per_item,
                   **paired.to_json()},
        "images_drawn": 2 * len(prompts) * len(seeds), "drawing_seconds": round(drawn_s, 1),
    }
    if cfg.grid_items:
        n = min(cfg.grid_items, len(prompts))
        cells = [[real[i], kept[i], drawn[i], free[i]] for i in range(n)]
        grid = make_grid(cells, prompts[:n], ["real", "VAE", f"w = {cfg.guidance_scale:g}", "w = 0"], cell_size=64,
                         label_width=320)
        header, rows = attribute_table(result)
        save_png(stack(grid, table_image(header, rows, grid.width, title=(
            f"{len(prompts)} held-out prompts x {len(seeds)} seeds; κ: chance-corrected agreement; the headline is "
            f"the mean κ over the attributes that vary, with its {100 * cfg.promote_if.confidence:g} % interval"))),
            out_dir / "grid.png")
    result["seconds"] = round(time.perf_counter() - started, 1)
    log.info("eval: %s: %d held-out items x %d seeds: %d images drawn in %.1f s, %.1f s in all",
             Path(model).parent.name, len(prompts), len(seeds), result["images_drawn"], drawn_s, result["seconds"])
    atomic_write_json(catalog.eval_json(Path(model).parent), result)
    return result


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
        return with_intervals(done, kw["cfg"])
    result = evaluate(run / "model", **kw)
    result["key"] = key
    atomic_write_json(catalog.eval_json(run), result)
    return result


def with_intervals(result: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """``result`` with its intervals at ``cfg``'s confidence and replicates, computed again from its stored
    readings when they were computed otherwise (they are not part of the evaluation's key)."""
    if (result.get("confidence"), result.get("bootstrap")) == (cfg.promote_if.confidence, cfg.bootstrap) \
            or "paired" not in result:
        return result
    readings = Readings.from_json(result["paired"])
    return {**result, "confidence": cfg.promote_if.confidence, "bootstrap": cfg.bootstrap,
            "intervals": intervals(readings, result["varying"]["attributes"], confidence=cfg.promote_if.confidence,
                                   replicates=cfg.bootstrap)}


def history_row(catalog: Catalog, run: Path, result: dict[str, Any], status: str) -> dict[str, Any]:
    """The ``evaluations.csv`` row of an evaluated run: its scores, their intervals (``_lo``, ``_hi``), and its
    paired differences from the champion it was judged against (``_diff``, ``_diff_lo``, ``_diff_hi``)."""
    manifest = read_json(run / "model" / "emoji_sd_model.json") or {}
    row: dict[str, Any] = {
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": run.name, "status": status,
        "dataset_items": len(read_metadata(catalog)), "eval_items": result["items"], "steps": manifest.get("step"),
        **{k: round(v, 6) for k, v in result["scores"].items()},
        "seeds_per_item": result.get("seeds_per_item"), "confidence": result.get("confidence"),
        "kappa_attributes": ";".join(result.get("varying", {}).get("attributes", [])),
        "images_drawn": result.get("images_drawn"), "eval_seconds": result.get("seconds"),
    }
    for name, (lo, hi) in result.get("intervals", {}).items():
        row.update({f"{name}_lo": round(lo, 6), f"{name}_hi": round(hi, 6)})
    versus = result.get("versus_champion") or {}
    row["versus"] = versus.get("run", "")
    for name, d in versus.get("differences", {}).items():
        row[f"{name}_diff"] = round(d["difference"], 6)
        if d.get("interval"):
            row.update({f"{name}_diff_lo": round(d["interval"][0], 6), f"{name}_diff_hi": round(d["interval"][1], 6)})
    return row


def _append_history(catalog: Catalog, run: Path, result: dict[str, Any], status: str) -> None:
    """Append the run's row. A file written by an earlier version keeps its rows as they are: only its header
    grows by the columns it lacks (at the end, so every earlier column keeps its place); the reader gives
    the cells a short row lacks as empty."""
    path = catalog.eval_history_csv
    existing = path.read_text("utf-8") if path.exists() else ""
    header, rest = (existing.split("\n", 1) + [""])[:2] if existing else ("", "")
    fields = next(csv.reader([header])) if header else []
    fields += [f for f in HISTORY_FIELDS if f not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    if rest and not rest.endswith("\n"):
        rest += "\n"
    writer_rows = io.StringIO()
    csv.DictWriter(writer_rows, fieldnames=fields, lineterminator="\n", extrasaction="ignore").writerow(
        history_row(catalog, run, result, status))
    atomic_write_text(path, buf.getvalue() + rest + writer_rows.getvalue())


def read_history(catalog: Catalog) -> list[dict[str, str]]:
    """Every row of ``evaluations.csv`` (cells a row written by an earlier version lacks are empty)."""
    try:
        with open(catalog.eval_history_csv, newline="", encoding="utf-8") as f:
            return [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(f, restval="")]
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
        rules, note = promotion_rules(cfg.promote_if.scores, result, champ)
        verdict = compare(result, champ, rules, confidence=cfg.promote_if.confidence, replicates=cfg.bootstrap)
        worse, at = verdict.worse, f"at {100 * cfg.promote_if.confidence:g} % confidence"
        if not worse:
            status, reason = "promoted", f"not worse than {champion.name} {at}: {'; '.join(verdict.held)}{note}"
        elif promote:
            status, reason = "promoted", f"forced (--promote) although worse {at}: {'; '.join(worse)}{note}"
        else:
            status, reason = "rejected", f"worse than the champion {champion.name} {at}: {'; '.join(worse)}{note}"
        result["champion_scores"] = champ["scores"]
        result["versus_champion"] = {"run": champion.name, "differences": verdict.differences}
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
    return {"status": "reused" if reused else "ran", "run": candidate.name, "decision": status, "reason": reason,
            **eval_summary(result)}


def eval_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What the stage record and log show of an evaluation: its cost, the scores and their intervals."""
    s, iv = result["scores"], result.get("intervals", {})

    def fig(name: str, digits: int = 3) -> dict[str, Any]:
        if name not in s:
            return {}
        value = round(s[name], digits)
        return {name: f"{value} [{round(iv[name][0], digits)}, {round(iv[name][1], digits)}]" if name in iv else value}

    return {
        "items": result["items"], "seeds_per_item": result.get("seeds_per_item"),
        "images_drawn": result.get("images_drawn"),
        **fig("prompt_kappa"), **fig("prompt_kappa_g0"), **fig("prompt_kappa_real"), **fig("prompt_kappa_vae"),
        "kappa_attributes": ", ".join(result.get("varying", {}).get("attributes", [])) or None,
        **fig("held_out_loss", 5), **fig("prompt_following"), **fig("prompt_following_g0"),
        **fig("prompt_following_real"), **fig("prompt_following_vae"),
        **({"chance": round(s["chance"], 3)} if "chance" in s else {}),
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
    return stable_hash({"eval": eval_key(str(digest), cfg, captioner_cfg, items),
                        "promote_if": cfg.promote_if.model_dump(mode="json"), "bootstrap": cfg.bootstrap})
