"""Shared by the benchmarks: demo images, running a measurement in its own process (own peak RSS), and the
shapes of Stable Diffusion 1.4's UNet and of Qwen2.5-VL-3B-Instruct."""

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


def qwen_3b_config(config: Any) -> Any:
    """``config`` (a ``Qwen2_5_VLConfig``: its tokens, processor and chat settings kept) with the layer shapes of
    Qwen/Qwen2.5-VL-3B-Instruct's config.json: 3.75B parameters, the word embeddings tied to the output."""
    layers = 36
    config.tie_word_embeddings = True
    config.text_config.update(dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                   num_hidden_layers=layers, layer_types=["full_attention"] * layers,
                                   num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                                    "mrope_section": [16, 24, 24]}))
    config.vision_config.update(dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                     out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31]))
    return config


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
