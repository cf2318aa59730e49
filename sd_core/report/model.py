"""What the report shows first: the model that is served, what it draws for prompts it never trained on beside
the real images, its scores, and the code that loads it.

Only the verified champion (:func:`~sd_core.diffusion.champion.served_model`) is shown as the model. Its
pictures come from files that name the champion's content digest: the sample stage's images
(``samples/samples.json``, each image's ``model_digest``) and the eval stage's grid (the run's
``scores/scores.json`` ``digest``). Pictures of any other export are never shown as the model's; the latest
run, when it is not the champion, is shown apart, as the run it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_core.diffusion.export import MANIFEST
from sd_core.store.catalog import Catalog
from sd_core.store.files import json_problem
from sd_core.store.metadata import read_metadata

MAX_ROWS, MAX_SEEDS = 6, 4  # of the headline's gallery


@dataclass(frozen=True)
class GalleryRow:
    prompt: str
    samples: list[Path]  # the champion's images for the prompt, one per seed
    seeds: list[int]
    real: Path | None = None  # the dataset's image with this caption, when there is one
    real_title: str = ""
    held_out: bool | None = None  # whether that image was held out of the champion's training (None: unknown)


@dataclass(frozen=True)
class ModelView:
    """The served model as the report shows it; ``model`` is None (and ``why_not`` says why) when none is."""
    model: Path | None
    why_not: str = ""
    run: Path | None = None
    digest: str | None = None
    record: dict[str, Any] = field(default_factory=dict)  # models/current.json
    manifest: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None  # the champion's scores.json, when it scored this very export
    trained: int | None = None  # items trained on / held out (the run's plan and split)
    held_out: int | None = None
    gallery: list[GalleryRow] = field(default_factory=list)
    sample_settings: dict[str, Any] = field(default_factory=dict)
    eval_grid: Path | None = None
    snippet: str = ""


@dataclass(frozen=True)
class LatestView:
    """The run trained last, when it is not the champion (evaluated and rejected, or not evaluated yet)."""
    run: Path
    evaluation: dict[str, Any] | None
    steps: int | None


def _json(path: Path) -> Any:
    data, _ = json_problem(path)  # a damaged file shows nothing, it is not trusted
    return data


def _split(run: Path, manifest: dict[str, Any]) -> tuple[set[str], int | None, int | None]:
    """The md5s held out of the run's training, and its train / held-out sizes (from its plan)."""
    from sd_core.encode.pairs import split_ids

    plan = _json(run / "plan.json") or {}
    md5s = [item[0] for item in plan.get("items") or [] if item]
    if not md5s:
        return set(), None, None
    cfg = manifest.get("train_config") or {}
    try:
        train, held = split_ids(md5s, float(cfg.get("val_fraction", 0.1)), int(cfg.get("split_seed", 42)),
                                int(cfg.get("val_min_items", 0)))
    except ValueError:
        return set(), None, None
    return {md5s[i] for i in held}, len(train), len(held)


def _gallery(catalog: Catalog, digest: str, held: set[str],
             rows: list[dict[str, str]] | None) -> tuple[list[GalleryRow], dict[str, Any]]:
    """The sample stage's images of the champion (every image's recorded digest must be the champion's), a row
    per prompt, each beside the dataset's image with that caption."""
    key = _json(catalog.samples_dir / "samples_key.json")
    about = _json(catalog.samples_dir / "samples.json")
    if not (isinstance(key, dict) and key.get("digest") == digest and isinstance(about, dict)):
        return [], {}
    by_prompt: dict[str, list[tuple[int, Path]]] = {}
    for image in about.get("images") or []:
        path = catalog.samples_dir / str(image.get("file", ""))
        if image.get("model_digest") == digest and image.get("prompt") and path.is_file():
            by_prompt.setdefault(image["prompt"], []).append((int(image.get("seed", 0)), path))
    if not by_prompt:
        return [], {}
    wanted = set(list(by_prompt)[:MAX_ROWS])
    real: dict[str, dict[str, str]] = {}
    for r in rows if rows is not None else read_metadata(catalog):
        p = (r.get("prompt") or "").strip()
        if p in wanted and (p not in real or (r.get("md5") in held and real[p].get("md5") not in held)):
            real[p] = r
    gallery = []
    for prompt in list(by_prompt)[:MAX_ROWS]:
        drawn = sorted(by_prompt[prompt])[:MAX_SEEDS]
        r = real.get(prompt.strip())
        gallery.append(GalleryRow(prompt, [p for _, p in drawn], [s for s, _ in drawn],
                               catalog.image_path(r["file_name"]) if r else None, r.get("image_title", "") if r else "",
                               (r.get("md5") in held) if r and held else None))
    return gallery, about.get("config") or {}


def model_view(catalog: Catalog, rows: list[dict[str, str]] | None = None) -> ModelView:
    """The served model (verified by :func:`~sd_core.diffusion.champion.served_model`) and what to show of it;
    ``rows``: metadata.csv's rows when the caller read them already."""
    from sd_core.diffusion.card import load_snippet
    from sd_core.diffusion.champion import find_champion, served_model
    from sd_core.diffusion.export import read_manifest
    from sd_core.encode.held_out import held_out_prompts

    try:
        model = served_model(catalog)
        champ = find_champion(catalog, repair=False)
    except Exception as e:  # noqa: BLE001  (the report says why nothing is served instead of failing)
        return ModelView(None, str(e))
    assert champ is not None  # served_model returned its export
    manifest = read_manifest(model) or {}
    evaluation = _json(catalog.eval_json(champ.run))
    if not (isinstance(evaluation, dict) and evaluation.get("digest") == champ.digest):
        evaluation = None
    held, n_train, n_held = _split(champ.run, manifest)
    gallery, settings = _gallery(catalog, champ.digest or "", held, rows)
    grid = catalog.eval_dir(champ.run) / "grid.png"
    prompt = gallery[0].prompt if gallery else ""
    if not prompt:
        cfg = manifest.get("train_config") or {}
        picked = held_out_prompts(catalog, val_fraction=float(cfg.get("val_fraction", 0.1)),
                                  split_seed=int(cfg.get("split_seed", 42)),
                                  min_items=int(cfg.get("val_min_items", 0)), n=1)
        prompt = picked[0] if picked else "a smiling emoji"
    try:
        snippet = load_snippet(manifest, str(model.resolve()), prompt)
    except Exception as e:  # noqa: BLE001  (an export kind without a snippet: say so in the box)
        snippet = f"# {e}"
    return ModelView(model, run=champ.run, digest=champ.digest, record=champ.record, manifest=manifest,
                     evaluation=evaluation, trained=n_train, held_out=n_held, gallery=gallery,
                     sample_settings=settings, eval_grid=grid if evaluation is not None and grid.is_file() else None,
                     snippet=snippet)


def latest_view(catalog: Catalog, champion_run: Path | None) -> LatestView | None:
    """The run trained last, when it is another than the champion."""
    run = catalog.latest_run()
    if run is None or run == champion_run or not run.is_dir():
        return None
    evaluation = _json(catalog.eval_json(run))
    manifest = _json(run / "model" / MANIFEST) or {}
    return LatestView(run, evaluation if isinstance(evaluation, dict) else None, manifest.get("step"))
