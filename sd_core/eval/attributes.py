"""The attributes a caption states, read back from the caption template, and how well two captions agree.

A caption has the shape ``'{title} emoji with a {head shape}, {eyes} eyes, {mouth} mouth, {expression}
expression, {skin} skin color, {action}, with a {background} background.'`` Prompt following asks a
captioner to describe an image drawn from a caption and counts the attributes that come back.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

PIXEL_ATTRIBUTES = ("skin color", "head shape", "background")  # what the offline captioner reads from pixels
ALL_ATTRIBUTES = (*PIXEL_ATTRIBUTES, "eyes", "mouth", "expression")  # a VLM (Qwen2.5-VL) reads these too

_TEMPLATE = re.compile(
    r"emoji with an? (?P<head>.+?), (?P<eyes>.+?) eyes?, (?P<mouth>.+?) mouth, (?P<expression>.+?) expression, "
    r"(?P<skin>.+?) skin colou?r, .*?with an? (?P<background>.+?) background", re.I)
_STOP = frozenset({"a", "an", "the", "and", "with", "of", "head", "shaped", "color", "colour", "very", "slightly"})


def parse_attributes(caption: str) -> dict[str, str]:
    """Attribute → its words, for a caption in the template's shape ({} when it is not)."""
    m = _TEMPLATE.search(" ".join(caption.split()))
    if m is None:
        return {}
    return {"head shape": m["head"], "eyes": m["eyes"], "mouth": m["mouth"], "expression": m["expression"],
            "skin color": m["skin"], "background": m["background"]}


def _words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP)


def agree(asked: str, seen: str) -> bool:
    """Two descriptions of one attribute agree when they share a content word ('round head' and 'round',
    'green' and 'light green'); the offline captioner's single words make this an exact comparison."""
    return bool(_words(asked) & _words(seen))


def follow_rate(prompts: Sequence[str], readings: Sequence[str], attributes: Iterable[str]) -> dict[str, float]:
    """Share of (item, attribute) pairs where the reading of an image states what its prompt asked: per
    attribute and overall (``"all"``). Prompts whose attributes cannot be parsed are left out."""
    attributes = tuple(attributes)
    hits: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for prompt, reading in zip(prompts, readings):
        want, got = parse_attributes(prompt), parse_attributes(reading)
        for a in attributes:
            if a in want:
                asked[a] += 1
                hits[a] += int(a in got and agree(want[a], got[a]))
    out = {a: hits[a] / asked[a] for a in attributes if asked[a]}
    total = sum(asked.values())
    out["all"] = sum(hits.values()) / total if total else 0.0
    return out


def chance_rate(prompts: Sequence[str], attributes: Iterable[str]) -> float:
    """What a model that ignores its prompt scores: the chance that an attribute drawn from the prompts'
    own distribution matches the asked one, ``Σ p²``, averaged over attributes."""
    rates = []
    for a in attributes:
        values = Counter(" ".join(sorted(_words(p[a]))) for p in map(parse_attributes, prompts) if a in p)
        n = sum(values.values())
        if n:
            rates.append(sum((c / n) ** 2 for c in values.values()))
    return sum(rates) / len(rates) if rates else 0.0


def canonical(value: str) -> str:
    """One attribute value as its content words, sorted (``'light green'``, ``'round'``): the categories that
    agreement and chance are counted over."""
    return " ".join(sorted(_words(value)))


def attribute_values(texts: Sequence[str], attributes: Iterable[str]) -> dict[str, list[str | None]]:
    """Attribute → each text's canonical value, ``None`` where a text does not state it (a prompt left out of
    that attribute, or a reading that missed it: never an agreement)."""
    parsed = [parse_attributes(t) for t in texts]
    return {a: [canonical(p[a]) if a in p else None for p in parsed] for a in attributes}


def varying_attributes(asked: dict[str, list[str | None]], share: float) -> tuple[list[str], dict[str, float]]:
    """The attributes the asked values vary in: those whose most common value covers less than ``share`` of the
    items that state it; and each attribute's top-value share. An attribute nearly every prompt states alike
    (the demo's white background) would let any model agree by drawing it always, with κ near 0."""
    top: dict[str, float] = {}
    for a, values in asked.items():
        stated = [v for v in values if v is not None]
        if stated:
            top[a] = max(Counter(stated).values()) / len(stated)
    return [a for a, t in top.items() if t < share], top
