"""The offline captioner: deterministic template captions from the title and the pixels, no weights.

Colours and head shape come from the image; eyes, mouth, expression and action come from words in the
title, with plain neutral words when the title says nothing about them.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from sd_core.caption.template import display_title, title_words
from sd_core.common.images import flatten_rgb

OFFLINE_VERSION = "offline-v2"

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
    rgb = flatten_rgb(image)
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
