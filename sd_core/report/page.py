"""A one-page HTML report of a data directory: what each stage did, the dataset with its captions,
the training curves and the samples. Pictures are linked relative to the data directory."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text
from sd_core.store.metadata import read_metadata
from sd_core.store.records import StageResult

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:.3rem .6rem;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.ran{color:#0a6} .reused{color:#06c} .skipped{color:#999}
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


def _details(r: StageResult) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.summary.items() if v not in ({}, None, ""))


def stages_markdown(catalog: Catalog, results: Sequence[StageResult]) -> str:
    """What each stage did as a Markdown table, with where the dataset and report are (shown in the
    Prefect UI as the flow run's artifact)."""
    lines = ["| stage | status | time | what it did |", "| --- | --- | --- | --- |"]
    for r in results:
        details = _details(r).replace("|", "\\|")
        lines.append(f"| {r.stage} | **{r.status}** | {r.seconds:.1f} s | {details} |")
    lines += ["", f"dataset: `{catalog.metadata_csv}`", "", f"report: `{catalog.report_html}`"]
    return "\n".join(lines) + "\n"


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
        f"<h1>{html.escape(title)}</h1><p>{html.escape(str(root))}</p>"
        f"<h2>Stages</h2>{_stage_rows(results)}"
        "<h2>Dataset</h2><table>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in counts.items())
        + f"</table><h2>Examples with their captions</h2><div class='grid'>{''.join(cards)}</div>"
        + (f"<h2>Training and samples</h2>{figs}" if figs else "")
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


def report_figures(catalog: Catalog) -> list[tuple[Path, str]]:
    """The pictures worth a look after a run, with captions, where they exist."""
    figs = [(catalog.vae_dir / "reconstructions.png", "the dataset's VAE: originals (top) and reconstructions")]
    run = catalog.latest_run()
    if run is not None:
        figs.append((run / "loss_curve.png", "training loss and held-out loss (fixed timesteps and noise)"))
        figs.extend((p, f"validation samples at {p.stem}") for p in sorted((run / "samples").glob("step-*.png")))
    figs.append((catalog.samples_dir / "grid.png", "samples per prompt (columns: seeds)"))
    figs.append((catalog.samples_dir / "guidance_sweep.png", "classifier-free guidance sweep"))
    return figs
