"""Shared by the benchmarks: demo images, running a measurement in its own process (own peak RSS), and the
shape of Stable Diffusion 1.4's UNet."""

from __future__ import annotations

import io
import multiprocessing as mp
import resource
import sys
from pathlib import Path
from typing import Any, Callable

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model builders

# CompVis/stable-diffusion-v1-4 unet/config.json, as UNet2DConditionModel(**SD14_UNET) builds it (860M parameters)
SD14_UNET: dict[str, Any] = dict(
    sample_size=64, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def demo_images(n: int) -> tuple[list[Image.Image], list[str]]:
    """``n`` demo-site emoji flattened on white, with their titles."""
    from sd_core.demo.emoji_art import build_demo_items
    from sd_core.ingest.convert import ConvertConfig, to_rgb_jpeg

    items = build_demo_items(n)
    cfg = ConvertConfig()
    images = [Image.open(io.BytesIO(to_rgb_jpeg(it.body, cfg).jpeg)).convert("RGB") for it in items]
    return images, [it.title for it in items]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    queue.put(fn(*args))


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh process, so each measurement's peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result
