"""Small, distinct test images in every format the crawler meets."""

from __future__ import annotations

import io
import struct

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


def gif_frame_bomb(canvas: int = 4000, frames: int = 300) -> bytes:
    """A GIF whose canvas is ``canvas``² pixels with ``frames`` frames of 1×1 pixel each: tiny on disk
    (about 23 bytes a frame), but a decoder that composes every frame on the canvas works on
    canvas² pixels per frame."""
    out = bytearray(b"GIF89a")
    out += struct.pack("<HHBBB", canvas, canvas, 0b10000001, 0, 0)  # global colour table of 4 colours
    out += bytes([255, 255, 255, 220, 30, 30, 30, 60, 220, 0, 0, 0])
    out += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop for ever
    for i in range(frames):
        out += b"!\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 0.1 s a frame
        out += b"," + struct.pack("<HHHHB", i % canvas, 0, 1, 1, 0)  # a 1×1 frame at (i, 0)
        out += bytes([2, 2, 0x4C, 0x01, 0])  # LZW: clear, colour 1, end
    out += b";"
    return bytes(out)


def slow_qoi(width: int, height: int) -> bytes:
    """A valid QOI image (black) that Pillow decodes in pure Python, one step per pixel: a few MB that
    take seconds to decode, i.e. an image that stalls a converter without any time limit."""
    head = b"qoif" + struct.pack(">IIBB", width, height, 3, 0)
    return head + bytes(width * height) + b"\x00" * 7 + b"\x01"
