"""Encode stage: VAE latent distributions of the images and text-encoder states of the captions.

Both are computed once per item and cached in a :class:`~sd_core.tensor_store.TensorStore`. An entry's
key names everything that shaped its tensors (model, revision, subfolder, a fingerprint of local
weights, resolution, dtype, ...), so changing any of them recomputes instead of reusing. Models load
only when something is missing: a fully cached run makes no model call.

Keys hold no file-system path, so a data directory that moves, or a virtual environment that is
recreated, keeps its caches: a model is named by its hub id, or, for a local folder, by the symbolic id
it was given (``trained``, ``package:…``; see :func:`sd_core.encode.stage.resolve`) or ``local``,
next to a fingerprint of its files' bytes under their names relative to the model folder.

Latent entries hold ``mean`` and ``std`` of the VAE's diagonal Gaussian (float32, shape (C, r/8, r/8)),
plus ``mean_flip``/``std_flip`` of the horizontally flipped image when ``flip`` is on. A training step
samples a fresh latent ``(mean + std * eps - shift_factor) * scaling_factor``.
Text entries hold ``last_hidden_state`` (float16, (max_length, dim)) and ``attention_mask``
(int64, (max_length,)); the empty prompt is always encoded too, for classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from sd_core.common.devices import (
    device,
    diffusers_dtype_arg,
    dtype_name,
    resolve_dtype,
    transformers_dtype_arg,
)
from sd_core.common.images import image_to_tensor
from sd_core.encode.config import TextEncoderConfig, VAEConfig
from sd_core.store.files import sha256_text
from sd_core.store.tensors import TensorStore

logger = logging.getLogger(__name__)

LATENT_FORMAT = 1
TEXT_FORMAT = 1
LATENT_STORE_DTYPE = torch.float32
TEXT_STORE_DTYPE = torch.float16
EMPTY_PROMPT = ""
_MODEL_FILES = re.compile(
    r"^(config\.json|.*\.safetensors(\.index\.json)?|tokenizer.*\.json|vocab\.(json|txt)|merges\.txt"
    r"|special_tokens_map\.json|added_tokens\.json|.*\.model)$"
)


@dataclass
class EncodeSummary:
    """Counts over unique items; ``calls`` is the number of model forward passes, ``loaded`` whether it needed
    the model (loaded, or taken from this process's cache: see :func:`shared_vae`)."""

    encoded: int = 0
    reused: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    loaded: bool = False
    truncated: int = 0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _pretrained_kwargs(revision: str | None, subfolder: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if revision is not None:
        kwargs["revision"] = revision
    if subfolder:
        kwargs["subfolder"] = subfolder
    return kwargs


def _weights_kwargs(revision: str | None, subfolder: str | None) -> dict[str, Any]:
    """from_pretrained arguments for weights: safetensors only, never a pickled checkpoint."""
    return {**_pretrained_kwargs(revision, subfolder), "use_safetensors": True}


# --- model identity ----------------------------------------------------------------------------


def _local_folder(model_id: str, subfolder: str | None) -> Path | None:
    folder = Path(model_id) / (subfolder or "")
    return folder if folder.is_dir() else None


def weights_fingerprint(model_id: str, *subfolders: str | None) -> str | None:
    """Hash of the config, weight and tokenizer files of a local model folder; None for a hub id.

    A hub id is identified by its name and revision; a local folder can be overwritten in place
    (a retrained default VAE), so its content is part of every key. What is hashed is each file's
    name relative to the model folder (``text_encoder/config.json``) and its bytes, never where the
    folder is, so a moved or copied folder has the same fingerprint. Hashes are cached in the process
    by path, size and mtime.
    """
    signature: list[tuple[str, str, int, int]] = []
    for sub in dict.fromkeys(subfolders or (None,)):
        folder = _local_folder(model_id, sub)
        if folder is None:
            continue
        for p in sorted(folder.iterdir()):
            if p.is_file() and _MODEL_FILES.match(p.name):
                st = p.stat()
                signature.append((p.relative_to(model_id).as_posix(), str(p.resolve()), st.st_size, st.st_mtime_ns))
    if not signature:
        return None
    return _hash_files(tuple(signature))


@lru_cache(maxsize=64)
def _hash_files(signature: tuple[tuple[str, str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, path, _, _ in signature:
        h.update(name.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class VAEInfo:
    """What the VAE's config.json says, read without loading weights."""

    scaling_factor: float
    shift_factor: float | None
    latent_channels: int
    downsample: int
    weights: str | None


def vae_info(vae_cfg: VAEConfig) -> VAEInfo:
    """Scaling/shift factors and latent shape from the VAE config, plus the local weights fingerprint."""
    weights = weights_fingerprint(vae_cfg.model_id, vae_cfg.subfolder)
    return _vae_info(vae_cfg.model_id, vae_cfg.revision, vae_cfg.subfolder, weights)


_VAE_INFO_FIELDS = ("block_out_channels", "shift_factor", "scaling_factor", "latent_channels")


def _local_vae_config(model_id: str, subfolder: str | None) -> dict[str, Any] | None:
    """A local VAE's config.json when it names every field :class:`VAEInfo` needs (as ``save_pretrained``
    writes it): read as JSON, without importing diffusers (seconds of ``status`` and of a rerun's planning)."""
    folder = _local_folder(model_id, subfolder)
    try:
        config = json.loads((folder / "config.json").read_text("utf-8")) if folder is not None else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and all(k in config for k in _VAE_INFO_FIELDS) else None


@lru_cache(maxsize=16)
def _vae_info(model_id: str, revision: str | None, subfolder: str | None, weights: str | None) -> VAEInfo:
    config = _local_vae_config(model_id, subfolder)
    if config is None:
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(model_id, **_pretrained_kwargs(revision, subfolder))
        defaults = inspect.signature(AutoencoderKL.__init__).parameters
        config = {k: config.get(k, defaults[k].default) for k in _VAE_INFO_FIELDS}
    blocks, shift = config["block_out_channels"], config["shift_factor"]
    return VAEInfo(
        scaling_factor=float(config["scaling_factor"]),
        shift_factor=None if shift is None else float(shift),
        latent_channels=int(config["latent_channels"]),
        downsample=2 ** (len(blocks) - 1),
        weights=weights,
    )


def latent_key_base(vae_cfg: VAEConfig, scaling: float | None = None) -> dict[str, Any]:
    """Every latent-key field but ``md5``; compute once and extend per image when looking up many."""
    info = vae_info(vae_cfg)
    return {
        "kind": "latent",
        "format": LATENT_FORMAT,
        "vae": vae_cfg.cache_id(),
        "revision": vae_cfg.revision,
        "subfolder": vae_cfg.subfolder,
        "weights": info.weights,
        "resolution": vae_cfg.resolution,
        "dtype": dtype_name(vae_cfg.dtype),
        "flip": vae_cfg.flip,
        "scaling_factor": info.scaling_factor if scaling is None else float(scaling),
        "shift_factor": info.shift_factor,
    }


KEYED_FITS = ("pad", "crop")  # a non-square image's fit (convert.fit) that changes its latents from a stretch


def item_latent_key(base: dict[str, Any], md5: str, fit: str | None = None) -> dict[str, Any]:
    """One image's latent key from :func:`latent_key_base`: ``fit`` (metadata.csv's fit column: how a
    non-square image was made square) is named only when it is ``pad`` or ``crop``, so the keys of square
    images, and of images stretched as before the setting existed, stay what they were."""
    key = {**base, "md5": md5}
    if fit in KEYED_FITS:
        key["fit"] = fit
    return key


def latent_key(vae_cfg: VAEConfig, md5: str, scaling: float | None = None, fit: str | None = None) -> dict[str, Any]:
    """Store key of one image's latents; ``scaling`` defaults to the VAE config's scaling_factor."""
    return item_latent_key(latent_key_base(vae_cfg, scaling), md5, fit)


def text_key_base(text_cfg: TextEncoderConfig) -> dict[str, Any]:
    """Every text-key field but ``caption_sha256``."""
    return {
        "kind": "text",
        "format": TEXT_FORMAT,
        "encoder": text_cfg.cache_id(),
        "encoder_kind": text_cfg.kind,
        "revision": text_cfg.revision,
        "subfolder": text_cfg.subfolder,
        "tokenizer_subfolder": text_cfg.tokenizer_subfolder,
        "weights": weights_fingerprint(text_cfg.model_id, text_cfg.subfolder, text_cfg.tokenizer_subfolder),
        "max_length": text_cfg.max_length,
        "dtype": dtype_name(text_cfg.dtype),
    }


def text_key(text_cfg: TextEncoderConfig, caption: str) -> dict[str, Any]:
    """Store key of one caption's text-encoder states."""
    return {**text_key_base(text_cfg), "caption_sha256": sha256_text(caption)}


# --- loading models once per process ----------------------------------------------------------

MODEL_LOADS: Counter[str] = Counter()  # from_pretrained loads in this process: {"vae": n, "text": n}
_SHARED: dict[str, tuple[str, Any]] = {}  # kind -> (identity, model): the last model of each kind used
_SHARED_LOCK = threading.Lock()


_LOAD_FIELDS = {"model_id", "revision", "subfolder", "tokenizer_subfolder", "kind", "max_length", "dtype"}


def _identity(cfg: VAEConfig | TextEncoderConfig, weights: str | None) -> str:
    """Everything that decides what a loader returns (not batch size, resolution, ...), weights included."""
    return json.dumps([type(cfg).__name__, cfg.model_dump(mode="json", include=_LOAD_FIELDS), weights],
                      sort_keys=True)


def _shared(kind: str, identity: str, load: Callable[[], Any]) -> Any:
    with _SHARED_LOCK:
        held = _SHARED.get(kind)
        if held is None or held[0] != identity:
            _SHARED.pop(kind, None)  # drop the previous model of this kind before loading the next
            _SHARED[kind] = (identity, load())
        return _SHARED[kind][1]


def shared_vae(vae_cfg: VAEConfig) -> Any:
    """The VAE of ``vae_cfg``, loaded once per process: every encode batch a worker runs uses the same one.

    The process keeps the last VAE it used (keyed by the config and its weights fingerprint, so a VAE
    retrained in the same folder is loaded again)."""
    identity = _identity(vae_cfg, weights_fingerprint(vae_cfg.model_id, vae_cfg.subfolder))
    return _shared("vae", identity, lambda: load_vae(vae_cfg))


def shared_text_encoder(text_cfg: TextEncoderConfig) -> tuple[Any, Any]:
    """(tokenizer, model) of ``text_cfg``, loaded once per process, as :func:`shared_vae`."""
    identity = _identity(text_cfg, weights_fingerprint(text_cfg.model_id, text_cfg.subfolder,
                                                       text_cfg.tokenizer_subfolder))
    return _shared("text", identity, lambda: load_text_encoder(text_cfg))


def release_shared_models() -> None:
    """Forget the models :func:`shared_vae` and :func:`shared_text_encoder` hold (frees their memory)."""
    from sd_core.common.devices import empty_device_cache

    with _SHARED_LOCK:
        _SHARED.clear()
    empty_device_cache()


# --- images ------------------------------------------------------------------------------------


def load_vae(vae_cfg: VAEConfig, *, on: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """The frozen ``AutoencoderKL`` named by the config, in eval mode (on CUDA when available and the
    config's dtype, unless ``on`` / ``dtype`` say otherwise)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        vae_cfg.model_id, **{diffusers_dtype_arg(): dtype or resolve_dtype(vae_cfg.dtype)},
        **_weights_kwargs(vae_cfg.revision, vae_cfg.subfolder),
    )
    MODEL_LOADS["vae"] += 1
    return vae.to(on or device()).eval().requires_grad_(False)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Writer:
    """Buffers new entries and writes them a shard at a time, so a killed run loses at most one shard."""

    def __init__(self, store: TensorStore) -> None:
        self.store = store
        self.buffer: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []

    def add(self, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.buffer.append((key, tensors))
        if len(self.buffer) >= self.store.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.store.put(self.buffer)
            self.buffer = []


def encode_images(
    vae_cfg: VAEConfig,
    images: Sequence[tuple[str, Path | str] | tuple[str, Path | str, str]],
    store: TensorStore,
    *,
    progress: bool = True,
    load: Callable[[VAEConfig], Any] = load_vae,
) -> EncodeSummary:
    """Store the latent distribution of every ``(md5, path)`` or ``(md5, path, fit)`` not already cached (``fit``:
    how a non-square image is made square, see :func:`~sd_core.common.images.fit_square`; none: stretched); an
    unreadable image is a failure.

    New entries are written ``store.shard_size`` at a time; the model comes from ``load`` (called only when
    something is missing; the encode stage passes :func:`shared_vae`)."""
    summary = EncodeSummary()
    paths: dict[str, Path | str] = {}
    fits: dict[str, str | None] = {}
    for md5, path, *fit in images:
        paths.setdefault(md5, path)
        fits.setdefault(md5, fit[0] if fit else None)
    base = latent_key_base(vae_cfg)
    keys = {md5: item_latent_key(base, md5, fits[md5]) for md5 in paths}
    todo = [md5 for md5 in paths if not store.contains(keys[md5])]
    summary.reused = len(paths) - len(todo)
    if not todo:
        return summary

    vae: Any = None
    writer = _Writer(store)
    bar = tqdm(total=len(todo), desc="encoding images", unit="img", disable=not progress)
    try:
        for batch in _batches(todo, vae_cfg.batch_size):
            ok: list[str] = []
            pixels: list[torch.Tensor] = []
            for md5 in batch:
                try:
                    pixels.append(image_to_tensor(paths[md5], vae_cfg.resolution, fits[md5]))
                    ok.append(md5)
                except (OSError, ValueError, SyntaxError) as e:
                    summary.failures[md5] = f"{type(e).__name__}: {e}"
            bar.update(len(batch))
            if not ok:
                continue
            if vae is None:
                vae = load(vae_cfg)
                summary.loaded = True
            x = torch.stack(pixels)
            if vae_cfg.flip:
                x = torch.cat([x, torch.flip(x, dims=[3])])
            with torch.inference_mode():
                dist = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist
                mean = dist.mean.to("cpu", LATENT_STORE_DTYPE)
                std = dist.std.to("cpu", LATENT_STORE_DTYPE)
            summary.calls += 1
            n = len(ok)
            for i, md5 in enumerate(ok):
                tensors = {"mean": mean[i], "std": std[i]}
                if vae_cfg.flip:
                    tensors.update(mean_flip=mean[n + i], std_flip=std[n + i])
                writer.add(keys[md5], tensors)
                summary.encoded += 1
        writer.flush()
    finally:
        bar.close()
    summary.failed = len(summary.failures)
    return summary


# --- text --------------------------------------------------------------------------------------


def load_text_encoder(
    text_cfg: TextEncoderConfig, *, on: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """(tokenizer, frozen model) set up exactly as ``StableDiffusionPipeline`` will run them.

    The tokenizer pads to ``model_max_length = max_length``. A bidirectional ``auto`` encoder gets
    ``config.use_attention_mask = True``, so the pipeline passes the mask and padding does not leak into
    the real tokens; CLIP runs causally without it, as Stable Diffusion was trained.
    """
    if text_cfg.kind == "clip":
        from transformers import CLIPTextModel as Model
        from transformers import CLIPTokenizer as Tokenizer
    else:
        from transformers import AutoModel as Model
        from transformers import AutoTokenizer as Tokenizer

    tokenizer = Tokenizer.from_pretrained(
        text_cfg.model_id, **_pretrained_kwargs(text_cfg.revision, text_cfg.tokenizer_subfolder)
    )
    tokenizer.model_max_length = text_cfg.max_length
    model = Model.from_pretrained(
        text_cfg.model_id, **{transformers_dtype_arg(): dtype or resolve_dtype(text_cfg.dtype)},
        **_weights_kwargs(text_cfg.revision, text_cfg.subfolder),
    )
    if text_cfg.kind == "auto":
        model.config.use_attention_mask = True
    MODEL_LOADS["text"] += 1
    return tokenizer, model.to(on or device()).eval().requires_grad_(False)


def text_embed_dim(text_cfg: TextEncoderConfig) -> int:
    """Width of the encoder's last hidden state, read from its config without loading weights."""
    if text_cfg.kind == "clip":
        from transformers import CLIPTextConfig as Config
    else:
        from transformers import AutoConfig as Config
    config = Config.from_pretrained(text_cfg.model_id, **_pretrained_kwargs(text_cfg.revision, text_cfg.subfolder))
    return int(config.hidden_size)


def tokenize(tokenizer: Any, text_cfg: TextEncoderConfig, texts: Sequence[str]) -> Any:
    """Input ids and attention mask, padded and truncated to ``max_length``."""
    return tokenizer(
        list(texts), padding="max_length", max_length=text_cfg.max_length, truncation=True, return_tensors="pt"
    )


def embed_texts(
    tokenizer: Any, model: Any, text_cfg: TextEncoderConfig, texts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state (B, L, D) float32, attention_mask (B, L) int64) for ``texts``, computed as
    ``StableDiffusionPipeline.encode_prompt`` does: ids padded to ``max_length``, and the attention mask
    passed to the encoder only when its config sets ``use_attention_mask`` (see :func:`load_text_encoder`).
    """
    enc = tokenize(tokenizer, text_cfg, texts)
    mask = enc["attention_mask"].to(torch.long)
    inputs = {"input_ids": enc["input_ids"]}
    if getattr(model.config, "use_attention_mask", False):
        inputs["attention_mask"] = enc["attention_mask"]
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state
    return hidden.float().cpu(), mask


def encode_texts(
    text_cfg: TextEncoderConfig,
    captions: Sequence[str],
    store: TensorStore,
    *,
    progress: bool = True,
    load: Callable[[TextEncoderConfig], tuple[Any, Any]] = load_text_encoder,
    with_empty: bool = True,
) -> EncodeSummary:
    """Store the states of every caption (and of the empty prompt, unless ``with_empty`` is False) not already
    cached, ``store.shard_size`` entries at a time; the model comes from ``load`` as in :func:`encode_images`."""
    summary = EncodeSummary()
    texts = list(dict.fromkeys([*captions, EMPTY_PROMPT] if with_empty else captions))
    base = text_key_base(text_cfg)
    keys = {t: {**base, "caption_sha256": sha256_text(t)} for t in texts}
    todo = [t for t in texts if not store.contains(keys[t])]
    summary.reused = len(texts) - len(todo)
    if not todo:
        return summary

    tokenizer, model = load(text_cfg)
    summary.loaded = True
    writer = _Writer(store)
    bar = tqdm(total=len(todo), desc="encoding captions", unit="caption", disable=not progress)
    try:
        for batch in _batches(todo, text_cfg.batch_size):
            lengths = [len(ids) for ids in tokenizer(list(batch), truncation=False)["input_ids"]]
            summary.truncated += sum(n > text_cfg.max_length for n in lengths)
            hidden, mask = embed_texts(tokenizer, model, text_cfg, batch)
            summary.calls += 1
            for i, text in enumerate(batch):
                writer.add(keys[text], {
                    "last_hidden_state": hidden[i].to(TEXT_STORE_DTYPE),
                    "attention_mask": mask[i],
                })
                summary.encoded += 1
            bar.update(len(batch))
        writer.flush()
    finally:
        bar.close()
    if summary.truncated:
        logger.warning("%d captions were longer than %d tokens and were truncated", summary.truncated,
                       text_cfg.max_length)
    return summary
