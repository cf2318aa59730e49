"""The model card of an export: ``README.md`` in the Hugging Face format, beside the model.

Its YAML header (``huggingface_hub``'s ``ModelCardData``) holds the licence, the base model (fine-tunes), tags,
``pipeline_tag: text-to-image``, ``library_name: diffusers`` and the dataset's Hub id when it is known. Its
body gives the training data (source, counts, captioners), the training settings, the evaluation scores beside
their unguided and real-image references, a sample grid (``sample_grid.png``, with the settings that drew it
in ``sample_grid.json``) and the diffusers code that loads that kind of export.

The card is not part of the export's checksums (see :data:`~sd_core.diffusion.export.CARD_FILES`): the train
stage writes it after exporting, the eval stage rewrites it with the scores, the sample stage adds the grid,
and ``emoji-sd push`` renders it again with the repository's id; the model's files and digest never change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sd_core.diffusion.export import (ATTN2_WEIGHTS, CARD, CARD_GRID, CARD_SAMPLES, LORA_WEIGHTS, MANIFEST, MERGED,
                                      ModelFolderError, model_digest, read_manifest)
from sd_core.encode.held_out import held_out_prompts
from sd_core.encode.pairs import split_ids
from sd_core.store.card import dataset_summary, source_text
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
LICENCE_NOTE = ("The model was trained on images whose licence is their source site's (see the dataset's card), "
                "not emoji-sd's: the MIT licence of emoji-sd covers its code only.")
SNIPPET_STEPS = 30
# scores that have references: the model's figure, then the same measure unguided, on the real held-out images,
# and on them after a round trip through the model's VAE
REFERENCES = (("", "model (guided)"), ("_g0", "unguided (w = 0)"), ("_real", "real images"),
              ("_vae", "real images through the VAE"))


def _card_json(path: Path) -> Any:
    """A JSON file of the card's (``sample_grid.json``); None when missing or damaged: it is redrawn, not trusted."""
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError):
        return None


def hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub repository id (``owner/name``) and is not a folder on this machine."""
    if not name or not HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def _split_counts(run: Path, train_cfg: dict[str, Any]) -> tuple[list[str], int, int]:
    """The md5s the run trained on (its plan's item set), and its train / held-out sizes."""
    plan = _card_json(run / "plan.json") or {}
    md5s = [item[0] for item in plan.get("items") or []]
    if not md5s:
        return [], 0, 0
    train, held = split_ids(md5s, float(train_cfg.get("val_fraction", 0.1)), int(train_cfg.get("split_seed", 42)),
                            int(train_cfg.get("val_min_items", 48)))
    return md5s, len(train), len(held)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _scores_section(evaluation: dict[str, Any] | None, history: str | None) -> str:
    if not evaluation or not evaluation.get("scores"):
        return ("Not evaluated yet: the eval stage rewrites this section with the held-out scores "
                "(`emoji-sd run --only eval`).\n")
    scores: dict[str, Any] = evaluation["scores"]
    status = evaluation.get("status")
    lines = [f"Scored by emoji-sd's eval stage on {evaluation.get('items', '?')} held-out items (never trained on), "
             f"{evaluation.get('seeds_per_item', 1)} image(s) per prompt, guided at w = "
             f"{_fmt(evaluation.get('guidance_scale'))}."
             + (f" Decision: **{status}** ({evaluation.get('reason', '')})." if status else ""), ""]
    bases = [k for k in scores if not any(k.endswith(s) for s, _ in REFERENCES[1:]) and k != "chance"
             and not k.endswith("_gain")]
    with_refs = [b for b in bases if any(f"{b}{s}" in scores for s, _ in REFERENCES[1:])]
    if with_refs:
        lines += ["| score | " + " | ".join(label for _, label in REFERENCES) + " | chance |",
                  "| --- |" + " --- |" * (len(REFERENCES) + 1)]
        for b in with_refs:
            cells = [_fmt(scores.get(f"{b}{s}")) for s, _ in REFERENCES]
            chance = _fmt(scores.get("chance")) if b == "prompt_following" else "–"
            lines.append(f"| `{b}` | " + " | ".join(cells) + f" | {chance} |")
        lines.append("")
        lines.append("The guided figure is the model's; the unguided one is what it draws without the text (the "
                     "model follows its prompts as far as it scores above it); the real images are what the "
                     "captioner reads at best, and their VAE round trip the most the UNet can reach.")
        lines.append("")
    rest = [b for b in bases if b not in with_refs]
    if rest:
        lines += ["| score | value |", "| --- | --- |"] + [f"| `{b}` | {_fmt(scores[b])} |" for b in rest]
        lines.append("")
    skipped = evaluation.get("skipped") or {}
    if skipped:
        lines.append("Not scored: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".")
        lines.append("")
    if history:
        lines.append(history)
    return "\n".join(lines)


def _settings_section(manifest: dict[str, Any]) -> str:
    cfg = manifest.get("train_config") or {}
    model = cfg.get("model") or {}
    rows = [("model kind", manifest.get("kind")), ("steps trained", manifest.get("step")),
            ("batch size (per process)", cfg.get("batch_size")),
            ("gradient accumulation", cfg.get("gradient_accumulation_steps")),
            ("learning rate", f"{_fmt(cfg.get('lr'))} → {_fmt(cfg.get('lr_min'))} (cosine, {cfg.get('warmup_steps')} "
                              "warm-up steps)" if cfg.get("lr") is not None else None),
            ("EMA decay", cfg.get("ema_decay")), ("caption dropout", cfg.get("caption_dropout")),
            ("noise offset", cfg.get("noise_offset")), ("min-SNR γ", cfg.get("min_snr_gamma")),
            ("prediction type", (cfg.get("schedule") or {}).get("prediction_type")),
            ("mixed precision", cfg.get("mixed_precision")),
            ("latent shape (C, h, w)", tuple(manifest["latent_shape"]) if manifest.get("latent_shape") else None),
            ("held-out fraction / split seed", f"{cfg.get('val_fraction')} / {cfg.get('split_seed')}"
             if "val_fraction" in cfg else None)]
    if model.get("kind") == "scratch" and model.get("unet"):
        unet = model["unet"]
        rows.append(("UNet", f"from scratch: h_dim {unet.get('h_dim')}, {unet.get('n_heads')} heads, context "
                             f"{unet.get('context_dim')}, pooled text {unet.get('text_time_embedding', False)}"))
    elif model.get("kind") == "pretrained_attn2_lora":
        lora = model.get("lora") or {}
        rows.append(("LoRA", f"rank {lora.get('rank')}, alpha {lora.get('alpha')} on attn2 to_q/to_k/to_v/to_out"))
    table = ["| setting | value |", "| --- | --- |"]
    table += [f"| {name} | {_fmt(value)} |" for name, value in rows if value is not None]
    full = json.dumps(cfg, indent=2, sort_keys=True)
    return "\n".join(table) + f"\n\n<details><summary>The whole training configuration</summary>\n\n```json\n{full}\n```\n\n</details>\n"


def load_snippet(manifest: dict[str, Any], where: str, prompt: str) -> str:
    """Python that loads the export at ``where`` (a Hub id or a folder) with diffusers and draws ``prompt``."""
    kind = manifest.get("kind")
    q = lambda v: "None" if v is None else json.dumps(v, ensure_ascii=False)  # noqa: E731  (a Python literal)
    draw = (f"prompt = {q(prompt)}\n"
            f"image = pipe(prompt, num_inference_steps={SNIPPET_STEPS}, guidance_scale=7.5,\n"
            "             generator=torch.Generator().manual_seed(0)).images[0]\n"
            'image.save("emoji.png")')
    if kind == "scratch":
        return ("import torch\nfrom diffusers import StableDiffusionPipeline\n\n"
                f"# the whole pipeline, its own VAE, text encoder and tokenizer included\n"
                f"pipe = StableDiffusionPipeline.from_pretrained({q(where)})\n" + draw)
    base, revision = manifest.get("base_model"), manifest.get("revision")
    load_base = (f"pipe = StableDiffusionPipeline.from_pretrained({q(base)}, revision={q(revision)},\n"
                 "                                               safety_checker=None, requires_safety_checker=False)\n")
    if kind == "pretrained_attn2":
        return ("import os\n\nimport torch\nfrom diffusers import StableDiffusionPipeline\n"
                "from huggingface_hub import snapshot_download\nfrom safetensors.torch import load_file\n\n"
                f"model = {q(where)}\nfolder = model if os.path.isdir(model) else snapshot_download(model)\n"
                + load_base
                + "# only the cross-attention (attn2) tensors are the fine-tune's; the rest is the base model\n"
                + f'pipe.unet.load_state_dict(load_file(os.path.join(folder, "{ATTN2_WEIGHTS}")), strict=False)\n'
                + draw)
    if kind == "pretrained_attn2_lora":
        return ("import torch\nfrom diffusers import StableDiffusionPipeline\n\n" + load_base
                + f'pipe.load_lora_weights({q(where)}, weight_name="{LORA_WEIGHTS}")\n' + draw)
    raise ModelFolderError(f"{where}: no model card for export kind {kind!r}")


def _grid_section(folder: Path) -> str:
    if not (folder / CARD_GRID).exists():
        return "No sample grid yet: the sample stage adds one (`emoji-sd run --only sample`).\n"
    about = _card_json(folder / CARD_SAMPLES) or {}
    config = about.get("config") or {}
    seeds = [image.get("seed") for image in about.get("images", [])]
    detail = ""
    if config and seeds:
        negative = config.get("negative_prompt")
        detail = (f" Rows: prompts; columns: seeds {min(seeds)}…{max(seeds)}. Guidance "
                  f"{_fmt(config.get('guidance_scale'))}, {config.get('steps')} {config.get('scheduler')} steps"
                  f"{f', negative prompt {negative!r}' if negative else ''}. `{CARD_SAMPLES}` holds every image's "
                  "settings and the command that draws it again.")
    return f"![samples]({CARD_GRID})\n\nDrawn from this model by emoji-sd's sample stage.{detail}\n"


def _first_prompt(folder: Path, fallback: str) -> str:
    about = _card_json(folder / CARD_SAMPLES) or {}
    images = about.get("images") or []
    return images[0]["prompt"] if images and images[0].get("prompt") else fallback


def model_card(folder: Path, *, catalog: Catalog | None = None, repo_id: str | None = None,
               dataset_repo_id: str | None = None, where: str | None = None) -> Any:
    """The ``huggingface_hub.ModelCard`` of the export at ``folder``. With ``catalog`` (its data directory) the
    card gives the training data and, from the run's ``scores/scores.json``, the evaluation. The load snippet
    names ``repo_id`` (when the card is for a Hub repository), else ``where``, else the folder's absolute path."""
    from huggingface_hub import ModelCard, ModelCardData

    from sd_core.caption.template import DEFAULT_PROMPTS

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ModelFolderError(f"{folder} has no {MANIFEST}: not an emoji-sd export")
    kind = manifest.get("kind")
    digest = model_digest(folder)
    run = folder.parent
    train_cfg = manifest.get("train_config") or {}
    base = manifest.get("base_model") if kind != "scratch" else None
    tags = ["emoji", "emoji-sd", "text-to-image", "diffusers", "stable-diffusion", "diffusers-training"]
    if kind == "pretrained_attn2_lora":
        tags.append("lora")
    header = ModelCardData(license="other", license_name="source-site-terms", base_model=hub_id(base), tags=tags,
                           pipeline_tag="text-to-image", library_name="diffusers",
                           datasets=[dataset_repo_id] if dataset_repo_id else None)

    data_text = "No data directory was given when this card was written.\n"
    evaluation, history = None, None
    if catalog is not None:
        md5s, n_train, n_held = _split_counts(run, train_cfg)
        facts = dataset_summary(catalog, set(md5s) if md5s else None)
        captioners = "; ".join(f"{name} ({n} images)" for name, n in facts["captioners"].items()) or "(none)"
        counts = (f"{len(md5s)} images, {n_train} trained on and {n_held} held out for evaluation"
                  if md5s else f"{facts['images']} images")
        data_text = (f"- **Source**: {source_text(facts, tag_word='tag(s)')}, each image read once and deduplicated by the md5 "
                     "of its bytes.\n"
                     f"- **Counts**: {counts} (the run's item set, `plan.json`); the data directory also "
                     f"listed {facts['duplicates']} duplicates and quarantined {facts['quarantined']} files that "
                     "did not decode.\n"
                     f"- **Captions**: {captioners}.\n"
                     + (f"- **Dataset on the Hub**: [{dataset_repo_id}](https://huggingface.co/datasets/{dataset_repo_id})\n"
                        if dataset_repo_id else ""))
        evaluation = read_json(catalog.eval_json(run))
        if catalog.eval_history_csv.exists():
            history = ("Every evaluated run of this data directory, promoted or rejected, is a row of "
                       "`models/evaluations.csv` there.\n")
    name = repo_id or where or str(folder.resolve())
    held = held_out_prompts(catalog, val_fraction=float(train_cfg.get("val_fraction", 0.1)),
                            split_seed=int(train_cfg.get("split_seed", 42)),
                            min_items=int(train_cfg.get("val_min_items", 48)), n=1) if catalog is not None else []
    prompt = _first_prompt(folder, held[0] if held else DEFAULT_PROMPTS[0])
    snippet = load_snippet(manifest, name, prompt)
    base_text = (f"fine-tuned from [{base}](https://huggingface.co/{base})" if hub_id(base) else
                 f"fine-tuned from `{base}`" if base else "trained from scratch")
    title = repo_id.split("/")[-1] if repo_id else f"emoji-sd {kind} model"
    merged = (f"\n`{MERGED}/` is the same model as a complete pipeline folder: "
              f"`StableDiffusionPipeline.from_pretrained(<folder>/{MERGED})`.\n"
              if (folder / MERGED).is_dir() else "")
    what = {"scratch": "a complete `StableDiffusionPipeline` folder (UNet, VAE, text encoder and tokenizer, "
                       "scheduler; no safety checker)",
            "pretrained_attn2": f"`{ATTN2_WEIGHTS}`: the fine-tuned cross-attention (attn2) tensors of the base "
                                "model's UNet; every other weight is the base model's",
            "pretrained_attn2_lora": f"`{LORA_WEIGHTS}`: LoRA adapters on the base model's cross-attention "
                                     "(attn2), in diffusers' format"}.get(kind, str(kind))
    body = f"""
# {title}

A text-to-emoji diffusion model made by emoji-sd from a collection of emoji:
{base_text}, {manifest.get('step')} steps. This folder holds {what}.{merged}

Model digest (of `{MANIFEST}`'s checksums): `{digest}`.

## Training data

{data_text}
## Training settings

{_settings_section(manifest)}
## Evaluation

{_scores_section(evaluation, history)}
## Samples

{_grid_section(folder)}
## How to use it

```python
{snippet}
```

## Licence

{LICENCE_NOTE}{f" The base model `{base}` keeps its own licence." if base else ""}
"""
    return ModelCard(f"---\n{header.to_yaml()}\n---\n{body}")


def write_model_card(folder: Path, *, catalog: Catalog | None = None) -> Path:
    """Write ``README.md`` beside the export at ``folder`` (atomically, and only when its text changed; outside the
    export's checksums)."""
    path = Path(folder) / CARD
    text = str(model_card(folder, catalog=catalog))
    if not path.is_file() or path.read_text("utf-8") != text:
        atomic_write_text(path, text)
    return path


def attach_sample_grid(catalog: Catalog, run: Path, grid: Path, samples_json: Path | None = None) -> Path | None:
    """Put the sample stage's grid (and the settings that drew it) beside the run's export and rewrite its card."""
    folder = Path(run) / "model"
    if read_manifest(folder) is None:
        return None
    data = Path(grid).read_bytes()
    if not (folder / CARD_GRID).is_file() or (folder / CARD_GRID).read_bytes() != data:
        atomic_write_bytes(folder / CARD_GRID, data)
    settings = read_json(samples_json) if samples_json is not None else None
    if isinstance(settings, dict) and settings.get("model"):
        # beside the export, the model is the folder the card sits in: no absolute path, wherever it was drawn
        settings = json.loads(json.dumps(settings).replace(json.dumps(str(settings["model"]))[1:-1], "."))
    if settings is not None and _card_json(folder / CARD_SAMPLES) != settings:
        atomic_write_json(folder / CARD_SAMPLES, settings)
    return write_model_card(folder, catalog=catalog)
