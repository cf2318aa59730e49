"""``report.html`` of a data directory, headline first.

Top to bottom: what went wrong (failed stages, alerts); the model that is served (the verified champion), its
pictures for held-out prompts beside the real emoji, its headline figures and the code that loads it;
prompt following against unguided and real images; the loss curve and the evaluation history; the dataset as
counts and a fixed sample of rows; what each stage did; more pictures. Every figure is rounded to what it
means (:mod:`sd_core.report.format`). Pictures are linked by paths relative to the data directory, never
embedded, so the page stays small (28 kB at 50,000 images) and opens from the folder as it is.

The page is a Jinja2 template (``templates/report.html``); :func:`stages_markdown` gives the same order in
Markdown for the Prefect UI.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from sd_core.report import format as fmt
from sd_core.report.dataset import DatasetView, dataset_view
from sd_core.report.model import ModelView, latest_view, model_view
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text, read_json
from sd_core.store.metadata import read_metadata
from sd_core.store.records import StageResult

HISTORY_ROWS = 10  # evaluations shown in the table (all are in evaluations.csv)


def run_alerts(results: Sequence[StageResult]) -> list[str]:
    """What went wrong in the run, or needs a look, first of all: failed stages and their reasons, then the
    alerts stages raised (``summary["alert"]``)."""
    return [a for r in results if r.status == "failed" for a in r.alerts()] + \
        [a for r in results if r.status != "failed" for a in r.alerts()]


# ---------------------------------------------------------------------------------------------------- scores

SCORE_LABELS = {
    "prompt_kappa": "prompt following, κ (chance-corrected; mean over the attributes that vary) at the configured "
                    "guidance",
    "prompt_kappa_g0": "prompt following, κ, at guidance 0 (without the text: near 0)",
    "prompt_kappa_real": "prompt following, κ, of the real held-out images (the captioner's ceiling)",
    "prompt_kappa_vae": "prompt following, κ, of those images through the model's VAE (the UNet's ceiling)",
    "held_out_loss": "held-out ε-MSE (EMA model, fixed timesteps and noise)",
    "prompt_following": "share of asked attributes read back, at the configured guidance (all attributes)",
    "prompt_following_g0": "share of asked attributes read back, at guidance 0 (without the text)",
    "prompt_following_real": "share of asked attributes read back from the real held-out images",
    "prompt_following_vae": "share of asked attributes read back from those images through the model's VAE",
    "chance": "chance level of the prompts' attributes (Σ p², if the model drew what is asked at random)",
    "fid": "FID against the dataset (CLIP image features)",
    "kid": "KID against the dataset (CLIP image features)",
    "clip_score": "CLIP score of prompt and image",
}
CONDITIONS = (("", "model (w = {w})"), ("_g0", "unguided (w = 0)"), ("_real", "real images"),
              ("_vae", "through the VAE"))


def _score_rows(ev: dict, *, short: bool = False) -> list[tuple[str, str, str, str]]:
    """(label, value [interval], champion's value, difference [paired interval]) rows, skipped scores with
    their reason (``short``: short labels, skipped scores left out)."""
    champion = ev.get("champion_scores") or {}
    diffs = (ev.get("versus_champion") or {}).get("differences", {})
    intervals = ev.get("intervals", {})
    rows = []
    for name, label in SCORE_LABELS.items():
        if name in ev.get("scores", {}):
            d = diffs.get(name)
            rows.append((fmt.label(name) if short else label,
                         fmt.score_with_interval(name, ev["scores"][name], intervals.get(name)),
                         fmt.score(name)(champion[name]) if name in champion else "",
                         fmt.with_interval(d["difference"], d.get("interval"), fmt.signed(fmt.score(name)))
                         if d else ""))
        elif name in ev.get("skipped", {}) and not short:
            rows.append((label, f"skipped: {ev['skipped'][name]}", "", ""))
    return rows


def _scored_what(ev: dict) -> str:
    varying = ev.get("varying", {})
    counted = ", ".join(varying.get("attributes", [])) or "none"
    seconds = ev.get("seconds")
    return (f"{fmt.count(ev['items'])} held-out prompts × {ev.get('seeds_per_item', 1)} seeds, guidance "
            f"{ev['guidance_scale']:g}; attributes read: {', '.join(ev.get('attributes', []))}; κ counts those whose "
            f"most common asked value covers less than {100 * varying.get('share', 0.9):g} % of the prompts: "
            f"{counted}; intervals: {100 * ev.get('confidence', 0.9):g} % paired bootstrap over items and seeds; "
            f"{fmt.count(ev.get('images_drawn', 0))} images drawn"
            + (f" in {fmt.duration(seconds)}" if isinstance(seconds, (int, float)) else ""))


def _headline(ev: dict | None, record: dict[str, Any]) -> dict[str, Any] | None:
    """The figures beside the pictures: κ with its interval, its references, the raw share and the loss."""
    scores = (ev or {}).get("scores") or record.get("scores") or {}
    if not scores:
        return None
    iv = (ev or {}).get("intervals", {})
    skipped = (ev or {}).get("skipped", {})
    attrs = ", ".join(((ev or {}).get("varying") or {}).get("attributes", [])) or "the attributes that vary"
    conf = f"{100 * (ev or {}).get('confidence', 0.9):g} % interval"
    value = scores.get("prompt_kappa")
    head = {"value": fmt.kappa(value) if value is not None else "–",
            "interval": (lambda i: f"[{fmt.kappa(i[0])}, {fmt.kappa(i[1])}]")(iv["prompt_kappa"])
            if "prompt_kappa" in iv else "",
            "what": (f"Over {attrs}: 0 when the drawings ignore the text, 1 when every one is as asked; "
                     f"{conf}." if value is not None else
                     f"κ was not scored: {skipped.get('prompt_kappa', 'no evaluation of this export holds it')}."),
            "refs": [(label.format(w=f"{(ev or {}).get('guidance_scale', 0):g}") if not suffix else label,
                      fmt.kappa(scores[f"prompt_kappa{suffix}"], iv.get(f"prompt_kappa{suffix}")))
                     for suffix, label in CONDITIONS[1:] if f"prompt_kappa{suffix}" in scores],
            "more": []}
    if "prompt_following" in scores:
        refs = ", ".join(f"{label} {fmt.share(scores[f'prompt_following{s}'])}" for s, label in CONDITIONS[1:]
                         if f"prompt_following{s}" in scores)
        chance = f", chance {fmt.share(scores['chance'])}" if "chance" in scores else ""
        head["more"].append(f"Attributes read back as asked: {fmt.share(scores['prompt_following'])} "
                            f"({refs}{chance}).")
    if "held_out_loss" in scores:
        head["more"].append(f"Held-out loss (ε-MSE): {fmt.loss(scores['held_out_loss'], iv.get('held_out_loss'))}.")
    for name in ("fid", "kid", "clip_score"):
        if name in scores:
            head["more"].append(f"{fmt.label(name)}: {fmt.number(scores[name])}.")
    if ev:
        head["more"].append(f"{fmt.count(ev['items'])} held-out prompts × {ev.get('seeds_per_item', 1)} seeds at "
                            f"guidance {ev['guidance_scale']:g}.")
    else:
        head["more"].append("Scores as recorded when it was promoted (its scores.json holds another export's).")
    return head


def _scores_table(ev: dict) -> dict[str, Any]:
    """κ and the raw share for the model and its references (unguided, real, through the VAE), and chance."""
    scores, iv = ev.get("scores", {}), ev.get("intervals", {})
    columns = [label.format(w=f"{ev.get('guidance_scale', 0):g}") for _, label in CONDITIONS] + ["chance"]

    def row(base: str, cell: Any, chance: str) -> list[str]:
        return [cell(scores[f"{base}{s}"], iv.get(f"{base}{s}")) if f"{base}{s}" in scores else "–"
                for s, _ in CONDITIONS] + [chance]

    rows = []
    if any(k.startswith("prompt_kappa") for k in scores):
        rows.append(("κ, mean over the attributes that vary (the headline)", row("prompt_kappa", fmt.kappa, "0")))
    if any(k.startswith("prompt_following") for k in scores):
        rows.append(("share of attributes read back as asked", row("prompt_following", fmt.share,
                                                                     fmt.share(scores.get("chance")))))
    notes = []
    if "held_out_loss" in scores:
        loss = fmt.loss(scores["held_out_loss"], iv.get("held_out_loss"))
        notes.append(f"Held-out loss: {loss} ({SCORE_LABELS['held_out_loss']}).")
    for name in ("fid", "kid", "clip_score"):
        if name in scores:
            notes.append(f"{SCORE_LABELS[name]}: {fmt.number(scores[name])}.")
    if ev.get("skipped"):
        notes.append("Not scored: " + "; ".join(f"{k} ({v})" for k, v in ev["skipped"].items()) + ".")
    return {"columns": columns, "rows": rows, "notes": notes}


def eval_markdown(catalog: Catalog) -> str:
    """The latest evaluation as Markdown: the decision, its reason, every score and the per-attribute table (a
    flow-run artifact)."""
    from sd_core.eval.table import attribute_table

    run = catalog.latest_run()
    ev = read_json(catalog.eval_json(run)) if run is not None else None
    if ev is None:
        return "no evaluation yet\n"
    lines = [f"**{run.name}: {ev.get('status', 'evaluated')}**: {ev.get('reason', '')}", "",
             _scored_what(ev), "", "| score | this run | champion | difference |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _score_rows(ev)]
    if ev.get("agreement"):
        header, rows = attribute_table(ev)
        lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- stages

def stage_rows(results: Sequence[StageResult], root: Path | None = None) -> list[dict[str, Any]]:
    """Each stage's status, time and what it did, as (label, rounded figure) pairs."""
    rows = []
    for r in results:
        reason = str(r.summary.get("reason", "")) if r.status == "failed" else ""
        if r.status == "skipped":
            details = fmt.details(r.summary, root)
            time = "–"
        else:
            details = fmt.details(r.summary, root, skip=("reason", "error") if r.status == "failed" else ())
            time = fmt.duration(r.seconds)
        rows.append({"stage": r.stage, "status": r.status, "time": time, "reason": reason, "details": details})
    return rows


def model_line(m: ModelView, catalog: Catalog) -> str:
    """One sentence: where the served model is, what it is, what it trained on, when and why it was promoted."""
    if m.model is None:
        return f"No model is served: {m.why_not}"
    kind, base = m.manifest.get("kind"), m.manifest.get("base_model")
    what = {"scratch": "a UNet trained from scratch", "pretrained_attn2": f"a cross-attention fine-tune of {base}",
            "pretrained_attn2_lora": f"LoRA adapters on {base}'s cross-attention"}.get(kind, f"a {kind} export")
    steps = m.manifest.get("step")
    data = (f" on {fmt.count(m.trained)} emoji ({fmt.count(m.held_out)} held out for evaluation)"
            if m.trained is not None else "")
    since = m.record.get("since")
    reason = m.record.get("reason", "")
    promoted = f"; promoted {fmt.timestamp(since)}" if since else ""
    return (f"{os.path.relpath(m.model, catalog.root)}: {what}"
            f"{f', {fmt.count(steps)} steps' if steps is not None else ''}{data}{promoted}"
            f"{f' ({reason})' if reason else ''}. Content digest {m.digest}, every file verified against its "
            "manifest.")


def _sample_line(m: ModelView) -> str:
    cfg, seeds = m.sample_settings, sorted({s for row in m.gallery for s in row.seeds})
    parts = [f"seed{'s' if len(seeds) > 1 else ''} {seeds[0]}{f'–{seeds[-1]}' if len(seeds) > 1 else ''}"] \
        if seeds else []
    if cfg.get("guidance_scale") is not None:
        parts.append(f"guidance {cfg['guidance_scale']:g}")
    if cfg.get("steps"):
        parts.append(f"{cfg['steps']} {cfg.get('scheduler', '')} steps".replace("  ", " "))
    return ", ".join(parts)


def _history(catalog: Catalog, champion: str | None) -> tuple[dict[str, Any] | None, Path | None]:
    from sd_core.eval.stage import read_history
    from sd_core.report.history import history_plot

    rows = read_history(catalog)
    if not rows:
        return None, None

    def f(r: dict[str, str], name: str, cell: Any) -> str:
        try:
            v = float(r[name]) if r.get(name) else None
            lo, hi = (float(r[f"{name}_lo"]), float(r[f"{name}_hi"])) if r.get(f"{name}_lo") and r.get(
                f"{name}_hi") else (None, None)
        except ValueError:
            return r.get(name, "")
        return cell(v, [lo, hi] if lo is not None else None) if v is not None else "–"

    table = []
    for r in reversed(rows[-HISTORY_ROWS:]):
        status = r.get("status", "")
        served = status != "rejected" and r.get("run") == champion
        table.append({"status": status, "cells": [
            fmt.timestamp(r.get("evaluated_at", "")), r.get("run", ""), f"{status} (served)" if served else status,
            fmt.count(int(float(r["steps"]))) if r.get("steps") else "–",
            fmt.count(int(float(r["dataset_items"]))) if r.get("dataset_items") else "–",
            f(r, "prompt_kappa", fmt.kappa), f(r, "prompt_kappa_g0", fmt.kappa), f(r, "held_out_loss", fmt.loss)]})
    shown = min(len(rows), HISTORY_ROWS)
    note = (f"The latest {shown} of {fmt.count(len(rows))} evaluations, newest first."
            if len(rows) > shown else f"{fmt.count(len(rows))} evaluation{'s' if len(rows) > 1 else ''}, newest first.")
    try:
        plot = history_plot(catalog, rows, champion)
    except Exception:  # noqa: BLE001  (a plot that cannot be drawn leaves the table)
        plot = None
    return {"header": ["evaluated", "run", "decision", "steps", "dataset", "κ [interval]", "κ unguided",
                       "held-out loss"], "rows": table, "note": note, "csv": catalog.eval_history_csv}, plot


def _dataset(catalog: Catalog, view: DatasetView, rel: Any) -> dict[str, Any]:
    counts = [("images in the dataset", fmt.count(view.images)),
              ("captioned", fmt.count(view.captioned) + (" (" + ", ".join(
                  f"{name}: {fmt.count(n)}" for name, n in view.by_captioner.items()) + ")" if view.images else "")),
              ("captions replaced by the fallback (flagged)", fmt.count(view.flagged)),
              ("duplicates skipped (the same bytes listed again)", fmt.count(view.duplicates)),
              ("quarantined (did not decode)", fmt.count(view.quarantined) + (" (" + ", ".join(
                  f"{k}: {fmt.count(v)}" for k, v in list(view.quarantine_reasons.items())[:5]) + ")"
                  if view.quarantine_reasons else ""))]
    if view.tags:
        counts.append(("tags", ", ".join(f"{t}: {fmt.count(n)}" for t, n in list(view.tags.items())[:8])))
    if view.sources:
        counts.append(("from", ", ".join(f"{h}: {fmt.count(n)}" for h, n in list(view.sources.items())[:5])))
    several = len(view.by_captioner) > 1  # name the captioner only where there is more than one
    cards = [{"src": rel(catalog.image_path(r["file_name"])), "title": r.get("image_title", ""),
              "caption": r.get("prompt", ""),
              "note": "flagged" if r.get("caption_flagged") == "True" else r.get("captioner", "") if several else ""}
             for r in view.sample]
    sample_line = (f"A fixed sample of {fmt.count(len(view.sample))} of the {fmt.count(view.images)} images (those "
                   "with the lowest md5, so the same ones on every run)." if view.images > len(view.sample) else
                   f"All {fmt.count(view.images)} images.")
    return {"counts": counts, "cards": cards, "sample_line": sample_line, "csv": rel(catalog.metadata_csv),
            "card": rel(catalog.dataset_card) if catalog.dataset_card.is_file() else ""}


def _latest(catalog: Catalog, champion_run: Path | None) -> dict[str, Any] | None:
    latest = latest_view(catalog, champion_run)
    if latest is None:
        return None
    ev = latest.evaluation
    steps = f" ({fmt.count(latest.steps)} steps)" if latest.steps is not None else ""
    if ev is None:
        return {"run": latest.run.name + steps, "status": "not evaluated", "reason": "The eval stage has not scored "
                "it yet.", "rows": []}
    return {"run": latest.run.name + steps, "status": ev.get("status", "evaluated"), "reason": ev.get("reason", ""),
            "rows": _score_rows(ev, short=True)}


def report_figures(catalog: Catalog, m: ModelView | None = None) -> list[tuple[Path, str]]:
    """The pictures below the stages, with captions, where they exist: the VAE's reconstructions, the served
    run's validation samples during training, and the sample stage's grid and guidance sweep (only when they
    were drawn from the served model)."""
    m = m if m is not None else model_view(catalog)
    figs = [(catalog.vae_dir / "reconstructions.png", "the dataset's VAE: originals (top) and reconstructions")]
    if m.run is not None:
        figs.extend((p, f"{m.run.name}'s validation samples at {p.stem}") for p in sorted((m.run / "samples").glob(
            "step-*.png")))
    if m.gallery:  # drawn from the champion that is served now
        figs.append((catalog.samples_dir / "grid.png", "samples per prompt from the served model (columns: seeds)"))
        figs.append((catalog.samples_dir / "guidance_sweep.png", "the served model's classifier-free guidance sweep"))
    return [(p, c) for p, c in figs if Path(p).is_file()]


@lru_cache(maxsize=1)
def _template() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(default=True), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html")


def render_report(catalog: Catalog, results: Sequence[StageResult], *, model: ModelView | None = None,
                  rows: list[dict[str, str]] | None = None, figures: Sequence[tuple[Path, str]] | None = None,
                  title: str | None = None, n_examples: int = 24) -> str:
    """The page's HTML (see the module). ``model``, ``rows``: the served model's view and metadata.csv's rows when
    the caller has them (read here otherwise); ``figures``: extra (image, caption) pairs for "More pictures"."""
    from sd_core.eval.table import attribute_table

    root = catalog.root
    rows = read_metadata(catalog) if rows is None else rows  # read once: the gallery and the dataset's counts
    m = model if model is not None else model_view(catalog, rows)

    def rel(path: Path | str) -> str:
        return quote(Path(os.path.relpath(path, root)).as_posix())

    ev = m.evaluation
    headline = _headline(ev, m.record) if m.model is not None else None
    history, plot = _history(catalog, m.run.name if m.run is not None else None)
    latest_run = catalog.latest_run()
    loss_run = m.run if m.run is not None else latest_run
    loss_curve = loss_run / "loss_curve.png" if loss_run is not None else None
    more = report_figures(catalog, m)
    # extra figures a caller passes: not what the page shows above, and nothing from samples/ or a run's
    # folder unless the served model's (report_figures already holds those)
    above = {loss_curve, m.eval_grid, plot, *(p for p, _ in more)}
    more += [(Path(p), c) for p, c in (figures or []) if Path(p).is_file() and Path(p) not in above
             and catalog.samples_dir not in Path(p).parents and catalog.train_dir not in Path(p).parents]
    ran = {s: sum(1 for r in results if r.status == s) for s in ("ran", "reused", "skipped", "failed")}
    cmd = lambda *a: " ".join(shlex.quote(str(x)) for x in a)  # noqa: E731
    prompt = m.gallery[0].prompt if m.gallery else ""
    page = _template().render(
        title=title or f"emoji-sd · {root.name}",
        subtitle=f"{root} · written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · this run: "
                 + ", ".join(f"{n} {s}" for s, n in ran.items() if n),
        alerts=run_alerts(results), failed=any(r.status == "failed" for r in results),
        m=m, rel=rel, model_line=f"Served from {model_line(m, catalog)}" if m.model is not None else "",
        gallery_cols=max((len(r.samples) for r in m.gallery), default=1), sample_line=_sample_line(m),
        eval_grid_caption="Held-out prompts as the eval stage scored them: the real emoji, the same through the "
                          "model's VAE, the model at the evaluated guidance and without the text (w = 0); under "
                          "them agreement, chance and κ per attribute.",
        headline=headline,
        no_headline="Not evaluated yet: the eval stage scores the served model on held-out prompts."
        if m.model is not None else "No model is served, so there is nothing to score yet.",
        cli_sample=cmd("emoji-sd", "sample", "--data-dir", root, *(("--prompt", prompt) if prompt else ())),
        cli_app=cmd("emoji-sd", "app", "--data-dir", root),
        cli_push=cmd("emoji-sd", "push", "--data-dir", root, "--repo-id", "USER/NAME"),
        scores=_scores_table(ev) if ev else None, scored_what=_scored_what(ev) if ev else "",
        attributes=dict(zip(("header", "rows"), attribute_table(ev))) if ev and ev.get("agreement") else None,
        latest=_latest(catalog, m.run),
        loss_curve=loss_curve if loss_curve is not None and loss_curve.is_file() else None,
        loss_caption=f"Training loss and held-out loss (fixed timesteps and noise) of {loss_run.name}"
                     + (" (the served model)" if loss_run == m.run else " (the latest run; not served)")
        if loss_run is not None else "",
        history=history, history_plot=plot,
        data=_dataset(catalog, dataset_view(catalog, n_examples, rows), rel),
        stages=stage_rows(results, root), more=more,
    )
    return page


def write_report(catalog: Catalog, results: Sequence[StageResult], *, model: ModelView | None = None,
                 rows: list[dict[str, str]] | None = None, figures: Sequence[tuple[Path, str]] | None = None,
                 title: str | None = None, n_examples: int = 24) -> Path:
    """Write ``report.html`` in the data directory (atomically) and return its path (see
    :func:`render_report`)."""
    atomic_write_text(catalog.report_html, render_report(catalog, results, model=model, rows=rows, figures=figures,
                                                         title=title, n_examples=n_examples))
    return catalog.report_html


# ---------------------------------------------------------------------------------------------------- markdown

def stages_markdown(catalog: Catalog, results: Sequence[StageResult], *, model: ModelView | None = None) -> str:
    """The page's headline and stage table in Markdown, in the page's order (the flow run's artifact in the
    Prefect UI): alerts, the served model and its figures, what each stage did, where the report is."""
    m = model if model is not None else model_view(catalog)
    alerts = run_alerts(results)
    lines = [*(f"- **{a}**" for a in alerts), *([""] if alerts else [])]
    if m.model is None:
        lines += [f"**No model is served**: {m.why_not}", ""]
    else:
        lines += [f"**Served model**: {model_line(m, catalog)}", ""]
        head = _headline(m.evaluation, m.record)
        if head is not None:
            refs = ", ".join(f"{label} {value}" for label, value in head["refs"])
            lines += [f"**Prompt following**: κ {head['value']} {head['interval']}".rstrip()
                      + (f" ({refs})" if refs else "") + ". " + " ".join(head["more"]), ""]
    lines += ["| stage | status | time | what it did |", "| --- | --- | --- | --- |"]
    for row in stage_rows(results, catalog.root):
        what = "; ".join(filter(None, [row["reason"], ", ".join(f"{k} {v}" for k, v in row["details"])]))
        lines.append(f"| {row['stage']} | **{row['status']}** | {row['time']} | {what.replace('|', chr(92) + '|')} |")
    lines += ["", f"dataset: `{catalog.metadata_csv}`", "", f"report: `{catalog.report_html}`"]
    return "\n".join(lines) + "\n"
