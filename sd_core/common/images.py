"""Image helpers shared by the stages: flattening transparency, tensors to and from pixels, PNG
files written atomically, and labelled grids."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # torch is imported where a tensor is made, so image-only users (convert's worker) start fast
    import torch

from sd_core.store.files import atomic_write_bytes


def flatten_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB image with any transparency (alpha band or palette transparency) composited on ``background``."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


FITS = ("pad", "crop", "stretch")  # how a non-square image becomes the square a model takes (convert.fit)


def border_colour(rgb: Image.Image) -> tuple[int, int, int]:
    """The colour around an RGB image: the per-channel median of its outermost row and column of pixels (the
    background an emoji sits on; robust to the few border pixels the drawing itself touches)."""
    import numpy as np

    a = np.asarray(rgb.convert("RGB"))
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))  # type: ignore[return-value]


def fit_square(image: Image.Image, fit: str | None) -> Image.Image:
    """``image`` (RGB, transparency on white) made square as ``fit`` says: ``pad`` centres it on a square of
    its border colour (:func:`border_colour`), ``crop`` keeps its centre square, ``stretch`` (or ``""``/None,
    and any square image) leaves it as it is, for the resize to stretch it."""
    rgb = flatten_rgb(image)
    w, h = rgb.size
    if w == h or fit not in ("pad", "crop"):
        return rgb
    if fit == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return rgb.crop((left, top, left + side, top + side))
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), border_colour(rgb))
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return canvas


def open_fitted(path: Path | str, fit: str | None = None) -> Image.Image:
    """The image file at ``path`` as RGB, made square by ``fit`` (:func:`fit_square`), fully read."""
    with Image.open(path) as img:
        img.load()
        return fit_square(img, fit)


def image_to_tensor(image: Image.Image | Path | str, resolution: int, fit: str | None = None) -> torch.Tensor:
    """RGB (transparency on white), made square by ``fit`` (see :func:`fit_square`; None: stretched),
    bicubic resize to resolution², float (3, r, r) in [-1, 1]."""
    import numpy as np
    import torch

    if not isinstance(image, Image.Image):
        image = open_fitted(image, fit)
    rgb = fit_square(image, fit).resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] → RGB images."""
    import torch

    if x.ndim == 3:
        x = x[None]
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def save_png(img: Image.Image, path: Path) -> Path:
    """Write ``img`` as a PNG atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines (the last one marked … if cut)."""
    if width <= 0 or max_lines <= 0:
        return []
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = max(1, int(len(word) * width / draw.textlength(word, font=font)))
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def make_grid(
    images: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cell_size: int | None = None,
    label_width: int = 220,
    header_height: int = 18,
) -> Image.Image:
    """A labelled grid: ``label_width + cols·cell`` wide, ``header_height + rows·cell`` high.

    Cell (r, c) holds ``images[r][c]`` resized (nearest) to ``cell × cell``; row labels are word-wrapped
    in the left margin, column labels sit above the columns.
    """
    rows, cols = len(images), len(images[0]) if images else 0
    if len(row_labels) != rows or len(col_labels) != cols or any(len(r) != cols for r in images):
        raise ValueError(f"need {rows} row labels, {cols} column labels and {cols} images per row")
    w, h = (cell_size, cell_size) if cell_size else images[0][0].size
    grid = Image.new("RGB", (label_width + cols * w, header_height + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(12)
    line_h = 14
    for c, label in enumerate(col_labels):
        draw.text((label_width + c * w + 2, 2), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y0 = header_height + r * h
        for i, line in enumerate(_wrap(draw, label, font, label_width - 6, max(1, h // line_h))):
            draw.text((3, y0 + 2 + i * line_h), line, fill="black", font=font)
        for c in range(cols):
            img = images[r][c].convert("RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.NEAREST)
            grid.paste(img, (label_width + c * w, y0))
    return grid
