"""Counting an image's frames from its container structure, without decoding any pixel.

Convert keeps the first frame only, so it decodes only that one. What decoding every frame used to
catch (an animation cut off after its first frame) is found here instead by walking the file's
blocks (GIF) or chunks (PNG/APNG, WebP): a file that ends inside a block or chunk is truncated.
The walk reads a few bytes per block, so a file of hundreds of frames is scanned in milliseconds,
and it stops as soon as the frame count passes the limit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class FrameScan:
    frames: int  # frames found (stops counting past the limit)
    truncated: str | None = None  # where the file ends too early, or None


def scan_frames(data: bytes, limit: int) -> FrameScan | None:
    """Frames of a GIF, PNG/APNG or WebP file; None for other formats (left to the decoder)."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(data, limit)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(data, limit)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data, limit)
    return None


def _gif(data: bytes, limit: int) -> FrameScan:
    n = len(data)
    if n < 13:
        return FrameScan(0, "in the header")
    flags = data[10]
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    frames = 0

    def skip_sub_blocks(p: int) -> int | None:
        while p < n:
            size = data[p]
            p += 1 + size
            if size == 0:
                return p
        return None

    while pos < n and frames <= limit:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            end = skip_sub_blocks(pos + 2)
            if end is None or end > n:
                return FrameScan(frames, f"inside an extension after frame {frames}")
            pos = end
        elif block == 0x2C:  # image descriptor, optional local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                return FrameScan(frames, f"in frame {frames + 1}")
            local = data[pos + 9]
            pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0) + 1
            end = skip_sub_blocks(pos)
            if end is None or end > n:
                return FrameScan(frames, f"in frame {frames + 1}")
            frames += 1
            pos = end
        else:  # not a GIF block: decoders stop here too
            break
    return FrameScan(frames)


def _png(data: bytes, limit: int) -> FrameScan:
    n, pos = len(data), 8
    frames = 0
    images = 0
    while pos < n and frames <= limit:
        if pos + 8 > n:
            return FrameScan(max(frames, images), "in a chunk header")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > n:
            return FrameScan(max(frames, images), f"inside its {kind.decode('latin-1')} chunk")
        if kind == b"fcTL":
            frames += 1
        elif kind == b"IDAT":
            images = 1
        elif kind == b"IEND":
            break
        pos = end
    return FrameScan(max(frames, images))


def _webp(data: bytes, limit: int) -> FrameScan:
    n = len(data)
    declared = struct.unpack("<I", data[4:8])[0] + 8
    if declared > n:
        return FrameScan(0, f"after {n} of {declared} bytes")
    pos, frames, still = 12, 0, 0
    while pos + 8 <= declared and frames <= limit:
        kind, length = struct.unpack("<4sI", data[pos : pos + 8])
        end = pos + 8 + length + (length & 1)
        if pos + 8 + length > declared:
            return FrameScan(frames, f"inside its {kind.decode('latin-1')} chunk")
        if kind == b"ANMF":
            frames += 1
        elif kind in (b"VP8 ", b"VP8L"):
            still = 1
        pos = end
    return FrameScan(max(frames, still))
