"""Deterministic demo emoji items rendered from the Noto Color Emoji font.

Every item comes from one deterministic *stream* of art specs per seed: position
``p`` picks a glyph from a seeded, tiered shuffle of the font's emoji and, once all
glyphs are used, a variant round (rotation, background colour, mirror) so that
every position renders distinct pixels. :func:`build_demo_items` uses positions
``0..n_unique-1``; :func:`build_growth_items` continues at position ``after``, so
growth items never repeat a demo item's bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "FONT_PATH",
    "IMAGE_SIZE",
    "SiteItem",
    "available_glyph_count",
    "build_demo_items",
    "build_growth_items",
    "draw_image",
]

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109
IMAGE_SIZE = 128
_CANVAS = 176
_MARGIN = 0.06

# How the demo site misbehaves when an item's image is requested (see ``DemoSite``):
# 404; 500-once (500, then the image); 500 (always); truncated (half the bytes);
# slow (the image after ``DemoSite.slow_s``); drip (one byte every ``DemoSite.drip_s``);
# redirect (302 to ``SiteItem.location``); gzip-bomb (a gzip body that inflates to ``DemoSite.bomb_bytes``);
# huge (``DemoSite.huge_bytes`` of body); short-body (a Content-Length larger than the body sent);
# html-200 (200 with an HTML error page, the same for every item); empty-200 (200 with an empty body);
# 429 (always 429 Too Many Requests with ``Retry-After: DemoSite.retry_after``); 429-once (that, then the image).
Fault = Literal[
    "none", "404", "500-once", "500", "truncated", "slow", "drip", "redirect", "gzip-bomb", "huge", "short-body",
    "html-200", "empty-200", "429", "429-once",
]

CONTENT_TYPES: dict[str, str] = {
    "webp": "image/webp",
    "gif": "image/gif",
    "png": "image/png",
    "jpg": "image/jpeg",
}


@dataclass(frozen=True)
class SiteItem:
    """One emoji as listed and served by the demo site.

    ``path`` is the site-relative URL path (may include a query string) that the
    listing puts in ``img@src`` and the server matches byte-for-byte. ``src``, when set, is put in
    ``img@src`` instead (e.g. an absolute URL on another server); ``location`` is where a
    ``redirect`` fault sends the request. ``draw``, when set, makes the item lazy: ``body`` is empty and
    ``draw()`` returns the image (see :meth:`image_bytes`).
    """

    path: str
    title: str
    body: bytes
    content_type: str
    fault: Fault = "none"
    src: str | None = None
    location: str | None = None
    draw: Callable[[], bytes] | None = field(default=None, compare=False, repr=False)

    def image_bytes(self) -> bytes:
        """The image: ``body``, or what ``draw`` draws for a lazy item."""
        return self.body if self.draw is None else self.draw()

    def drawn(self) -> "SiteItem":
        """This item with its image in ``body`` (itself when it is not lazy)."""
        return self if self.draw is None else replace(self, body=self.draw(), draw=None)


# Tier 1: faces, people, animals, food (used first); tier 2: everything else.
_TIER1_RANGES: tuple[tuple[int, int], ...] = (
    (0x1F600, 0x1F64F),
    (0x1F910, 0x1F92F),
    (0x1F970, 0x1F97A),
    (0x1F9D0, 0x1F9DF),
    (0x1F466, 0x1F487),
    (0x1F400, 0x1F43E),
    (0x1F980, 0x1F9AE),
    (0x1F345, 0x1F37F),
)
_TIER2_RANGES: tuple[tuple[int, int], ...] = (
    (0x1F90C, 0x1F90F),
    (0x1F930, 0x1F96F),
    (0x1F97B, 0x1F97F),
    (0x1F9AF, 0x1F9CF),
    (0x1F9E0, 0x1F9FF),
    (0x1FA70, 0x1FAFF),
    (0x1F300, 0x1F344),
    (0x1F380, 0x1F3FA),
    (0x1F440, 0x1F465),
    (0x1F488, 0x1F4FF),
    (0x1F500, 0x1F53D),
    (0x1F680, 0x1F6FF),
    (0x2600, 0x27BF),
)

_PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("blue", (86, 156, 255)),
    ("pink", (255, 160, 205)),
    ("mint", (150, 230, 190)),
    ("yellow", (255, 225, 110)),
    ("lavender", (190, 170, 255)),
    ("peach", (255, 190, 150)),
    ("teal", (40, 170, 170)),
    ("gray", (190, 190, 195)),
    ("navy", (30, 40, 90)),
)
_ANGLES: tuple[int, ...] = (-12, 12, -20, 20, -6, 6, -28, 28)
_BG_SHARE = 0.10
_SNAKE_SHARE = 0.5
_NEXT_IMAGE_SHARE = 0.2
_GROWTH_GIF_SHARE = 0.10
_GROWTH_AWEBP_SHARE = 0.05
_MAX_VARIANT_ROUNDS = 1 + 2 * len(_ANGLES) * (len(_PALETTE) + 1)


@dataclass(frozen=True)
class _Glyph:
    char: str
    name: str


@dataclass(frozen=True)
class _Art:
    """A rendered, not yet encoded, stream position."""

    image: Image.Image  # IMAGE_SIZE square RGBA glyph on transparency
    bg: tuple[int, int, int] | None
    title: str


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(["emoji-sd-demo", *map(str, parts)]))


@functools.cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(FONT_PATH, FONT_SIZE)


def _render_raw(char: str) -> Image.Image | None:
    """The glyph on a transparent canvas, cropped to its visible pixels (None if blank)."""
    canvas = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((20, 20), char, font=_font(), embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    return canvas.crop(bbox) if bbox else None


def _square(img: Image.Image) -> Image.Image:
    """Pad to a centred square with a small margin and resize to IMAGE_SIZE."""
    side = math.ceil(max(img.size) * (1 + 2 * _MARGIN))
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


@functools.cache
def _glyph_table() -> tuple[tuple[_Glyph, ...], tuple[_Glyph, ...]]:
    """Named glyphs the font renders in colour, per tier, without pixel duplicates."""
    seen: set[bytes] = set()
    tiers: list[tuple[_Glyph, ...]] = []
    done: set[int] = set()
    for ranges in (_TIER1_RANGES, _TIER2_RANGES):
        tier: list[_Glyph] = []
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                if cp in done:
                    continue
                done.add(cp)
                char = chr(cp)
                name = unicodedata.name(char, None)
                if name is None:
                    continue
                raw = _render_raw(char)
                if raw is None:
                    continue
                digest = hashlib.sha1(raw.tobytes() + repr(raw.size).encode()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                tier.append(_Glyph(char, name))
        tiers.append(tuple(tier))
    return tiers[0], tiers[1]


def available_glyph_count() -> int:
    """Distinct glyphs available before variants are needed."""
    t1, t2 = _glyph_table()
    return len(t1) + len(t2)


@functools.cache
def _glyph_order(seed: int) -> tuple[_Glyph, ...]:
    t1, t2 = _glyph_table()
    a, b = list(t1), list(t2)
    _rng(seed, "order", 1).shuffle(a)
    _rng(seed, "order", 2).shuffle(b)
    return tuple(a + b)


@functools.lru_cache(maxsize=256)
def _render_glyph(char: str) -> Image.Image:
    raw = _render_raw(char)
    assert raw is not None
    return _square(raw)


def _title(glyph: _Glyph, seed: int, extra: Sequence[str] = ()) -> str:
    words = [w.lower() for w in glyph.name.replace("-", " ").split()] + list(extra)
    if _rng(seed, "style", glyph.char).random() < _SNAKE_SHARE:
        return "_".join(words)
    return " ".join(w.capitalize() for w in words)


@dataclass(frozen=True)
class _Spec:
    """What stream position ``pos`` shows, worked out without drawing it."""

    glyph: _Glyph
    bg: tuple[int, int, int] | None
    title: str
    angle: int | None = None  # rounds >= 1: rotated by this many degrees
    mirror: bool = False


def _spec(seed: int, pos: int) -> _Spec:
    """The glyph, background, rotation and title of stream position ``pos`` (distinct for every position)."""
    order = _glyph_order(seed)
    glyph = order[pos % len(order)]
    rnd = pos // len(order)
    if rnd >= _MAX_VARIANT_ROUNDS:
        raise ValueError(f"stream position {pos} exceeds the available variants")
    if rnd == 0:
        rng = _rng(seed, "bg", pos)
        bg = rng.choice(_PALETTE)[1] if rng.random() < _BG_SHARE else None
        return _Spec(glyph, bg, _title(glyph, seed))
    # Rounds >= 1 are always rotated (never equal to round 0); (angle, bg, mirror)
    # is injective in the round number for a given glyph.
    k = rnd - 1
    off = _rng(seed, "variant", glyph.char)
    angle = _ANGLES[(k + off.randrange(len(_ANGLES))) % len(_ANGLES)]
    bg_choice = ((k // len(_ANGLES)) + off.randrange(len(_PALETTE) + 1)) % (len(_PALETTE) + 1)
    mirror = (k // (len(_ANGLES) * (len(_PALETTE) + 1))) % 2 == 1
    extra = ["tilted", "left" if angle > 0 else "right"]
    bg: tuple[int, int, int] | None = None
    if bg_choice:
        name, bg = _PALETTE[bg_choice - 1]
        extra += ["on", name]
    if mirror:
        extra.append("mirrored")
    return _Spec(glyph, bg, _title(glyph, seed, extra), angle, mirror)


def _art(seed: int, pos: int) -> _Art:
    """Render stream position ``pos``: distinct pixels for every position of a seed."""
    spec = _spec(seed, pos)
    img = _render_glyph(spec.glyph.char)
    if spec.angle is not None:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if spec.mirror else img
        img = img.rotate(spec.angle, resample=Image.Resampling.BICUBIC)
    return _Art(img, spec.bg, spec.title)


def _on_bg(img: Image.Image, bg: tuple[int, int, int] | None) -> Image.Image:
    if bg is None:
        return img
    out = Image.new("RGBA", img.size, (*bg, 255))
    out.alpha_composite(img)
    return out


def _bounce(img: Image.Image) -> list[Image.Image]:
    frames = []
    for dy in (0, -5, -9, -5):
        f = Image.new("RGBA", img.size, (0, 0, 0, 0))
        f.paste(img, (0, dy))
        frames.append(f)
    return frames


def _tilt(img: Image.Image, angles: Sequence[int]) -> list[Image.Image]:
    return [img.rotate(a, resample=Image.Resampling.BICUBIC) for a in angles]


def _gif_frame(img: Image.Image, transparent: bool) -> Image.Image:
    """RGBA -> palette image; alpha below 128 becomes transparency index 255."""
    pal_img = img.convert("RGB").quantize(
        colors=255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    palette = pal_img.getpalette() or []
    pal_img.putpalette(palette + [0] * (768 - len(palette)))
    if transparent:
        pal_img.paste(255, mask=img.getchannel("A").point(lambda a: 255 if a < 128 else 0))
        pal_img.info["transparency"] = 255
    return pal_img


def _encode(art: _Art, fmt: str, seed: int, pos: int) -> tuple[bytes, str]:
    """Encode to ``fmt``; returns (bytes, file extension)."""
    buf = io.BytesIO()
    img, bg = art.image, art.bg
    if fmt == "webp_lossless":
        _on_bg(img, bg).save(buf, "WEBP", lossless=True, method=2, quality=25)
        ext = "webp"
    elif fmt == "webp_lossy":
        _on_bg(img, bg).save(buf, "WEBP", quality=90, alpha_quality=100, method=4)
        ext = "webp"
    elif fmt == "webp_anim":
        frames = [_on_bg(f, bg) for f in _tilt(img, (0, 6, 12, 6, 0, -6, -12, -6))]
        frames[0].save(
            buf, "WEBP", save_all=True, append_images=frames[1:],
            duration=90, loop=0, quality=90, method=4,
        )
        ext = "webp"
    elif fmt in ("gif", "gif_anim"):
        if fmt == "gif":
            frames = [img]
        elif _rng(seed, "anim", pos).random() < 0.5:
            frames = _bounce(img)
        else:
            frames = _tilt(img, (0, 10, 0, -10))
        pframes = [_gif_frame(_on_bg(f, bg), bg is None) for f in frames]
        extra = {"save_all": True, "append_images": pframes[1:], "duration": 140, "loop": 0}
        pframes[0].save(buf, "GIF", disposal=2, **(extra if len(pframes) > 1 else {}))
        ext = "gif"
    elif fmt == "png":
        _on_bg(img, bg).save(buf, "PNG", compress_level=6)
        ext = "png"
    elif fmt == "jpeg":
        _on_bg(img, bg or (255, 255, 255)).convert("RGB").save(buf, "JPEG", quality=90)
        ext = "jpg"
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue(), ext


def _draw_formats(
    m: int, rng: random.Random, gif_share: float, animated_webp_share: float
) -> list[str]:
    """Exact format counts for ``m`` unique items, in a seeded random order."""
    n_gif = round(m * gif_share)
    n_gif_anim = (n_gif + 1) // 2
    n_awebp = round(m * animated_webp_share)
    n_png = max(2, round(m * 0.015)) if m >= 20 else 0
    n_jpeg = max(1, round(m * 0.01)) if m >= 50 else 0
    fixed = (
        ["gif_anim"] * n_gif_anim
        + ["gif"] * (n_gif - n_gif_anim)
        + ["webp_anim"] * n_awebp
        + ["png"] * n_png
        + ["jpeg"] * n_jpeg
    )
    if len(fixed) > m:
        raise ValueError("format shares add up to more than the number of items")
    rest = m - len(fixed)
    webp = ["webp_lossless"] * (rest // 2) + ["webp_lossy"] * (rest - rest // 2)
    formats = fixed + webp
    rng.shuffle(formats)
    return formats


def _item_path(seed: int, idx: int, ext: str) -> str:
    if _rng(seed, "path", idx).random() < _NEXT_IMAGE_SHARE:
        return f"/_next/image?url=%2Femoji%2F{idx:07d}.{ext}&w=128&q=75"
    return f"/emoji/{idx:07d}.{ext}"


@dataclass(frozen=True)
class _Planned:
    """One unique item of a stream: its position, format, title and file extension (not drawn yet)."""

    pos: int
    fmt: str
    title: str
    ext: str


_EXT = {"webp_lossless": "webp", "webp_lossy": "webp", "webp_anim": "webp", "gif": "gif", "gif_anim": "gif",
        "png": "png", "jpeg": "jpg"}


def _draw_stream(
    seed: int, start: int, count: int, gif_share: float, animated_webp_share: float, tag: str
) -> list[_Planned]:
    formats = _draw_formats(count, _rng(seed, "formats", tag, start, count), gif_share, animated_webp_share)
    return [_Planned(start + i, fmt, _spec(seed, start + i).title, _EXT[fmt]) for i, fmt in enumerate(formats)]


@functools.lru_cache(maxsize=1024)
def draw_image(seed: int, pos: int, fmt: str) -> bytes:
    """The encoded image of stream position ``pos`` in ``fmt`` (what a lazy item's ``draw`` returns).
    Deterministic: the same bytes as the item built eagerly. The newest 1,024 stay cached."""
    return _encode(_art(seed, pos), fmt, seed, pos)[0]


def _item(seed: int, idx: int, planned: _Planned, title: str, lazy: bool) -> SiteItem:
    path = _item_path(seed, idx, planned.ext)
    if lazy:
        draw = functools.partial(draw_image, seed, planned.pos, planned.fmt)
        return SiteItem(path, title, b"", CONTENT_TYPES[planned.ext], draw=draw)
    return SiteItem(path, title, draw_image(seed, planned.pos, planned.fmt), CONTENT_TYPES[planned.ext])


def _check_share(name: str, value: float, hi: float = 1.0) -> None:
    if not 0.0 <= value <= hi:
        raise ValueError(f"{name} must be within [0, {hi}], got {value}")


def _reupload_title(title: str, copy: int) -> str:
    return f"{title}_{copy}" if "_" in title or title.islower() else f"{title} {copy}"


def build_demo_items(
    n: int = 240,
    *,
    seed: int = 0,
    reuploads: float = 0.05,
    gif_share: float = 0.10,
    animated_webp_share: float = 0.05,
    lazy: bool = False,
) -> list[SiteItem]:
    """``n`` listed demo items, newest first, deterministic for ``seed``.

    ``round(n * reuploads)`` of them are byte-identical re-uploads of an older item
    under a new path and a title with a copy number (``"Grinning Face 2"``);
    ``reuploads`` may be at most 0.5. Image ids are 1..n in upload order, so the first item has id ``n``.

    ``lazy``: the images are not drawn now; each item's ``draw`` draws it when first asked for (the demo
    site does so when the image is requested). Paths, titles and bytes are the same as built eagerly;
    50,000 items are listed in seconds instead of minutes.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    _check_share("reuploads", reuploads, 0.5)
    _check_share("gif_share", gif_share)
    _check_share("animated_webp_share", animated_webp_share)
    n_re = min(round(n * reuploads), max(n - 1, 0))
    n_unique = n - n_re
    uniques = _draw_stream(seed, 0, n_unique, gif_share, animated_webp_share, "demo")

    # Upload order (oldest first); each re-upload goes somewhere after its original. Entries are unique
    # indices (an original) or n_unique + i (the i-th copy), so finding an original is a search among ints.
    rng = _rng(seed, "reuploads", n)
    sequence: list[int] = list(range(n_unique))
    copy_of: list[tuple[int, int]] = []  # (original, copy number) of each re-upload
    copies: dict[int, int] = {}
    originals = rng.sample(range(n_unique), n_re) if n_re <= n_unique else []
    for orig in originals:
        at = sequence.index(orig)
        copies[orig] = copies.get(orig, 1) + 1
        sequence.insert(rng.randint(at + 1, len(sequence)), n_unique + len(copy_of))
        copy_of.append((orig, copies[orig]))

    items: list[SiteItem] = []
    for idx, entry in enumerate(sequence, start=1):
        orig, copy = (entry, 0) if entry < n_unique else copy_of[entry - n_unique]
        planned = uniques[orig]
        title = _reupload_title(planned.title, copy) if copy else planned.title
        items.append(_item(seed, idx, planned, title, lazy))
    items.reverse()
    return items


def build_growth_items(k: int, *, seed: int = 0, after: int = 240, lazy: bool = False) -> list[SiteItem]:
    """``k`` new items, newest first, for a site that had ``build_demo_items(after, seed=seed)``.

    They continue the same art stream past position ``after`` and take ids
    ``after+1 .. after+k``, so bytes and paths never collide with those items.
    """
    if k < 0 or after < 0:
        raise ValueError("k and after must be >= 0")
    planned = _draw_stream(seed, after, k, _GROWTH_GIF_SHARE, _GROWTH_AWEBP_SHARE, "growth")
    items = [_item(seed, after + 1 + i, p, p.title, lazy) for i, p in enumerate(planned)]
    items.reverse()
    return items
