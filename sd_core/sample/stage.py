"""The sample stage: the configured prompts drawn from the champion into ``samples/``.

Outputs: ``images/p{prompt:02d}_seed{seed}.png``, ``grid.png`` (a row per prompt, a column per seed),
``guidance_sweep.png`` (a row per prompt, a column per guidance scale) and ``samples.json`` (every setting
that draws each image again: prompt, negative prompt, seed, guidance, steps, sampler, size, the model's
digest, and the ``emoji-sd sample`` command line). With no prompts configured it draws captions of the
held-out side of the model's training split (:mod:`sd_core.encode.held_out`). The model is the one
:func:`~sd_core.diffusion.champion.served_model` returns (the champion's export, verified), never another
run's. The stage's key holds the champion's content digest and the prompts drawn, so a new champion is always
sampled.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sd_core.caption.template import DEFAULT_PROMPTS
from sd_core.common.images import make_grid, save_png
from sd_core.diffusion.champion import find_champion, served_model
from sd_core.diffusion.export import load_pipeline, model_digest, read_manifest
from sd_core.diffusion.generate import draw_grid, generate, image_size
from sd_core.encode.held_out import held_out_prompts
from sd_core.sample.config import DEVICE_PATTERN, SampleConfig
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, json_problem, read_json, stable_hash

CODE_VERSION = 3  # 2: drawn through StableDiffusionPipeline; 3: negative prompt, size, held-out prompts


@dataclass
class SampleResult:
    images: list[list[Image.Image]]  # [prompt][seed]
    image_paths: list[list[Path]]
    grid: Path
    guidance_sweep: Path | None
    prompts: tuple[str, ...]


def resolve_device(name: str) -> Any:
    """A ``[sample] device`` value as a torch device (``auto``: CUDA when available, else the CPU)."""
    import torch

    from sd_core.common.devices import device

    if name == "auto":
        return device()
    if not re.match(DEVICE_PATTERN, name):
        raise ValueError(f"sample.device (--device) = {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"sample.device (--device) = {name}: no CUDA device is available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("sample.device (--device) = mps: no MPS device is available here")
    return torch.device(name)


def check_size_early(folder: Path, cfg: SampleConfig) -> None:
    """Refuse a width or height the folder's own VAE cannot draw before the model is loaded (a folder with its
    VAE: scratch exports and diffusers folders; a fine-tune's is its base model's, checked once loaded)."""
    vae = read_json(Path(folder) / "vae" / "config.json")
    if isinstance(vae, dict) and vae.get("block_out_channels"):
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        for name, value in (("width", cfg.width), ("height", cfg.height)):
            if value is not None and value % factor:
                raise ValueError(f"sample.{name} (--{name}) = {value} is not a positive multiple of the VAE's factor "
                                 f"{factor}")


def model_split(model: Path | None) -> tuple[float, int, int]:
    """The training split (``val_fraction``, ``split_seed``, ``val_min_items``) an export was trained with (its
    manifest's training config; the trainer's defaults for a folder that does not say)."""
    from sd_core.training.config import TrainConfig

    defaults = TrainConfig.model_fields
    train = {}
    if model is not None:
        try:
            train = (read_manifest(Path(model)) or {}).get("train_config") or {}
        except ValueError:
            train = {}
    return (float(train.get("val_fraction", defaults["val_fraction"].default)),
            int(train.get("split_seed", defaults["split_seed"].default)),
            int(train.get("val_min_items", defaults["val_min_items"].default)))


def resolve_prompts(cfg: SampleConfig, catalog: Catalog | None, model: Path | None = None) -> tuple[str, ...]:
    """The prompts to draw: the configured ones; else ``cfg.held_out_prompts`` held-out captions of the data
    directory under the model's own split; else (no data directory, or no held-out item) the example prompts."""
    if cfg.prompts:
        return cfg.prompts
    if catalog is not None:
        val_fraction, split_seed, min_items = model_split(model)
        picked = held_out_prompts(catalog, val_fraction=val_fraction, split_seed=split_seed, min_items=min_items,
                                  n=cfg.held_out_prompts)
        if picked:
            return tuple(picked)
    return DEFAULT_PROMPTS


def command_line(settings: dict[str, Any], model: str | None) -> str:
    """The ``emoji-sd sample`` command that draws the image of ``settings`` (one image) again."""
    args = ["emoji-sd", "sample", "--model", model or "MODEL", "--prompt", settings["prompt"]]
    if settings.get("negative_prompt"):
        args += ["--negative-prompt", settings["negative_prompt"]]
    args += ["--seed", str(settings["seed"]), "--images-per-prompt", "1", "--guidance-scale",
             f"{settings['guidance_scale']:g}", "--steps", str(settings["steps"]), "--scheduler", settings["scheduler"],
             "--width", str(settings["width"]), "--height", str(settings["height"]), "--guidance-sweep"]
    return shlex.join(args)


def image_settings(cfg: SampleConfig, prompt: str, seed: int, size: tuple[int, int], *,
                   guidance_scale: float | None = None, digest: str | None = None) -> dict[str, Any]:
    """Everything that draws one image again (the pipeline's own noise from ``seed``, see ``generate``)."""
    return {"prompt": prompt, "negative_prompt": cfg.negative_prompt, "seed": seed,
            "guidance_scale": cfg.guidance_scale if guidance_scale is None else guidance_scale, "steps": cfg.steps,
            "scheduler": cfg.scheduler, "width": size[0], "height": size[1], "model_digest": digest}


def sample_to_folder(model: Path | Any, cfg: SampleConfig, out_dir: Path, *, catalog: Catalog | None = None,
                     digest: str | None = None) -> SampleResult:
    """Draw ``cfg.images_per_prompt`` images per prompt from ``model`` (a folder or a loaded pipeline) and save
    them, the grid, the guidance sweep and ``samples.json`` in ``out_dir``. Without configured prompts, held-out
    captions of ``catalog`` are drawn (see :func:`resolve_prompts`)."""
    folder = Path(model) if isinstance(model, (str, Path)) else None
    if folder is not None:
        check_size_early(folder, cfg)
    pipe = load_pipeline(folder, device=resolve_device(cfg.device)) if folder is not None else model
    if digest is None and folder is not None:
        digest = model_digest(folder)
    prompts = resolve_prompts(cfg, catalog, folder)
    size = image_size(pipe, cfg.width, cfg.height)
    out_dir = Path(out_dir)
    seeds = cfg.seeds()
    common: dict[str, Any] = dict(steps=cfg.steps, sampler_name=cfg.scheduler, batch_size=cfg.batch_size,
                                  negative_prompt=cfg.negative_prompt, width=size[0], height=size[1])
    images, grid = draw_grid(pipe, prompts, seeds, guidance_scale=cfg.guidance_scale, cell_size=cfg.cell_size,
                             label_width=cfg.label_width, **common)
    paths = [[out_dir / "images" / f"p{pi:02d}_seed{s}.png" for s in seeds] for pi in range(len(prompts))]
    for row_imgs, row_paths in zip(images, paths):
        for img, path in zip(row_imgs, row_paths):
            save_png(img, path)
    grid_path = save_png(grid, out_dir / "grid.png")
    sweep_path = None
    if cfg.guidance_sweep:
        columns = [generate(pipe, prompts, [cfg.seed], guidance_scale=s, **common) for s in cfg.guidance_sweep]
        sweep = [[columns[c][r][0] for c in range(len(columns))] for r in range(len(prompts))]
        sweep_path = save_png(make_grid(sweep, list(prompts), [f"w = {s:g}" for s in cfg.guidance_sweep],
                                        cell_size=cfg.cell_size, label_width=cfg.label_width),
                              out_dir / "guidance_sweep.png")
    model_name = str(folder) if folder is not None else None
    records = []
    for prompt, row in zip(prompts, paths):
        for seed, path in zip(seeds, row):
            settings = image_settings(cfg, prompt, seed, size, digest=digest)
            records.append({"file": path.relative_to(out_dir).as_posix(), **settings,
                            "command": command_line(settings, model_name)})
    atomic_write_json(out_dir / "samples.json", {
        "model": model_name, "model_digest": digest,
        "config": {**cfg.model_dump(mode="json"), "prompts": list(prompts)},
        "images": records,
        "guidance_sweep": None if sweep_path is None else {
            "file": sweep_path.name, "rows": list(prompts), "columns": list(cfg.guidance_sweep),
            "cell": image_settings(cfg, "<row>", cfg.seed, size, guidance_scale=None, digest=digest)},
    })
    return SampleResult(images, paths, grid_path, sweep_path, prompts)


def stage_key(cfg: SampleConfig, catalog: Catalog) -> str:
    """The sampling settings, the prompts they resolve to and the content digest of the champion sampled from
    (read from its record, not verified: :func:`run_sampling` verifies the export before drawing)."""
    champ = find_champion(catalog, repair=False)
    model = champ.model if champ is not None and champ.model.is_dir() else None
    settings = {**cfg.model_dump(mode="json"), "prompts": list(resolve_prompts(cfg, catalog, model))}
    return stable_hash({"model": champ.digest if champ else None, "config": settings,
                        "code_version": CODE_VERSION})


def samples_key_json(catalog: Catalog) -> Path:
    """What ``samples/`` was drawn from: ``{"key", "model", "digest"}``."""
    return catalog.samples_dir / "samples_key.json"


def run_sampling(cfg: SampleConfig, catalog: Catalog, *, force: bool = False) -> dict[str, Any]:
    """Draw the configured prompts (or held-out captions) from the champion into ``samples/`` unless that was
    done already; the grid then joins the model's card (see :mod:`sd_core.diffusion.card`)."""
    from sd_core.diffusion.card import attach_sample_grid

    model = served_model(catalog)
    key = stage_key(cfg, catalog)
    record, _ = json_problem(samples_key_json(catalog))  # a damaged record only means drawing again
    grid, settings = catalog.samples_dir / "grid.png", catalog.samples_dir / "samples.json"
    if isinstance(record, dict) and record.get("key") == key and grid.exists() and not force:
        attach_sample_grid(catalog, model.parent, grid, settings)
        return {"status": "reused", "grid": str(grid)}
    result = sample_to_folder(model, cfg, catalog.samples_dir, catalog=catalog)
    atomic_write_json(samples_key_json(catalog), {"key": key, "model": str(model), "digest": model_digest(model)})
    attach_sample_grid(catalog, model.parent, result.grid, settings)
    return {"status": "ran", "model": model.parent.name, "prompts": len(result.prompts),
            "images": sum(len(r) for r in result.images), "grid": str(result.grid)}


def prompts_from_file(path: Path) -> tuple[str, ...]:
    """One prompt a line (blank lines and lines starting with ``#`` skipped); a missing, unreadable or empty
    file is refused naming it."""
    try:
        text = Path(path).read_text("utf-8")
    except FileNotFoundError:
        raise ValueError(f"--prompts-file {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--prompts-file {path} is a directory") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompt (one prompt a line)")
    return prompts
