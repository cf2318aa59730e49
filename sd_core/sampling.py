"""Text → emoji: encode prompts, sample latents with classifier-free guidance, decode, write grids.

One loop serves both model kinds. A scratch export (``model.safetensors`` + ``config.json``) names
the text encoder and VAE it was trained against; a diffusers Stable Diffusion folder brings its own.
Either can be overridden with objects (tests pass tiny ones):

* a text encoder: ``encoder(prompts) -> (hidden (B, T, D), mask (B, T))``
* a decoder: ``decoder(latents (B, 4, h, w), scaled) -> list of RGB images``

Outputs of :func:`sample_to_folder`: ``images/p{prompt:02d}_seed{seed}.png``, ``grid.png`` (a row
per prompt, a column per seed), ``guidance_sweep.png`` (a row per prompt, a column per guidance
scale) and ``samples.json`` (prompts, seeds, settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field
from torch import nn

from sd_core.strict import StrictModel
from sd_core.fsio import atomic_write_json
from sd_core.schedule import NoiseSchedule, ScheduleConfig, sample
from sd_core.train import DEFAULT_PROMPTS

__all__ = [
    "SampleConfig",
    "TextEncoder",
    "Decoder",
    "HFTextEncoder",
    "VaeDecoder",
    "TextToImage",
    "load_text_to_image",
    "generate",
    "make_grid",
    "sample_to_folder",
    "SampleResult",
    "validation_sampler",
]

class SampleConfig(StrictModel):
    """What to draw and how (CFG ``ε_u + s·(ε_c − ε_u)``; seed 000 compared s = 0, 5, 10, 20, 50, 100)."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    guidance_scale: float = Field(7.5, ge=0)
    steps: int = Field(50, ge=1)
    scheduler: Literal["ddpm", "ddim"] = "ddim"
    eta: float = Field(0.0, ge=0, description="DDIM stochasticity")
    seed: int = 0
    images_per_prompt: int = Field(4, ge=1, description="columns of the grid: seeds seed, seed+1, ...")
    guidance_sweep: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0, 7.5, 10.0)
    batch_size: int = Field(16, ge=1)
    cell_size: int | None = Field(None, ge=8, description="grid cell side in pixels (default: the image size)")
    label_width: int = Field(220, ge=0)

    def seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.images_per_prompt)]


class TextEncoder(Protocol):
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class Decoder(Protocol):
    def __call__(self, latents: torch.Tensor) -> list[Image.Image]: ...


class HFTextEncoder:
    """A tokenizer + transformers text model, run as the encode stage runs it (see ``encode.embed_texts``)."""

    def __init__(self, tokenizer: Any, model: Any, text_cfg: Any) -> None:
        self.tokenizer, self.model, self.text_cfg = tokenizer, model, text_cfg

    @classmethod
    def load(cls, text_cfg: Any) -> "HFTextEncoder":
        from sd_core.encode import load_text_encoder

        tokenizer, model = load_text_encoder(text_cfg)
        return cls(tokenizer, model, text_cfg)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from sd_core.encode import embed_texts

        return embed_texts(self.tokenizer, self.model, self.text_cfg, list(prompts))  # (B, T, D), (B, T)


class VaeDecoder:
    """``AutoencoderKL.decode(latents / scaling_factor + shift)`` → RGB images."""

    def __init__(self, vae: Any, scaling_factor: float | None = None) -> None:
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
        self.shift = float(vae.config.get("shift_factor") or 0.0)

    @classmethod
    def load(cls, vae_cfg: Any, scaling_factor: float | None = None) -> "VaeDecoder":
        from sd_core.encode import load_vae

        return cls(load_vae(vae_cfg), scaling_factor)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        from sd_core.encode import tensor_to_pil

        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.scaling_factor + self.shift
        return tensor_to_pil(self.vae.decode(z).sample)  # (B, 3, H, W) in [-1, 1] → images


@dataclass
class TextToImage:
    """Everything sampling needs: a denoiser, its noise schedule, latent shape and the two encoders."""

    denoiser: nn.Module
    schedule: NoiseSchedule
    latent_shape: tuple[int, int, int]  # (4, h, w)
    text_encoder: TextEncoder
    decoder: Decoder
    info: dict[str, Any] = field(default_factory=dict)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_scratch(folder: Path, text_encoder: TextEncoder | None, decoder: Decoder | None) -> TextToImage:
    from safetensors.torch import load_file

    from sd_core.encode import TextEncoderConfig, VAEConfig
    from sd_core.unet import EmojiUNet, UNetConfig

    cfg = json.loads((folder / "config.json").read_text("utf-8"))
    model = EmojiUNet(UNetConfig.from_dict(cfg["unet"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    if text_encoder is None:
        if not cfg.get("text_encoder"):
            raise ValueError(f"{folder}/config.json names no text encoder; pass one")
        text_encoder = HFTextEncoder.load(TextEncoderConfig.model_validate(cfg["text_encoder"]))
    if decoder is None:
        if not cfg.get("vae"):
            raise ValueError(f"{folder}/config.json names no VAE; pass a decoder")
        decoder = VaeDecoder.load(VAEConfig.model_validate(cfg["vae"]), cfg["scaling_factor"])
    return TextToImage(
        denoiser=model.eval(),
        schedule=NoiseSchedule(ScheduleConfig.from_dict(cfg["schedule"])),
        latent_shape=tuple(cfg["latent_shape"]),  # type: ignore[arg-type]
        text_encoder=text_encoder,
        decoder=decoder,
        info=cfg,
    )


def _load_diffusers(folder: Path, text_encoder: TextEncoder | None, decoder: Decoder | None) -> TextToImage:
    from diffusers import DDPMScheduler

    from sd_core.encode import TextEncoderConfig, VAEConfig
    from sd_core.models import DiffusersDenoiser, load_pretrained_unet

    unet = load_pretrained_unet(str(folder))
    sched = DDPMScheduler.load_config(str(folder), subfolder="scheduler")
    schedule_cfg = ScheduleConfig(
        num_train_timesteps=sched.get("num_train_timesteps", 1000),
        beta_start=sched.get("beta_start", 0.00085),
        beta_end=sched.get("beta_end", 0.012),
        beta_schedule=sched.get("beta_schedule", "scaled_linear"),
    )
    if text_encoder is None:
        from transformers import CLIPTokenizer

        max_len = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer").model_max_length
        text_encoder = HFTextEncoder.load(TextEncoderConfig(
            model_id=str(folder), subfolder="text_encoder", tokenizer_subfolder="tokenizer", kind="clip",
            max_length=max_len,
        ))
    if decoder is None:
        decoder = VaeDecoder.load(VAEConfig(model_id=str(folder), subfolder="vae"))
    size = unet.config.sample_size
    return TextToImage(
        denoiser=DiffusersDenoiser(unet).eval(),
        schedule=NoiseSchedule(schedule_cfg),
        latent_shape=(unet.config.in_channels, size, size),
        text_encoder=text_encoder,
        decoder=decoder,
        info={"kind": "diffusers", "folder": str(folder)},
    )


def load_text_to_image(
    folder: Path, *, text_encoder: TextEncoder | None = None, decoder: Decoder | None = None
) -> TextToImage:
    """Load a scratch export or a diffusers SD folder (encoders from the folder unless given)."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        t2i = _load_diffusers(folder, text_encoder, decoder)
    elif (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        t2i = _load_scratch(folder, text_encoder, decoder)
    else:
        raise FileNotFoundError(f"{folder} is neither a scratch export (config.json + model.safetensors) nor a diffusers folder")
    t2i.denoiser.to(_device())
    return t2i


@torch.no_grad()
def generate(
    denoiser: nn.Module,
    text_encoder: TextEncoder,
    decoder: Decoder,
    schedule: NoiseSchedule,
    latent_shape: Sequence[int],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float = 7.5,
    steps: int = 50,
    scheduler: Literal["ddpm", "ddim"] = "ddim",
    eta: float = 0.0,
    batch_size: int = 16,
) -> list[list[Image.Image]]:
    """Images ``[prompt][seed]``: image (p, s) starts from noise seeded by ``s`` alone.

    Prompts are encoded once, with ``""`` as the unconditional context.
    """
    device = next(denoiser.parameters()).device
    unique = list(dict.fromkeys(prompts))
    hidden, mask = text_encoder([*unique, ""])  # (P+1, T, D), (P+1, T)
    hidden, mask = hidden.float().to(device), mask.to(device)
    row = {p: i for i, p in enumerate(unique)}
    jobs = [(pi, si) for pi in range(len(prompts)) for si in range(len(seeds))]
    out: list[list[Image.Image | None]] = [[None] * len(seeds) for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        idx = torch.tensor([row[prompts[pi]] for pi, _ in chunk], device=device)
        x_T = torch.stack([
            torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(seeds[si])))
            for _, si in chunk
        ]).to(device)  # (b, 4, h, w)
        gen = torch.Generator(device=device).manual_seed(int(seeds[chunk[0][1]]) + 7919 * start)
        latents = sample(
            denoiser, (len(chunk), *latent_shape), hidden[idx], hidden[-1:],
            schedule=schedule, steps=steps, guidance_scale=guidance_scale, kind=scheduler,
            generator=gen, context_mask=mask[idx], uncond_mask=mask[-1:], eta=eta, x_T=x_T,
        )  # (b, 4, h, w)
        for (pi, si), img in zip(chunk, decoder(latents)):
            out[pi][si] = img
    return out  # type: ignore[return-value]


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


def _save_png(img: Image.Image, path: Path) -> None:
    from io import BytesIO

    from sd_core.fsio import atomic_write_bytes

    buf = BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class SampleResult:
    images: list[list[Image.Image]]  # [prompt][seed]
    image_paths: list[list[Path]]
    grid: Path
    guidance_sweep: Path | None


def sample_to_folder(
    model: TextToImage | Path,
    cfg: SampleConfig,
    out_dir: Path,
    *,
    text_encoder: TextEncoder | None = None,
    decoder: Decoder | None = None,
) -> SampleResult:
    """Draw ``cfg.images_per_prompt`` images per prompt, save them, the grid and the guidance sweep."""
    t2i = model if isinstance(model, TextToImage) else load_text_to_image(model, text_encoder=text_encoder, decoder=decoder)
    out_dir = Path(out_dir)
    seeds = cfg.seeds()
    common = dict(steps=cfg.steps, scheduler=cfg.scheduler, eta=cfg.eta, batch_size=cfg.batch_size)
    args = (t2i.denoiser, t2i.text_encoder, t2i.decoder, t2i.schedule, t2i.latent_shape)
    images = generate(*args, cfg.prompts, seeds, guidance_scale=cfg.guidance_scale, **common)

    paths = [[out_dir / "images" / f"p{pi:02d}_seed{s}.png" for s in seeds] for pi in range(len(cfg.prompts))]
    for row_imgs, row_paths in zip(images, paths):
        for img, path in zip(row_imgs, row_paths):
            _save_png(img, path)
    grid_path = out_dir / "grid.png"
    _save_png(make_grid(images, cfg.prompts, [f"seed {s}" for s in seeds],
                        cell_size=cfg.cell_size, label_width=cfg.label_width), grid_path)

    sweep_path = None
    if cfg.guidance_sweep:
        columns = [generate(*args, cfg.prompts, [cfg.seed], guidance_scale=s, **common) for s in cfg.guidance_sweep]
        sweep = [[columns[c][r][0] for c in range(len(columns))] for r in range(len(cfg.prompts))]
        sweep_path = out_dir / "guidance_sweep.png"
        _save_png(make_grid(sweep, cfg.prompts, [f"w = {s:g}" for s in cfg.guidance_sweep],
                            cell_size=cfg.cell_size, label_width=cfg.label_width), sweep_path)
    atomic_write_json(out_dir / "samples.json", {
        "config": cfg.model_dump(mode="json"),
        "model": {k: v for k, v in t2i.info.items() if k in ("kind", "folder", "step", "format")},
        "images": {str(p): [str(x.relative_to(out_dir)) for x in row] for p, row in zip(cfg.prompts, paths)},
    })
    return SampleResult(images, paths, grid_path, sweep_path)


def validation_sampler(
    text_encoder: TextEncoder,
    decoder: Decoder,
    schedule: ScheduleConfig,
    latent_shape: Sequence[int],
    *,
    guidance_scale: float = 7.5,
    steps: int = 25,
    scheduler: Literal["ddpm", "ddim"] = "ddim",
    cell_size: int | None = None,
) -> Callable[[nn.Module, Sequence[str], Sequence[int], Path], None]:
    """A trainer callback drawing the fixed validation prompts × seeds into one labelled grid."""
    noise = NoiseSchedule(schedule)

    def draw(denoiser: nn.Module, prompts: Sequence[str], seeds: Sequence[int], out_path: Path) -> None:
        images = generate(denoiser, text_encoder, decoder, noise, latent_shape, prompts, seeds,
                          guidance_scale=guidance_scale, steps=steps, scheduler=scheduler)
        _save_png(make_grid(images, prompts, [f"seed {s}" for s in seeds], cell_size=cell_size), Path(out_path))

    return draw
