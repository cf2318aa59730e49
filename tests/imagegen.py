"""Small, distinct test images in every format the crawler meets."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def emoji(color: tuple[int, int, int], *, size: int = 64, shape: str = "circle", mark: int = 0) -> Image.Image:
    """A transparent RGBA 'emoji': a coloured disc or square with a mark that makes it unique."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    box = (8, 8, size - 8, size - 8)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=(*color, 255))
    d.rectangle((20 + mark, 24, 24 + mark, 30), fill=(0, 0, 0, 255))
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img = img.convert("RGB")
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated(fmt: str, colors: list[tuple[int, int, int]], size: int = 64) -> bytes:
    frames = [emoji(c, size=size, mark=i * 6) for i, c in enumerate(colors)]
    buf = io.BytesIO()
    extra = {"disposal": 2} if fmt == "GIF" else {}
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return buf.getvalue()
