"""Model exports, and loading any of them back as a ``StableDiffusionPipeline``.

Every export folder holds ``emoji_sd_model.json``: its format, kind, training step, and the size and
SHA-256 of every file in it (checked when the folder is read, so a truncated or damaged export is named
instead of crashing deep inside safetensors). The model card (``README.md``, ``sample_grid.png``,
``sample_grid.json``; see :mod:`sd_core.diffusion.card`) is written beside the model and is not among them: it
is rewritten when the run is evaluated and sampled, and the model's checksums and digest stay as exported.

* ``scratch``: a complete ``StableDiffusionPipeline`` folder (unet, vae, text_encoder, tokenizer,
  scheduler, no safety checker) that ``StableDiffusionPipeline.from_pretrained(folder)`` runs as it is.
* ``pretrained_attn2``: only what changed, ``attn2.safetensors`` (the cross-attention weights), plus the
  base model's id and revision; the pipeline is rebuilt from the base.
* ``pretrained_attn2_lora``: ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format, which
  ``pipe.load_lora_weights(folder)`` reads, plus the base model's id and revision.
* opt-in (``train.export_merged``): ``merged/``, a complete pipeline with the fine-tuned weights in it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from sd_core.common.devices import diffusers_dtype_arg
from sd_core.diffusion.schedulers import ScheduleConfig
from sd_core.store.files import (
    atomic_write_json,
    file_checksum,
    json_problem,
    matches_checksum,
    names_file,
    read_json,
    stable_hash,
)

FORMAT = "emoji-sd-model/2"
MANIFEST = "emoji_sd_model.json"
ATTN2_WEIGHTS = "attn2.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
MERGED = "merged"
# The model card and what it shows, written beside the model after the export and rewritten when the run is
# evaluated or sampled: outside the manifest's checksums, so the model's identity (its digest) never moves.
CARD = "README.md"
CARD_GRID = "sample_grid.png"
CARD_SAMPLES = "sample_grid.json"
CARD_FILES = (CARD, CARD_GRID, CARD_SAMPLES)


class _OwnTextEncoder(logging.Filter):
    """Drops diffusers' warning that a pipeline's text encoder is not CLIP: emoji-sd exports any encoder's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Expected types for text_encoder")


_PIPELINE_ARGS = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class ModelFolderError(ValueError):
    """A model folder is not one emoji-sd can load (wrong format, missing or damaged files)."""


# --- writing --------------------------------------------------------------------------------------


PATH_FIELDS = ("_name_or_path", "name_or_path")  # where a library records the folder a model was loaded from
VERSION_FIELDS = ("_diffusers_version", "transformers_version", "_commit_hash")  # which library wrote it


def _is_config(path: Path) -> bool:
    return path.name.endswith("config.json") or path.name == "model_index.json"


def _without(obj: Any, fields: tuple[str, ...]) -> Any:
    if isinstance(obj, dict):
        return {k: _without(v, fields) for k, v in obj.items() if k not in fields}
    if isinstance(obj, list):
        return [_without(v, fields) for v in obj]
    return obj


def scrub_paths(folder: Path) -> list[str]:
    """Drop the fields that record where a model was loaded from (``_name_or_path``, an absolute path for a
    local model) from every config JSON under ``folder``; from_pretrained sets them again on loading. An
    export then holds no path of the machine or data directory it was written in. Returns what changed."""
    changed = []
    for path in sorted(p for p in Path(folder).rglob("*.json") if p.is_file() and _is_config(p)):
        data, why = json_problem(path)
        if why is None and isinstance(data, (dict, list)) and (clean := _without(data, PATH_FIELDS)) != data:
            atomic_write_json(path, clean)
            changed.append(str(path.relative_to(folder)))
    return changed


def _inventory(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of the model: all but the manifest and the card's files at the top."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                   and not (p.parent == folder and p.name in CARD_FILES))
    return {str(p.relative_to(folder)): file_checksum(p) for p in files}


def _publish(tmp: Path, folder: Path) -> None:
    """Swap the finished ``tmp`` into ``folder`` (an older export is kept until the new one is complete)."""
    if folder.exists():
        trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
        os.replace(folder, trash)
        os.replace(tmp, folder)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, folder)


class ExportWriter:
    """``with ExportWriter(folder) as w:`` write into ``w.tmp`` (a sibling folder), then ``w.seal(manifest)``
    writes the manifest with checksums and swaps the folder in; leaving the block without sealing (an error)
    removes the half-written folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for old in self.folder.parent.glob(f".tmp-{self.folder.name}-*"):
            shutil.rmtree(old, ignore_errors=True)
        self.tmp = self.folder.with_name(f".tmp-{self.folder.name}-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "ExportWriter":
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # gone already when sealed
        if isinstance(exc, Exception):
            with names_file(self.folder):  # a full disk names the export it was writing
                raise exc

    def seal(self, manifest: dict[str, Any]) -> Path:
        scrub_paths(self.tmp)
        atomic_write_json(self.tmp / MANIFEST, {"format": FORMAT, **manifest, "files": _inventory(self.tmp)})
        _publish(self.tmp, self.folder)
        return self.folder


def assemble_pipeline(unet: Any, vae: Any, tokenizer: Any, text_encoder: Any, scheduler_config: Any) -> Any:
    """A ``StableDiffusionPipeline`` from loaded parts (DDIM by default; see ``generate.use_sampler``)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(getattr(scheduler_config, "config", scheduler_config))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, **_PIPELINE_ARGS)


def write_scratch_export(folder: Path, *, unet: Any, vae_cfg: Any, text_cfg: Any, schedule: ScheduleConfig,
                         manifest: dict[str, Any]) -> Path:
    """A complete pipeline folder around a trained from-scratch ``unet`` (saved as fp32 safetensors)."""
    from sd_core.encode.encoders import load_text_encoder, load_vae

    with ExportWriter(folder) as writer:
        vae = load_vae(vae_cfg, on="cpu", dtype=torch.float32)
        tokenizer, text_encoder = load_text_encoder(text_cfg, on="cpu", dtype=torch.float32)
        pipe = assemble_pipeline(unet, vae, tokenizer, text_encoder, schedule.scheduler_config())
        pipe.save_pretrained(writer.tmp, safe_serialization=True)
        return writer.seal({"kind": "scratch", **manifest})


def write_attn2_export(folder: Path, *, weights: dict[str, torch.Tensor], base_model: str, revision: str | None,
                       manifest: dict[str, Any], merged: bool = False) -> Path:
    """``attn2.safetensors`` (the fine-tuned cross-attention tensors) and the base model's id and revision."""
    from safetensors.torch import save_file

    with ExportWriter(folder) as writer:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()},
                  str(writer.tmp / ATTN2_WEIGHTS))
        return _seal_fine_tune(writer, {"kind": "pretrained_attn2", "base_model": base_model, "revision": revision,
                                        **manifest}, merged)


def write_lora_export(folder: Path, *, unet: Any, weights: dict[str, torch.Tensor], base_model: str,
                      revision: str | None, manifest: dict[str, Any], merged: bool = False) -> Path:
    """diffusers LoRA safetensors of ``weights`` (the adapters of ``unet``, e.g. their EMA), readable by
    ``pipe.load_lora_weights(folder)``, and the base model's id and revision."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    with ExportWriter(folder) as writer:
        state = get_peft_model_state_dict(unet, state_dict={k: v.detach().float().cpu() for k, v in weights.items()})
        StableDiffusionPipeline.save_lora_weights(
            writer.tmp, unet_lora_layers=convert_state_dict_to_diffusers(state), weight_name=LORA_WEIGHTS,
            safe_serialization=True, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )
        return _seal_fine_tune(writer, {"kind": "pretrained_attn2_lora", "base_model": base_model,
                                        "revision": revision, **manifest}, merged)


def _seal_fine_tune(writer: ExportWriter, meta: dict[str, Any], merged: bool) -> Path:
    """Seal a fine-tune's export, with ``merged/`` (a complete pipeline holding the fine-tune) when asked."""
    if merged:
        pipe = _from_base(meta, writer.tmp, device="cpu", dtype=torch.float32)
        if meta["kind"] == "pretrained_attn2_lora":
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        pipe.save_pretrained(writer.tmp / MERGED, safe_serialization=True)
    return writer.seal(meta)


# --- reading --------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = read_json(Path(folder) / MANIFEST)
    except ValueError:
        raise ModelFolderError(f"{Path(folder) / MANIFEST} is not valid JSON") from None
    return data


def verify_export(folder: Path) -> dict[str, Any]:
    """The manifest, after checking that every file it lists is there with its size and checksum."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ModelFolderError(f"{folder} has no {MANIFEST}: not an emoji-sd export")
    if manifest.get("format") != FORMAT:
        raise ModelFolderError(f"{folder}: export format {manifest.get('format')!r}, this version reads {FORMAT}")
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing from the export")
        if not matches_checksum(path, want):
            raise ModelFolderError(f"{path} is damaged (its size or checksum differs from {MANIFEST})")
    return manifest


def export_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole export: its manifest reads and every file it lists is there with its
    size (checksums are not read: see :func:`verify_export`). A run folder whose deletion or export was cut
    short fails this."""
    folder = Path(folder)
    data, why = json_problem(folder / MANIFEST)
    if why is not None or not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return False
    try:
        return all((folder / rel).stat().st_size == f["bytes"] for rel, f in data["files"].items())
    except (OSError, KeyError, TypeError):
        return False


def model_digest(folder: Path) -> str:
    """A short fingerprint of an export's content (from its manifest), or of a plain diffusers folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        return stable_hash(manifest.get("files", {}))
    if (folder / "model_index.json").exists():
        return stable_hash(_inventory(folder))
    raise ModelFolderError(f"{folder} is not a model folder")


CONDITIONING = ("vae/", "text_encoder/", "tokenizer/")


def conditioning_digest(folder: Path) -> str:
    """A fingerprint of what an export's UNet reads, without the UNet: the VAE (its latent space) and the text
    encoder with its tokenizer (its prompt embeddings), from their content: weights by checksum, configs
    without path or version fields, so a copied or moved data directory gives the same fingerprint. A
    fine-tune reads its base model's, which it never changes (only cross-attention weights are trained)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("kind") != "scratch":
        return stable_hash({"base_model": manifest.get("base_model"), "revision": manifest.get("revision")})
    if manifest is None and not (folder / "model_index.json").exists():
        raise ModelFolderError(f"{folder} is not a model folder")
    files = manifest.get("files", {}) if manifest is not None else _inventory(folder)
    return stable_hash({rel: _content(folder / rel, f) for rel, f in files.items() if rel.startswith(CONDITIONING)})


def _content(path: Path, checksum: dict[str, Any]) -> Any:
    """What a file contributes to a content fingerprint: a config JSON without the fields that name where
    it was loaded from or which library version wrote it (exports written before those were dropped still
    compare), any other file its SHA-256."""
    if _is_config(path):
        data, why = json_problem(path)
        if why is None and data is not None:
            return _without(data, PATH_FIELDS + VERSION_FIELDS)
    return checksum.get("sha256")


def _from_pretrained(source: str, *, device: Any, dtype: torch.dtype | None, revision: str | None = None) -> Any:
    from diffusers import StableDiffusionPipeline

    quiet = logging.getLogger("diffusers.pipelines.pipeline_utils")
    if not any(isinstance(f, _OwnTextEncoder) for f in quiet.filters):
        quiet.addFilter(_OwnTextEncoder())
    kwargs: dict[str, Any] = dict(_PIPELINE_ARGS, use_safetensors=True)
    kwargs.pop("feature_extractor")
    if revision is not None:
        kwargs["revision"] = revision
    if dtype is not None:
        kwargs[diffusers_dtype_arg()] = dtype
    return StableDiffusionPipeline.from_pretrained(source, **kwargs).to(device)


def _from_base(meta: dict[str, Any], folder: Path, *, device: Any, dtype: torch.dtype | None) -> Any:
    pipe = _from_pretrained(meta["base_model"], device=device, dtype=dtype, revision=meta.get("revision"))
    if meta["kind"] == "pretrained_attn2":
        from safetensors.torch import load_file

        weights = load_file(str(folder / ATTN2_WEIGHTS))
        own = pipe.unet.state_dict()
        if unknown := sorted(k for k in weights if k not in own or "attn2" not in k):
            raise ModelFolderError(f"{folder / ATTN2_WEIGHTS} holds tensors the base UNet has no attn2 slot for: "
                                   f"{unknown[:3]}")
        pipe.unet.load_state_dict(weights, strict=False)
    else:
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS)
    return pipe


def load_pipeline(folder: Path, *, device: Any = "cpu", dtype: torch.dtype | None = None) -> Any:
    """A ``StableDiffusionPipeline`` for any export, or for a plain diffusers Stable Diffusion folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder")
    if (folder / MANIFEST).exists():
        meta = verify_export(folder)
        if meta["kind"] == "scratch":
            return _from_pretrained(str(folder), device=device, dtype=dtype)
        return _from_base(meta, folder, device=device, dtype=dtype)
    if (folder / "model_index.json").exists():
        return _from_pretrained(str(folder), device=device, dtype=dtype)
    old = read_json(folder / "config.json") if (folder / "config.json").exists() else None
    if isinstance(old, dict) and str(old.get("format", "")).startswith("emoji-sd-scratch/"):
        raise ModelFolderError(
            f"{folder} is a {old['format']} export of an earlier emoji-sd (its own UNet class); this version "
            "exports diffusers pipeline folders: retrain with `emoji-sd run ... --force train`")
    raise ModelFolderError(f"{folder} is neither an emoji-sd export ({MANIFEST}) nor a diffusers folder "
                           "(model_index.json)")
