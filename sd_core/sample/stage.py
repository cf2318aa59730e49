"""The sample stage: the configured prompts drawn from the champion into ``samples/``.

Outputs: ``images/p{prompt:02d}_seed{seed}.png``, ``grid.png`` (a row per prompt, a column per seed),
``guidance_sweep.png`` (a row per prompt, a column per guidance scale) and ``samples.json``. The model is the
one :func:`~sd_core.diffusion.champion.served_model` returns (the champion's export, verified), never
another run's. The stage's key holds the champion's content digest, so a new champion is always sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sd_core.common.devices import device
from sd_core.common.images import make_grid, save_png
from sd_core.diffusion.champion import find_champion, served_model
from sd_core.diffusion.export import load_pipeline, model_digest
from sd_core.diffusion.generate import draw_grid, generate
from sd_core.sample.config import SampleConfig
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, json_problem, stable_hash

CODE_VERSION = 2  # 2: drawn through StableDiffusionPipeline


@dataclass
class SampleResult:
    images: list[list[Image.Image]]  # [prompt][seed]
    image_paths: list[list[Path]]
    grid: Path
    guidance_sweep: Path | None


def sample_to_folder(model: Path | Any, cfg: SampleConfig, out_dir: Path) -> SampleResult:
    """Draw ``cfg.images_per_prompt`` images per prompt from ``model`` (a folder or a loaded pipeline) and save
    them, the grid and the guidance sweep in ``out_dir``."""
    pipe = load_pipeline(model, device=device()) if isinstance(model, (str, Path)) else model
    out_dir = Path(out_dir)
    seeds = cfg.seeds()
    common = dict(steps=cfg.steps, sampler_name=cfg.scheduler, batch_size=cfg.batch_size)
    images, grid = draw_grid(pipe, cfg.prompts, seeds, guidance_scale=cfg.guidance_scale, cell_size=cfg.cell_size,
                             label_width=cfg.label_width, **common)
    paths = [[out_dir / "images" / f"p{pi:02d}_seed{s}.png" for s in seeds] for pi in range(len(cfg.prompts))]
    for row_imgs, row_paths in zip(images, paths):
        for img, path in zip(row_imgs, row_paths):
            save_png(img, path)
    grid_path = save_png(grid, out_dir / "grid.png")
    sweep_path = None
    if cfg.guidance_sweep:
        columns = [generate(pipe, cfg.prompts, [cfg.seed], guidance_scale=s, **common) for s in cfg.guidance_sweep]
        sweep = [[columns[c][r][0] for c in range(len(columns))] for r in range(len(cfg.prompts))]
        sweep_path = save_png(make_grid(sweep, cfg.prompts, [f"w = {s:g}" for s in cfg.guidance_sweep],
                                        cell_size=cfg.cell_size, label_width=cfg.label_width),
                              out_dir / "guidance_sweep.png")
    atomic_write_json(out_dir / "samples.json", {
        "config": cfg.model_dump(mode="json"),
        "model": str(model) if isinstance(model, (str, Path)) else None,
        "images": {p: [str(x.relative_to(out_dir)) for x in row] for p, row in zip(cfg.prompts, paths)},
    })
    return SampleResult(images, paths, grid_path, sweep_path)


def stage_key(cfg: SampleConfig, catalog: Catalog) -> str:
    """The sampling settings and the content digest of the champion sampled from (read from its record, not
    verified: :func:`run_sampling` verifies the export before drawing)."""
    champ = find_champion(catalog, repair=False)
    return stable_hash({"model": champ.digest if champ else None, "config": cfg.model_dump(mode="json"),
                        "code_version": CODE_VERSION})


def samples_key_json(catalog: Catalog) -> Path:
    """What ``samples/`` was drawn from: ``{"key", "model", "digest"}``."""
    return catalog.samples_dir / "samples_key.json"


def run_sampling(cfg: SampleConfig, catalog: Catalog, *, force: bool = False) -> dict[str, Any]:
    """Draw the configured prompts from the champion into ``samples/`` unless that was done already."""
    model = served_model(catalog)
    key = stage_key(cfg, catalog)
    record, _ = json_problem(samples_key_json(catalog))  # a damaged record only means drawing again
    if isinstance(record, dict) and record.get("key") == key and (catalog.samples_dir / "grid.png").exists() \
            and not force:
        return {"status": "reused", "grid": str(catalog.samples_dir / "grid.png")}
    result = sample_to_folder(model, cfg, catalog.samples_dir)
    atomic_write_json(samples_key_json(catalog), {"key": key, "model": str(model), "digest": model_digest(model)})
    return {"status": "ran", "model": model.parent.name, "prompts": len(cfg.prompts),
            "images": sum(len(r) for r in result.images), "grid": str(result.grid)}
