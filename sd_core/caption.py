"""Emoji captioning: a Qwen2.5-VL captioner, an offline pixel-based captioner, and caption checks.

Every caption follows one template::

    '{title} emoji with a {head shape}, {eyes} eyes, {mouth} mouth, {expression} expression,
     {skin color} skin color, {action}, with a {background color} background.'

`caption_batch` cleans and validates what a captioner wrote, retries the failures once and
replaces what still fails with the fallback captioner's caption, flagged.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol, Sequence

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from sd_core.strict import StrictModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-VL-3B-Instruct"
OFFLINE_VERSION = "offline-v2"

PROMPT_TEMPLATE_V1 = (
    "This picture is an emoji titled '{title}'. Describe it in one sentence that covers, in this order: "
    "1) the shape of the head, 2) the eyes, 3) the mouth, 4) the facial expression, 5) the skin color, "
    "6) the action it performs, if any, 7) the background color.\n"
    "Write the sentence in exactly this shape:\n"
    "'{title} emoji with a {head shape}, {eye description} eyes, {mouth description} mouth, "
    "{expression description} expression, {skin color} skin color, {action description}, "
    "with a {background color} background.'\n"
    "For example, for an emoji titled 'Pepe the Frog' a good answer is:\n"
    "'Pepe the frog emoji with a round head, big eyes, smiling mouth, happy expression, green skin color, "
    "no action, with a green background.'\n"
    "Write 'no action' when the emoji does nothing in particular. Answer with the sentence only."
)

# Appended to the prompt when a caption is asked for again after failing validation.
RETRY_SUFFIX = (
    "\nYour answer must be a single sentence that starts with '{title} emoji with a' and names the eyes, "
    "the mouth, the expression, the skin color and the background."
)

# Emoji are 128x128 or smaller. qwen-vl-utils and the image processor resize to multiples of 28
# (14-pixel patches merged 2x2, one LLM token per 28x28 cell) and upscale anything under min_pixels.
# 112*112 is a 4x4 grid of tokens (8x8 ViT patches): tiny 32-72 px emoji are upscaled to it, so the
# eyes and mouth still span a patch or more each. 224*224 caps a frame at 64 tokens: a 128 px emoji
# becomes 140x140 (25 tokens), and an oversized upload is shrunk rather than costing hundreds.
DEFAULT_MIN_PIXELS = 112 * 112
DEFAULT_MAX_PIXELS = 224 * 224

QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_LABEL = re.compile(r"^(?:caption|description|answer|output|response|sentence)\s*[:\-\u2013\u2014]\s*", re.I)
_REQUIRED_PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("emoji with a", re.compile(r"\bemoji with an?\b", re.I)),
    ("eyes", re.compile(r"\beyes?\b", re.I)),
    ("mouth", re.compile(r"\bmouth\b", re.I)),
    ("expression", re.compile(r"\bexpression\b", re.I)),
    ("skin color", re.compile(r"\bskin colou?r\b", re.I)),
    ("background", re.compile(r"\bbackground\b", re.I)),
)
MIN_CAPTION_CHARS = 40
MAX_CAPTION_CHARS = 400


class CaptionConfig(StrictModel):
    """Settings that choose the captioner and everything that shapes a caption."""

    captioner: Literal["qwen", "offline"] = "qwen"
    model_id: str = Field(DEFAULT_MODEL_ID, min_length=1, description="Hub id or local folder.")
    revision: str | None = None
    prompt_version: str = "v1"
    prompt_template: str = Field(PROMPT_TEMPLATE_V1, description="`{title}` is replaced by the emoji title.")
    min_pixels: int = Field(DEFAULT_MIN_PIXELS, ge=28 * 28)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=28 * 28)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    device_map: str | None = Field(None, description="None: 'auto' on CUDA, plain CPU otherwise.")

    @model_validator(mode="after")
    def _check(self) -> CaptionConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        if "{title}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{title}'")
        return self

    def cache_key(self) -> dict[str, Any]:
        """The fields that determine a caption, for keying a per-item cache."""
        if self.captioner == "offline":
            return {"captioner": "offline", "version": OFFLINE_VERSION, "prompt_version": self.prompt_version}
        prompt = hashlib.sha256((self.prompt_template + RETRY_SUFFIX).encode()).hexdigest()[:16]
        return {
            "captioner": self.captioner,
            "model_id": self.model_id,
            "revision": self.revision,
            "prompt_version": self.prompt_version,
            "prompt_sha": prompt,
            "max_new_tokens": self.max_new_tokens,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "dtype": self.dtype,
        }

    def cache_digest(self) -> str:
        """A short stable hash of `cache_key()`."""
        return hashlib.sha256(json.dumps(self.cache_key(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CaptionResult:
    """One caption, where it came from, and why it was flagged if it was."""

    text: str
    source: str
    flagged: bool = False
    reason: str | None = None


class Captioner(Protocol):
    """Anything that turns emoji images and titles into raw caption strings."""

    source: str

    def caption(self, images: Sequence[Image.Image], titles: Sequence[str], *, strict: bool = False) -> list[str]:
        ...


def display_title(title: str) -> str:
    """The title as a caption starts with it: `:blob_wave:` becomes `blob wave`."""
    text = title.strip().strip(":").replace("_", " ")
    text = " ".join(text.split())
    return text or "Custom"


def title_words(title: str) -> list[str]:
    """Lower-case alphanumeric words of a title, with camelCase split."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", title)
    return re.findall(r"[a-z0-9]+", spaced.lower())


def render_prompt(template: str, title: str, *, strict: bool = False) -> str:
    """Fill `{title}` in the template, with the retry reminder appended when `strict`."""
    name = display_title(title)
    text = template.replace("{title}", name)
    return text + RETRY_SUFFIX.replace("{title}", name) if strict else text


def clean_caption(text: str) -> str:
    """One tidy line: no surrounding quotes, no leading label, single spaces, a final period."""
    line = " ".join(text.split())
    previous = None
    while line != previous:
        previous = line
        line = line.strip(QUOTES + " ")
        line = _LABEL.sub("", line)
        if line.endswith(".") and line[:-1].rstrip().endswith(tuple(QUOTES)):
            line = line[:-1]
    line = line.rstrip(",;:!? ")
    if line and not line.endswith("."):
        line += "."
    return line


def validate_caption(text: str, title: str) -> str | None:
    """None when `text` has the template's shape for this title, else a short reason."""
    if not text.strip():
        return "empty caption"
    if len(text) < MIN_CAPTION_CHARS:
        return f"too short ({len(text)} chars)"
    if len(text) > MAX_CAPTION_CHARS:
        return f"too long ({len(text)} chars)"
    expected = title_words(display_title(title))
    if expected and title_words(text)[:1] != expected[:1]:
        return f"does not start with the title '{display_title(title)}'"
    missing = [name for name, pattern in _REQUIRED_PARTS if not pattern.search(text)]
    if missing:
        return "missing " + ", ".join(repr(name) for name in missing)
    return None


# --- offline captioner -------------------------------------------------------------------------

_EXPRESSIONS: tuple[tuple[frozenset[str], tuple[str, str, str]], ...] = (
    (frozenset({"laugh", "laughing", "lol", "lmao", "rofl", "haha", "joy", "xd"}),
     ("squinting", "wide open laughing", "laughing")),
    (frozenset({"heart", "hearts", "love", "loving", "heart_eyes", "hearteyes", "uwu", "blush", "blushing"}),
     ("heart-shaped", "smiling", "loving")),
    (frozenset({"wink", "winking"}), ("winking", "smiling", "playful")),
    (frozenset({"cry", "crying", "cries", "tear", "tears", "sob", "sobbing", "weep"}),
     ("teary", "trembling", "crying")),
    (frozenset({"sad", "unhappy", "frown", "frowning", "pensive", "disappointed"}),
     ("droopy", "frowning", "sad")),
    (frozenset({"angry", "angery", "mad", "rage", "furious", "grr", "annoyed"}),
     ("narrowed", "scowling", "angry")),
    (frozenset({"think", "thinking", "thonk", "thonking", "hmm", "ponder", "pondering"}),
     ("thoughtful", "pursed", "thinking")),
    (frozenset({"shock", "shocked", "surprised", "surprise", "wow", "omg", "scream", "scared", "fear"}),
     ("wide open", "open", "surprised")),
    (frozenset({"sleep", "sleepy", "sleeping", "tired", "zzz", "yawn"}),
     ("closed", "relaxed", "sleepy")),
    (frozenset({"cool", "sunglasses", "shades"}), ("shaded", "smirking", "cool")),
    (frozenset({"smile", "smiling", "smiley", "happy", "grin", "grinning", "glad", "yay", "cheer", "joyful"}),
     ("happy", "smiling", "happy")),
)
_NEUTRAL = ("simple", "plain", "neutral")

_ACTIONS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"wave", "waving", "waves", "hi", "hello", "bye"}), "waving"),
    (frozenset({"clap", "clapping", "claps", "applause"}), "clapping"),
    (frozenset({"dance", "dancing", "dances", "party", "vibe", "vibing"}), "dancing"),
    (frozenset({"run", "running", "runs", "zoom"}), "running"),
    (frozenset({"thumbsup", "thumbs", "thumb", "ok", "okay", "approve"}), "giving a thumbs up"),
    (frozenset({"eat", "eating", "nom", "nomnom", "munch"}), "eating"),
    (frozenset({"drink", "drinking", "sip", "sipping", "coffee", "tea"}), "drinking"),
    (frozenset({"hug", "hugging", "hugs"}), "hugging"),
    (frozenset({"salute", "saluting"}), "saluting"),
    (frozenset({"shrug", "shrugging"}), "shrugging"),
    (frozenset({"facepalm"}), "facepalming"),
    (frozenset({"point", "pointing"}), "pointing"),
    (frozenset({"pat", "pet", "headpat", "pats"}), "being patted"),
    (frozenset({"jump", "jumping", "bounce", "bouncing"}), "jumping"),
    (frozenset({"sleep", "sleeping", "zzz"}), "sleeping"),
)


def color_name(rgb: Sequence[float]) -> str:
    """Name an RGB colour (0-255) from a small palette, using hue, saturation and value."""
    r, g, b = (min(max(float(c), 0.0), 255.0) / 255.0 for c in rgb[:3])
    hue, sat, val = colorsys.rgb_to_hsv(r, g, b)
    hue *= 360.0
    if val < 0.2:
        return "black"
    if sat < 0.18 or (sat < 0.3 and val < 0.35):
        if val > 0.85:
            return "white"
        return "gray" if val > 0.3 else "black"
    if hue < 15 or hue >= 345:
        if sat < 0.5 and val > 0.7:
            return "pink"
        return "brown" if val < 0.45 else "red"
    if hue < 40:
        return "brown" if val < 0.6 or (sat < 0.45 and val < 0.8) else "orange"
    if hue < 70:
        return "brown" if val < 0.45 else "yellow"
    if hue < 170:
        return "green"
    if hue < 260:
        return "blue"
    if hue < 290:
        return "purple"
    return "purple" if val < 0.6 else "pink"


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB copy of `image`, with any transparency composited onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


@dataclass(frozen=True)
class PixelFacts:
    """What the offline captioner reads from the pixels."""

    head_shape: str
    skin_color: str
    background_color: str


def _dominant_name(pixels: np.ndarray) -> str:
    names = [color_name(p) for p in pixels]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return max(sorted(counts), key=lambda n: counts[n])


def read_pixels(image: Image.Image, size: int = 64) -> PixelFacts:
    """Background colour from the corners, skin colour and head shape from the foreground."""
    rgb = flatten_on_white(image)
    if max(rgb.size) > size:
        scale = size / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.NEAREST)
    arr = np.asarray(rgb, dtype=np.int16)
    h, w, _ = arr.shape
    k = max(1, min(h, w) // 8)
    corners = np.concatenate(
        [arr[:k, :k].reshape(-1, 3), arr[:k, -k:].reshape(-1, 3), arr[-k:, :k].reshape(-1, 3), arr[-k:, -k:].reshape(-1, 3)]
    )
    background = np.median(corners, axis=0)
    background_name = color_name(background)

    mask = np.abs(arr - background).max(axis=2) > 40
    if not mask.any():
        return PixelFacts("plain head", background_name, background_name)
    skin = _dominant_name(arr[mask])

    rows, cols = np.nonzero(mask)
    box_h = rows.max() - rows.min() + 1
    box_w = cols.max() - cols.min() + 1
    fill = mask.sum() / float(box_h * box_w)
    aspect = box_w / float(box_h)
    if abs(fill - math.pi / 4) <= 0.08:
        shape = "round head" if 0.8 <= aspect <= 1.25 else "oval head"
    elif fill >= 0.9:
        shape = "square head" if 0.8 <= aspect <= 1.25 else "rectangular head"
    else:
        shape = "irregular head"
    return PixelFacts(shape, skin, background_name)


def _mentions(words: Sequence[str], keys: frozenset[str]) -> bool:
    """Whole-word match, or a substring match for keys of four or more letters (`blobwave`)."""
    return any(word in keys or any(len(key) >= 4 and key in word for key in keys) for word in words)


def _face_words(words: Sequence[str]) -> tuple[str, str, str]:
    for keys, triple in _EXPRESSIONS:
        if _mentions(words, keys):
            return triple
    return _NEUTRAL


def _action(words: Sequence[str]) -> str:
    for keys, action in _ACTIONS:
        if _mentions(words, keys):
            return action
    return "no action"


class OfflineCaptioner:
    """Deterministic template captions from the title and the pixels; needs no model weights.

    Colours and head shape come from the image; eyes, mouth, expression and action come from
    words in the title, with plain neutral words when the title says nothing about them.
    """

    source = "offline"

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0

    def caption(self, images: Sequence[Image.Image], titles: Sequence[str], *, strict: bool = False) -> list[str]:
        """One caption per (image, title) pair."""
        if len(images) != len(titles):
            raise ValueError(f"{len(images)} images but {len(titles)} titles")
        self.calls += 1
        self.items += len(images)
        return [self.caption_one(image, title) for image, title in zip(images, titles)]

    def caption_one(self, image: Image.Image, title: str) -> str:
        """The template sentence for one emoji."""
        facts = read_pixels(image)
        words = title_words(title)
        eyes, mouth, expression = _face_words(words)
        return (
            f"{display_title(title)} emoji with {_article(facts.head_shape)} {facts.head_shape}, {eyes} eyes, "
            f"{mouth} mouth, {expression} expression, {facts.skin_color} skin color, {_action(words)}, "
            f"with {_article(facts.background_color)} {facts.background_color} background."
        )


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# --- Qwen2.5-VL captioner ----------------------------------------------------------------------


@lru_cache(maxsize=1)
def torchvision_usable() -> bool:
    """Whether torchvision imports; transformers' video processor and qwen-vl-utils need it."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA wheel next to a CPU torch fails with RuntimeError, not ImportError
        return False
    return True


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`: sides divisible by `factor`, area within the pixel bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def vision_inputs(messages: list[list[dict[str, Any]]]) -> list[Image.Image]:
    """The resized images of a batch of conversations, as `process_vision_info` returns them.

    Uses qwen-vl-utils when it imports (it needs torchvision); otherwise applies the same
    flattening and `smart_resize` rule to the PIL images in the messages.
    """
    if torchvision_usable():
        from qwen_vl_utils import process_vision_info

        images, _ = process_vision_info(messages)
        return list(images or [])
    resized = []
    for conversation in messages:
        for message in conversation:
            for part in message["content"]:
                if isinstance(part, dict) and part.get("type") == "image":
                    image = flatten_on_white(part["image"])
                    height, width = _smart_resize(
                        image.height, image.width, 28, part.get("min_pixels", 4 * 28 * 28),
                        part.get("max_pixels", 16384 * 28 * 28),
                    )
                    resized.append(image.resize((width, height)))
    return resized


def _load_processor(cfg: CaptionConfig) -> Any:
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    # The pixel bounds go with each call (`QwenCaptioner.inputs`), not here: a hub-style
    # preprocessor_config.json's min_pixels/max_pixels override a `size=` given at load, and
    # min_pixels/max_pixels given at load leak into every call through the tokenizer's init
    # kwargs, where transformers 5.23 warns that they are deprecated.
    kwargs: dict[str, Any] = {}
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    if torchvision_usable():
        return AutoProcessor.from_pretrained(cfg.model_id, **kwargs)

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without its video processor, which cannot load without torchvision."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    logger.info("torchvision is unavailable: loading the Qwen2.5-VL processor without video support")
    return ImageOnlyQwen2_5_VLProcessor.from_pretrained(cfg.model_id, **kwargs)


def resolve_dtype(dtype: str) -> Any:
    """The torch dtype for a config value: 'auto' is bfloat16 on CUDA and float32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, dtype)


class QwenCaptioner:
    """Batched greedy captioning with Qwen2.5-VL; counts generate calls and captioned items."""

    def __init__(self, model: Any, processor: Any, cfg: CaptionConfig) -> None:
        self.model = model
        self.processor = processor
        self.cfg = cfg
        self.source = f"qwen:{cfg.model_id}"
        self.calls = 0
        self.items = 0
        processor.tokenizer.padding_side = "left"

    @classmethod
    def from_config(cls, cfg: CaptionConfig) -> QwenCaptioner:
        """Load the model and processor named by `cfg` (hub id or local folder)."""
        import torch
        import transformers
        from packaging.version import Version
        from transformers import Qwen2_5_VLForConditionalGeneration

        # transformers renamed `torch_dtype` to `dtype` in 4.56; 5.x still accepts the old name with a warning.
        dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs: dict[str, Any] = {dtype_arg: resolve_dtype(cfg.dtype)}
        if cfg.revision is not None:
            kwargs["revision"] = cfg.revision
        device_map = cfg.device_map or ("auto" if torch.cuda.is_available() else None)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.model_id, **kwargs).eval()
        return cls(model, _load_processor(cfg), cfg)

    def messages(self, image: Image.Image, title: str, *, strict: bool = False) -> list[dict[str, Any]]:
        """One user turn holding the image and the filled-in prompt."""
        content = [
            {"type": "image", "image": image, "min_pixels": self.cfg.min_pixels, "max_pixels": self.cfg.max_pixels},
            {"type": "text", "text": render_prompt(self.cfg.prompt_template, title, strict=strict)},
        ]
        return [{"role": "user", "content": content}]

    def caption(self, images: Sequence[Image.Image], titles: Sequence[str], *, strict: bool = False) -> list[str]:
        """Raw decoded captions, generated `cfg.batch_size` items at a time."""
        if len(images) != len(titles):
            raise ValueError(f"{len(images)} images but {len(titles)} titles")
        out: list[str] = []
        step = self.cfg.batch_size
        for start in range(0, len(images), step):
            out.extend(self._generate(images[start : start + step], titles[start : start + step], strict))
        return out

    def inputs(self, images: Sequence[Image.Image], titles: Sequence[str], *, strict: bool = False) -> Any:
        """The left-padded model inputs for one batch, on the model's device."""
        conversations = [self.messages(image, title, strict=strict) for image, title in zip(images, titles)]
        texts = self.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        return self.processor(
            text=texts,
            images=vision_inputs(conversations),
            size={"shortest_edge": self.cfg.min_pixels, "longest_edge": self.cfg.max_pixels},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(self.model.device)

    def _generate(self, images: Sequence[Image.Image], titles: Sequence[str], strict: bool) -> list[str]:
        import torch

        inputs = self.inputs(images, titles, strict=strict)
        with torch.inference_mode():
            generated = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        self.calls += 1
        self.items += len(images)
        trimmed = generated[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def build_captioner(cfg: CaptionConfig) -> QwenCaptioner | OfflineCaptioner:
    """The captioner `cfg.captioner` names; loading Qwen weights may raise OSError when they are out of reach."""
    if cfg.captioner == "offline":
        return OfflineCaptioner()
    return QwenCaptioner.from_config(cfg)


# --- batch with validation, retry and fallback ------------------------------------------------


def caption_batch(
    captioner: Captioner,
    fallback: Captioner,
    images: Sequence[Image.Image],
    titles: Sequence[str],
) -> list[CaptionResult]:
    """Caption, clean and validate; retry failures once in one batch, then fall back and flag."""
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if not images:
        return []
    texts = [clean_caption(t) for t in captioner.caption(images, titles)]
    reasons = [validate_caption(t, title) for t, title in zip(texts, titles)]

    failed = [i for i, reason in enumerate(reasons) if reason]
    if failed:
        # Decoding is greedy, so the retry asks with the stricter prompt rather than the same one.
        retried = captioner.caption([images[i] for i in failed], [titles[i] for i in failed], strict=True)
        for i, raw in zip(failed, retried):
            texts[i] = clean_caption(raw)
            reasons[i] = validate_caption(texts[i], titles[i])

    results = [CaptionResult(text, captioner.source) for text in texts]
    still = [i for i in failed if reasons[i]]
    if still:
        for i in still:
            logger.warning("caption for %r rejected (%s); using %s", titles[i], reasons[i], fallback.source)
        replacements = fallback.caption([images[i] for i in still], [titles[i] for i in still])
        for i, raw in zip(still, replacements):
            results[i] = CaptionResult(clean_caption(raw), fallback.source, flagged=True, reason=reasons[i])
    return results
