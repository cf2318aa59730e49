"""Text → images through ``StableDiffusionPipeline``, for any model emoji-sd trains or loads.

Guidance follows the seed's rule ``ε = ε_u + s · (ε_c − ε_u)``: ``s = 0`` draws without the text (the
pipeline runs the empty prompt alone), ``s = 1`` the conditional pass alone, ``s > 1`` both passes in one
batched call (the pipeline's classifier-free guidance). Image ``(prompt, seed)`` starts from noise drawn
by a CPU generator seeded with ``seed`` alone, so it does not depend on the batch it was drawn in, and
equals ``pipe(prompt, generator=torch.Generator().manual_seed(seed))``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from sd_core.diffusion.config import check_guidance  # noqa: F401  (re-exported)
from sd_core.diffusion.schedulers import sampler


def use_sampler(pipe: Any, name: str | None) -> Any:
    """Swap the pipeline's scheduler for sampler ``name``, built from the pipeline's own scheduler config."""
    if name is not None:
        pipe.scheduler = sampler(name, pipe.scheduler.config)
    return pipe


def image_size(pipe: Any, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """``(width, height)`` in pixels: the given ones, each a multiple of the VAE's factor (refused naming
    ``sample.width`` / ``--width`` otherwise), or the model's own size."""
    factor = int(pipe.vae_scale_factor)
    native = int(pipe.unet.config.sample_size) * factor
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value < factor or value % factor):
            raise ValueError(f"sample.{name} (--{name}) = {value} is not a positive multiple of the VAE's factor "
                             f"{factor} (the model's own size is {native})")
    return width or native, height or native


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float = 7.5,
    steps: int = 50,
    sampler_name: str | None = None,
    batch_size: int = 16,
    seed_stride: int = 0,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
) -> list[list[Image.Image]]:
    """Images ``[prompt][seed]`` drawn with ``pipe`` (its scheduler swapped for ``sampler_name`` if given).

    Image ``[i][j]`` starts from seed ``seeds[j] + i * seed_stride``: with the default 0 every prompt shares
    the same noises (a grid's columns), with ``len(seeds)`` every image has its own. ``negative_prompt``
    replaces the empty prompt of classifier-free guidance (``guidance_scale > 1`` only); ``width`` and
    ``height`` default to the model's own size (see :func:`image_size`)."""
    check_guidance(guidance_scale)
    width, height = image_size(pipe, width, height)
    use_sampler(pipe, sampler_name)
    pipe.set_progress_bar_config(disable=True)
    jobs = [(pi, si) for pi in range(len(prompts)) for si in range(len(seeds))]
    out: list[list[Image.Image | None]] = [[None] * len(seeds) for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        texts = [prompts[pi] if guidance_scale > 0 else "" for pi, _ in chunk]
        generators = [torch.Generator().manual_seed(int(seeds[si]) + pi * seed_stride) for pi, si in chunk]
        negative = [negative_prompt] * len(chunk) if negative_prompt and guidance_scale > 1 else None
        images = pipe(prompt=texts, negative_prompt=negative, num_inference_steps=steps, width=width, height=height,
                      guidance_scale=max(guidance_scale, 1.0), generator=generators, output_type="pil").images
        for (pi, si), img in zip(chunk, images):
            out[pi][si] = img
    return out  # type: ignore[return-value]


def draw_grid(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, guidance_scale: float, steps: int,
              sampler_name: str | None = None, batch_size: int = 16, cell_size: int | None = None,
              label_width: int = 220, **kw: Any) -> tuple[list[list[Image.Image]], Image.Image]:
    """The images ``[prompt][seed]`` and a labelled grid of them (a row per prompt, a column per seed); ``kw``
    goes to :func:`generate` (``negative_prompt``, ``width``, ``height``)."""
    from sd_core.common.images import make_grid

    images = generate(pipe, prompts, seeds, guidance_scale=guidance_scale, steps=steps, sampler_name=sampler_name,
                      batch_size=batch_size, **kw)
    grid = make_grid(images, list(prompts), [f"seed {s}" for s in seeds], cell_size=cell_size,
                     label_width=label_width)
    return images, grid
