"""The per-attribute table of an evaluation (agreement, chance and κ for each condition), as rows of text for
the report and drawn under the eval grid."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sd_core.eval.bootstrap import CONDITIONS

CONDITION_LABELS = {"guided": "w = {w:g}", "g0": "w = 0", "real": "real images", "vae": "through the VAE"}


def condition_labels(result: dict[str, Any]) -> dict[str, str]:
    return {c: label.format(w=result.get("guidance_scale", 0)) for c, label in CONDITION_LABELS.items()}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _kappa(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def with_interval(value: float | None, interval: list[float] | None, fmt: str = "{:.3f}") -> str:
    """``0.412 [0.301, 0.520]``: a value and its interval (the value alone when it has none)."""
    if value is None:
        return "–"
    return fmt.format(value) + (f" [{fmt.format(interval[0])}, {fmt.format(interval[1])}]" if interval else "")


def attribute_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): a row per attribute read, with its top asked value's share and whether it counts in the
    headline, then ``agreement / chance / κ`` per condition; a last row with the headline κ and its interval."""
    labels = condition_labels(result)
    conditions = [c for c in CONDITIONS if any(c in per for per in result.get("agreement", {}).values())]
    varying = result.get("varying", {})
    counted, top = set(varying.get("attributes", [])), varying.get("top_share", {})
    header = ["attribute", "top value's share", "counts", *(f"{labels[c]}: agree / chance / κ" for c in conditions)]
    rows = []
    for a in result.get("attributes", []):
        per = result.get("agreement", {}).get(a, {})
        cells = [f"{_pct(s['agreement'])} / {_pct(s['chance'])} / {_kappa(s['kappa'])}" if (s := per.get(c)) else "–"
                 for c in conditions]
        rows.append([a, _pct(top.get(a)), "yes" if a in counted else "no", *cells])
    scores, iv = result.get("scores", {}), result.get("intervals", {})
    heads = [with_interval(scores.get(f"prompt_kappa{CONDITIONS[c]}"), iv.get(f"prompt_kappa{CONDITIONS[c]}"),
                           "{:+.2f}") for c in conditions]
    rows.append(["mean κ (headline)", "", f"{len(counted)} counted", *heads])
    return header, rows


def table_image(header: list[str], rows: list[list[str]], width: int, *, title: str = "") -> Image.Image:
    """The table drawn in black on white, ``width`` pixels wide, columns as wide as their longest cell."""
    try:
        font: Any = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    plain = {ord("κ"): "kappa", ord("–"): "-"}  # the default bitmap font has neither glyph
    lines = [[c.translate(plain) for c in r] for r in (header, *rows)]
    title = title.translate(plain)
    widths = [max(probe.textlength(r[i], font=font) for r in lines) + 14 for i in range(len(header))]
    line_h, top = 16, 20 if title else 4
    img = Image.new("RGB", (max(width, int(sum(widths)) + 6), top + line_h * len(lines) + 6), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((3, 3), title, fill="black", font=font)
    for r, cells in enumerate(lines):
        x = 3.0
        for i, cell in enumerate(cells):
            draw.text((x, top + r * line_h), cell, fill="black" if r else "#444", font=font)
            x += widths[i]
    return img


def stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out
