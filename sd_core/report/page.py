"""A one-page HTML report of a data directory: what each stage did, the dataset with its captions,
the training curves and the samples. Pictures are linked relative to the data directory."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text, read_json
from sd_core.store.metadata import read_metadata
from sd_core.store.records import StageResult

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:.3rem .6rem;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.ran{color:#0a6} .reused{color:#06c} .skipped{color:#999} .failed{color:#c00;font-weight:bold}
.alerts{border:2px solid #c00;background:#fff3f3;padding:.6rem 1rem;margin:1rem 0}
.alerts li{margin:.2rem 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.8rem}
.card{font-size:.8rem} .card img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #eee}
figure{margin:1rem 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.9rem}
"""


def _rel(path: Path, root: Path) -> str:
    return html.escape(os.path.relpath(path, root))


def _stage_rows(results: Sequence[StageResult]) -> str:
    rows = []
    for r in results:
        details = _details(r)
        rows.append(f"<tr><td>{r.stage}</td><td class='{r.status}'>{r.status}</td>"
                    f"<td>{r.seconds:.1f}s</td><td>{html.escape(details)}</td></tr>")
    return "<table><tr><th>stage</th><th>status</th><th>time</th><th>what it did</th></tr>" + "".join(rows) + "</table>"


def run_alerts(results: Sequence[StageResult]) -> list[str]:
    """What went wrong in the run, or needs a look, first of all: failed stages and their reasons, then the
    alerts stages raised (``summary["alert"]``)."""
    return [a for r in results if r.status == "failed" for a in r.alerts()] + \
        [a for r in results if r.status != "failed" for a in r.alerts()]


def _alerts_html(results: Sequence[StageResult]) -> str:
    alerts = run_alerts(results)
    if not alerts:
        return ""
    failed = any(r.status == "failed" for r in results)
    head = "This run failed" if failed else "Alerts"
    items = "".join(f"<li>{html.escape(a)}</li>" for a in alerts)
    return f"<div class='alerts' id='alerts'><b>{head}</b><ul>{items}</ul></div>"


def _details(r: StageResult) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.summary.items() if v not in ({}, None, ""))


def stages_markdown(catalog: Catalog, results: Sequence[StageResult]) -> str:
    """What each stage did as a Markdown table, with where the dataset and report are (shown in the
    Prefect UI as the flow run's artifact)."""
    alerts = run_alerts(results)
    lines = [*(f"- **{a}**" for a in alerts), *([""] if alerts else [])]
    lines += ["| stage | status | time | what it did |", "| --- | --- | --- | --- |"]
    for r in results:
        details = _details(r).replace("|", "\\|")
        lines.append(f"| {r.stage} | **{r.status}** | {r.seconds:.1f} s | {details} |")
    lines += ["", f"dataset: `{catalog.metadata_csv}`", "", f"report: `{catalog.report_html}`"]
    return "\n".join(lines) + "\n"


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


def _evaluation(catalog: Catalog) -> dict | None:
    """The latest run's evaluation (its scores.json), if it was evaluated."""
    run = catalog.latest_run()
    return read_json(catalog.eval_json(run)) if run is not None else None


def _score_rows(ev: dict) -> list[tuple[str, str, str, str]]:
    """(label, value [interval], champion's value, difference [paired interval]) rows, skipped scores with
    their reason."""
    from sd_core.eval.table import with_interval

    champion = ev.get("champion_scores") or {}
    diffs = (ev.get("versus_champion") or {}).get("differences", {})
    intervals = ev.get("intervals", {})
    rows = []
    for name, label in SCORE_LABELS.items():
        if name in ev["scores"]:
            fmt = "{:.3f}" if name.startswith(("prompt", "chance")) else "{:.4g}"
            d = diffs.get(name)
            rows.append((label, with_interval(ev["scores"][name], intervals.get(name), fmt),
                         fmt.format(champion[name]) if name in champion else "",
                         with_interval(d["difference"], d.get("interval"), "{:+.3f}" if name.startswith("prompt")
                                       else "{:+.4g}") if d else ""))
        elif name in ev.get("skipped", {}):
            rows.append((label, f"skipped: {ev['skipped'][name]}", "", ""))
    return rows


def _scored_what(ev: dict) -> str:
    varying = ev.get("varying", {})
    counted = ", ".join(varying.get("attributes", [])) or "none"
    return (f"{ev['items']} held-out prompts × {ev.get('seeds_per_item', 1)} seeds, guidance "
            f"{ev['guidance_scale']:g}; attributes read: {', '.join(ev['attributes'])}; κ counts those whose most "
            f"common asked value covers less than {100 * varying.get('share', 0.9):g} % of the prompts: {counted}; "
            f"intervals: {100 * ev.get('confidence', 0.9):g} % paired bootstrap over items and seeds; "
            f"{ev.get('images_drawn', '?')} images drawn, {ev.get('seconds', '?')} s")


def eval_markdown(catalog: Catalog) -> str:
    """The latest evaluation as Markdown: the decision, its reason, every score and the per-attribute table (a
    flow-run artifact)."""
    from sd_core.eval.table import attribute_table

    ev = _evaluation(catalog)
    if ev is None:
        return "no evaluation yet\n"
    lines = [f"**{catalog.latest_run().name}: {ev.get('status', 'evaluated')}**: {ev.get('reason', '')}", "",
             _scored_what(ev), "", "| score | this run | champion | difference |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _score_rows(ev)]
    if ev.get("agreement"):
        header, rows = attribute_table(ev)
        lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _eval_section(catalog: Catalog) -> str:
    from sd_core.eval.table import attribute_table

    ev = _evaluation(catalog)
    if ev is None:
        return ""
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>" for row in _score_rows(ev))
    status = html.escape(str(ev.get("status", "evaluated")))
    table = ""
    if ev.get("agreement"):
        header, attr_rows = attribute_table(ev)
        table = ("<h3>Per attribute</h3><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                 + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                     for r in attr_rows) + "</table>")
    return (f"<h2>Evaluation</h2><p><b>{status}</b>: {html.escape(str(ev.get('reason', '')))}</p>"
            f"<p>{html.escape(_scored_what(ev))}.</p>"
            "<table><tr><th>score</th><th>this run [interval]</th><th>champion</th>"
            f"<th>difference [paired interval]</th></tr>{rows}</table>{table}")


def write_report(
    catalog: Catalog,
    results: Sequence[StageResult],
    *,
    figures: Sequence[tuple[Path, str]] = (),
    title: str = "emoji-sd run",
    n_examples: int = 24,
) -> Path:
    """Write ``report.html`` in the data directory and return its path.

    ``figures`` are (image path, caption) pairs shown full width (loss curves, sample grids).
    """
    root = catalog.root
    model, served_line = served(catalog)
    if model is None:  # no samples of a model that is not served
        figures = [(p, c) for p, c in figures if catalog.samples_dir not in Path(p).parents]
    rows = read_metadata(catalog)
    flagged = sum(1 for r in rows if r.get("caption_flagged") == "True")
    counts = {
        "images in the dataset": len(rows),
        "captioned": sum(1 for r in rows if r.get("prompt")),
        "captions replaced by the fallback (flagged)": flagged,
        "duplicates skipped": max(len(_lines(catalog.duplicates_csv)) - 1, 0),
        "quarantined": max(len(_lines(catalog.quarantine_csv)) - 1, 0),
    }
    step = max(len(rows) // n_examples, 1)
    cards = []
    for r in rows[::step][:n_examples]:
        cards.append(
            f"<div class='card'><img src='{_rel(catalog.image_path(r['file_name']), root)}' alt=''>"
            f"<div><b>{html.escape(r['image_title'])}</b></div><div>{html.escape(r.get('prompt', ''))}</div></div>"
        )
    figs = "".join(
        f"<figure><img src='{_rel(p, root)}' alt=''><figcaption>{html.escape(c)}</figcaption></figure>"
        for p, c in figures if Path(p).exists()
    )
    body = (
        f"<h1>{html.escape(title)}</h1><p>{html.escape(str(root))}</p>{_alerts_html(results)}"
        f"<h2>Stages</h2>{_stage_rows(results)}"
        "<h2>Dataset</h2><table>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in counts.items())
        + f"</table><h2>Examples with their captions</h2><div class='grid'>{''.join(cards)}</div>"
        + f"<h2>Served model</h2><p>{html.escape(served_line)}</p>"
        + _eval_section(catalog)
        + (f"<h2>Training, evaluation and samples</h2>{figs}" if figs else "")
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    atomic_write_text(catalog.report_html, page)
    return catalog.report_html


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []


def plot_eval_history(catalog: Catalog) -> Path | None:
    """``models/evaluations.png``: each score across the evaluated runs, rejected runs marked."""
    from sd_core.eval.stage import read_history

    rows = read_history(catalog)
    if not rows:
        return None
    from sd_core.common.plots import plot_history

    names = ("prompt_kappa", "prompt_kappa_g0", "prompt_following", "prompt_following_g0", "prompt_following_real",
             "held_out_loss", "fid", "kid", "clip_score")
    return plot_history(rows, [n for n in names if any(r.get(n) for r in rows)],
                        catalog.eval_history_csv.with_suffix(".png"))


def report_figures(catalog: Catalog) -> list[tuple[Path, str]]:
    """The pictures worth a look after a run, with captions, where they exist."""
    figs = [(catalog.vae_dir / "reconstructions.png", "the dataset's VAE: originals (top) and reconstructions")]
    run = catalog.latest_run()
    if run is not None:
        figs.append((run / "loss_curve.png", "training loss and held-out loss (fixed timesteps and noise)"))
        figs.extend((p, f"validation samples at {p.stem}") for p in sorted((run / "samples").glob("step-*.png")))
        figs.append((catalog.eval_dir(run) / "grid.png", "held-out prompts: the real image, through the VAE, the "
                                                           "model's at the evaluated guidance and without the text; "
                                                           "below, agreement, chance and κ per attribute"))
    history = plot_eval_history(catalog)
    if history is not None:
        figs.append((history, "scores of every evaluated run (promoted and rejected)"))
    if served_samples(catalog):  # only samples of the champion that is served now
        figs.append((catalog.samples_dir / "grid.png", "samples per prompt from the champion (columns: seeds)"))
        figs.append((catalog.samples_dir / "guidance_sweep.png", "classifier-free guidance sweep"))
    return figs


def served(catalog: Catalog) -> tuple[Path | None, str]:
    """The model served now (:func:`~sd_core.diffusion.champion.served_model`, which verifies it) and a line
    saying which, or None and why none is."""
    from sd_core.diffusion.champion import find_champion, served_model

    try:
        model = served_model(catalog)
    except Exception as e:  # noqa: BLE001  (the report shows why nothing is served instead of failing)
        return None, f"no model is served: {e}"
    champ = find_champion(catalog, repair=False)
    return model, f"{model.parent.name} (digest {champ.digest if champ else '?'}), verified by checksum"


def served_samples(catalog: Catalog) -> bool:
    """Whether ``samples/`` was drawn from the champion's export (by the digests recorded; the export itself is
    verified once, when the report is written)."""
    from sd_core.diffusion.champion import find_champion
    from sd_core.store.files import json_problem

    try:
        champ = find_champion(catalog, repair=False)
    except Exception:  # noqa: BLE001  (a damaged record: no samples are shown)
        return False
    record, _ = json_problem(catalog.samples_dir / "samples_key.json")
    return champ is not None and isinstance(record, dict) and record.get("digest") == champ.digest
