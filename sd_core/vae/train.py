"""An offline default VAE: a small diffusers ``AutoencoderKL`` trained on the dataset's own images.

It has Stable Diffusion's layout (8x spatial downsampling, 4 latent channels), so a 64x64 image
becomes a 4x8x8 latent like with ``stabilityai/sd-vae-ft-mse``, and it is saved with
``save_pretrained`` so :func:`sd_core.encode.load_vae` loads it like any other VAE. Its
``scaling_factor`` is 1/std of its latents over the training images, measured after training (as
Stable Diffusion's 0.18215 was). The folder also holds ``reconstructions.png`` (originals above,
reconstructions below: held-out images first), ``loss.png`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sd_core.common.images import image_to_tensor, tensor_to_pil
from sd_core.common.optim import adamw
from sd_core.vae.config import VAETrainConfig

RECONSTRUCTIONS_PNG = "reconstructions.png"
LOSS_PNG = "loss.png"
# Not "train_metrics.json": a file named train[-._]* anywhere in a data directory makes `datasets`' imagefolder
# take it for a "train" split and skip metadata.csv (datasets.data_files.DEFAULT_PATTERNS_SPLIT_IN_FILENAME).
METRICS_JSON = "metrics.json"
_DECAY_SHARE = 0.2


def build_vae(cfg: VAETrainConfig) -> Any:
    """A fresh AutoencoderKL of the configured shape (weights from the current torch seed)."""
    from diffusers import AutoencoderKL

    if bad := [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]:
        raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {cfg.norm_num_groups}")
    if cfg.resolution % cfg.downsample():
        raise ValueError(f"resolution {cfg.resolution} is not a multiple of the downsampling {cfg.downsample()}")
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.resolution,
    )


def _load_uint8(paths: Sequence[Path | str | tuple[Path | str, str]], resolution: int) -> torch.Tensor:
    """(N, 3, r, r) uint8, preprocessed exactly as the encode stage does (a ``(path, fit)`` pair is made square
    by ``fit``, as metadata.csv's fit column says)."""
    out = torch.empty((len(paths), 3, resolution, resolution), dtype=torch.uint8)
    for i, p in enumerate(paths):
        path, fit = p if isinstance(p, tuple) else (p, None)
        out[i] = ((image_to_tensor(path, resolution, fit) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _rec_loss(kind: str, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(rec, x)
    if kind == "mse":
        return F.mse_loss(rec, x)
    return F.l1_loss(rec, x) + F.mse_loss(rec, x)


def colours_kept(originals: torch.Tensor, reconstructions: torch.Tensor) -> float | None:
    """Share of images whose skin and background colour names, as the offline captioner reads them, survive
    the round trip (a colour shift the PSNR hides, e.g. green coming back blue, counts here)."""
    from sd_core.caption.offline import read_pixels

    pairs = list(zip(tensor_to_pil(originals), tensor_to_pil(reconstructions)))
    if not pairs:
        return None
    kept = 0
    for a, b in pairs:
        fa, fb = read_pixels(a), read_pixels(b)
        kept += int(fa.skin_color == fb.skin_color and fa.background_color == fb.background_color)
    return kept / len(pairs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB between batches in [-1, 1], after rounding both to 8 bits."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((qa - qb) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


@torch.inference_mode()
def _reconstruct(vae: Any, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    outs = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        outs.append(vae.decode(vae.encode(xb).latent_dist.mode()).sample)
    return torch.cat(outs) if outs else x.new_empty((0, *x.shape[1:]))


@torch.inference_mode()
def _latent_std(vae: Any, x: torch.Tensor, generator: torch.Generator, batch: int = 64) -> float:
    zs = [vae.encode(x[s : s + batch]).latent_dist.sample(generator) for s in range(0, len(x), batch)]
    return float(torch.cat(zs).float().std())


def _lr_at(step: int, cfg: VAETrainConfig) -> float:
    """Linear warm-up, constant, then a linear decay to 10% over the last ``_DECAY_SHARE`` of the steps.

    Short runs are far from convergence; holding the rate up (rather than a cosine) trained faster.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - _DECAY_SHARE))
    if step < decay_start:
        return cfg.lr
    return cfg.lr * (1 - 0.9 * (step - decay_start) / max(1, cfg.steps - decay_start))


def _save_grid(originals: torch.Tensor, recs: torch.Tensor, path: Path) -> None:
    tops, bottoms = tensor_to_pil(originals), tensor_to_pil(recs)
    w, h = tops[0].size
    grid = Image.new("RGB", (w * len(tops), h * 2), (255, 255, 255))
    for i, (top, bottom) in enumerate(zip(tops, bottoms)):
        grid.paste(top, (i * w, 0))
        grid.paste(bottom, (i * w, h))
    scale = max(1, 128 // h)
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def _save_loss_plot(losses: Sequence[float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(losses) // 20)
    if len(losses) >= window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("VAE training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _split(n: int, cfg: VAETrainConfig, generator: torch.Generator) -> tuple[list[int], list[int]]:
    held = 0 if n < 10 or cfg.holdout == 0 else min(n - 1, max(1, round(n * cfg.holdout)))
    order = torch.randperm(n, generator=generator).tolist()
    return sorted(order[held:]), sorted(order[:held])


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp`` to ``out_dir``, replacing an older one."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _sweep_partial(out_dir: Path) -> None:
    for p in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def train_vae(
    cfg: VAETrainConfig,
    image_paths: Sequence[Path | str | tuple[Path | str, str]],
    out_dir: Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on ``image_paths`` (or ``(path, fit)`` pairs; random horizontal flips) and save the VAE folder at
    ``out_dir``.

    Deterministic for ``cfg.seed`` on one machine. The folder appears complete or not at all
    (written beside it, then renamed). Returns the metrics also written to ``metrics.json``.
    """
    if not image_paths:
        raise ValueError("train_vae needs at least one image")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partial(out_dir)
    started = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(cfg.seed)

    data = _load_uint8(image_paths, cfg.resolution)
    train_idx, held_idx = _split(len(data), cfg, generator)
    train, held = data[train_idx], data[held_idx]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg)
    vae.to(dev).train()
    opt = adamw(vae.parameters(), lr=cfg.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    pixels_per_image = 3 * cfg.resolution**2

    losses: list[float] = []
    recs: list[float] = []
    kls: list[float] = []
    order: list[int] = []
    loop_started = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training VAE", unit="step", disable=not progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        x = _to_float(train[idx])
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x).to(dev)
        noise = torch.randn((len(idx), cfg.latent_channels, *(s // cfg.downsample() for s in x.shape[2:])),
                            generator=generator).to(dev)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)

        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.mean + dist.std * noise).sample
        rec_loss = _rec_loss(cfg.loss, rec, x)
        kl = dist.kl().mean() / pixels_per_image
        loss = rec_loss + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        recs.append(rec_loss.item())
        kls.append(kl.item())
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - loop_started

    vae.eval()
    std = _latent_std(vae, _to_float(train).to(dev), generator)
    scaling = 1.0 / std if std > 0 else 1.0
    vae.register_to_config(scaling_factor=scaling)

    train_eval = _to_float(train[: min(len(train), 64)]).to(dev)
    held_eval = _to_float(held).to(dev)
    train_rec = _reconstruct(vae, train_eval)
    held_rec = _reconstruct(vae, held_eval)
    window = max(1, min(20, len(losses) // 5))
    metrics: dict[str, Any] = {
        "images": len(data),
        "train_images": len(train),
        "heldout_images": len(held),
        "steps": cfg.steps,
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "rec_loss_last": float(np.mean(recs[-window:])),
        "kl_last": float(np.mean(kls[-window:])),
        "train_psnr_db": psnr(train_eval, train_rec),
        "heldout_psnr_db": psnr(held_eval, held_rec) if len(held) else None,
        "heldout_colours_kept": colours_kept(held_eval.cpu(), held_rec.cpu()),
        "latent_std": std,
        "scaling_factor": scaling,
        "latent_shape": [cfg.latent_channels, cfg.resolution // cfg.downsample(), cfg.resolution // cfg.downsample()],
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_seconds": train_seconds,
        "device": str(dev),
        "config": cfg.model_dump(mode="json"),
    }

    n_grid = min(cfg.grid_images, len(data))
    grid_src = torch.cat([held_eval, train_eval])[:n_grid]
    grid_rec = torch.cat([held_rec, train_rec])[:n_grid]

    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        vae.to("cpu").save_pretrained(tmp, safe_serialization=True)
        _save_grid(grid_src.cpu(), grid_rec.cpu(), tmp / RECONSTRUCTIONS_PNG)
        _save_loss_plot(losses, tmp / LOSS_PNG)
        metrics["seconds"] = time.perf_counter() - started
        (tmp / METRICS_JSON).write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics
