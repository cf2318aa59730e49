"""What each change to the demo buys: VAE fidelity, prompt following, and time, one change at a time.

    .venv/bin/python benchmarks/demo_quality.py [--data-dir data/demo-quality] [--only NAME ...] [--vae-only]

The demo site is crawled, converted, captioned and encoded once into ``--data-dir`` (with ``--base`` settings);
each variant then runs the rest of the demo (``emoji-sd demo --from vae`` with its ``--set`` overrides) in its
own copy, through the real pipeline: the VAE and the caches are reused where a variant leaves them alone.
A table row per variant: the VAE's held-out PSNR and the share of held-out images whose colours
survive it, the train stage's seconds, the held-out ε-MSE, prompt following (pixel attributes, offline
captioner) at the evaluated guidance and at guidance 0, their gap in points, prompt following of the real
held-out images after the VAE's round trip (the most the UNet can reach), the skin colour alone at the two
guidances, and the pipeline's seconds from vae to sample. Variants are cumulative where their name says ``+``.
``--vae-only`` runs the VAE variants through the vae stage alone (held-out PSNR, colours kept, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL = ["eval.guidance_scale=4", "eval.seeds_per_item=3", "eval.items=48"]
VAE_8X_900 = ["vae.steps=900"]
VAE_4X_900 = ["vae.steps=900", "vae.block_out_channels=[16, 32, 64]"]
UNET_16 = ["train.model.unet.h_dim=32", "train.model.unet.groups=8"]
TTE = ["train.model.unet.text_time_embedding=true"]
NO_TTE = ["train.model.unet.text_time_embedding=false"]
HIGH_NOISE = ["train.timestep_sampling=logit_normal", "train.timestep_logit_mean=0.5"]
OFFSET = ["train.noise_offset=0.1"]
V_PRED = ["train.schedule.prediction_type=v_prediction"]
ZERO_SNR = [*V_PRED, "train.schedule.rescale_betas_zero_snr=true"]
NO_OFFSET = ["train.noise_offset=0"]
# the VAE alone (`--vae-only`): what each change does to its held-out fidelity and time, on 10 % held out
HOLD = ["vae.holdout=0.1"]
VAE_VARIANTS: dict[str, list[str]] = {
    "8x, 450 steps (the old demo)": [*HOLD, "vae.steps=450"],
    "8x, 450 steps, 16 latent channels": [*HOLD, "vae.steps=450", "vae.latent_channels=16"],
    "8x, 900 steps": [*HOLD, *VAE_8X_900],
    "8x, 900 steps, 16 latent channels": [*HOLD, *VAE_8X_900, "vae.latent_channels=16"],
    "8x, 1800 steps": [*HOLD, "vae.steps=1800"],
    "8x, 900 steps, KL weight 1e-5": [*HOLD, *VAE_8X_900, "vae.kl_weight=1e-5"],
    "8x, 900 steps, KL weight 1e-6": [*HOLD, *VAE_8X_900, "vae.kl_weight=1e-6"],
    "4x, 450 steps": [*HOLD, "vae.steps=450", "vae.block_out_channels=[16, 32, 64]"],
    "4x, 900 steps": [*HOLD, *VAE_4X_900],
}
VARIANTS: dict[str, list[str]] = {
    "the old demo (8x VAE, 450 steps)": [*EVAL, "vae.steps=450", *NO_TTE, *NO_OFFSET],
    "8x VAE, 900 steps": [*EVAL, *VAE_8X_900, *NO_TTE, *NO_OFFSET],
    "8x VAE, 900 steps + pooled text": [*EVAL, *VAE_8X_900, *TTE, *NO_OFFSET],
    "4x VAE, 900 steps, UNet h_dim 32": [*EVAL, *VAE_4X_900, *UNET_16, *NO_TTE, *NO_OFFSET],
    "4x VAE, 900 steps, UNet h_dim 32 + pooled text": [*EVAL, *VAE_4X_900, *UNET_16, *TTE, *NO_OFFSET],
    # from 8x VAE at 900 steps with pooled text, one change each
    "pooled text + min-SNR γ 5": [*EVAL, *VAE_8X_900, *TTE, *NO_OFFSET, "train.min_snr_gamma=5"],
    "pooled text + caption dropout 0.1": [*EVAL, *VAE_8X_900, *TTE, *NO_OFFSET, "train.caption_dropout=0.1"],
    "pooled text + timesteps logit-normal (0.5, 1)": [*EVAL, *VAE_8X_900, *TTE, *NO_OFFSET, *HIGH_NOISE],
    "pooled text + noise offset 0.1 (the demo preset)": [*EVAL, *VAE_8X_900, *TTE, *OFFSET],
    "pooled text + noise offset 0.2": [*EVAL, *VAE_8X_900, *TTE, "train.noise_offset=0.2"],
    # from the demo preset, one change each
    "preset + timesteps logit-normal (0.5, 1)": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, *HIGH_NOISE],
    "preset + caption dropout 0.1": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, "train.caption_dropout=0.1"],
    "preset + 16 latent channels": [*EVAL, *VAE_8X_900, "vae.latent_channels=16", *TTE, *OFFSET],
    "pooled text + noise offset 0.05": [*EVAL, *VAE_8X_900, *TTE, "train.noise_offset=0.05"],
    "preset + 1200 steps": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, "train.steps=1200"],
    "preset + lr 5e-4": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, "train.lr=5e-4"],
    "preset + v-prediction": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, *V_PRED],
    "preset + v-prediction, zero terminal SNR": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, *ZERO_SNR],
    "preset + v-prediction, zero terminal SNR, no offset": [*EVAL, *VAE_8X_900, *TTE, *NO_OFFSET, *ZERO_SNR],
    "preset + VAE 1800 steps": [*EVAL, "vae.steps=1800", *TTE, *OFFSET],
    "preset + EMA decay 0.99": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, "train.ema_decay=0.99"],
    "preset without EMA (decay 0)": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, "train.ema_decay=0"],
    "preset + UNet h_dim 96": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, "train.model.unet.h_dim=96"],
    # the same model scored from other noise: how far a figure moves with the eval's own sampling
    "preset, eval seeds 100-102": [*EVAL, *VAE_8X_900, *TTE, *OFFSET, "eval.seed=100"],
}


HEADER = ("| variant | VAE held-out PSNR | colours kept | vae | train | held-out ε-MSE | prompt following at w "
          "| at w = 0 | gap (points) | real images through the VAE | skin colour at w vs w = 0 | {last} |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def prepare(data: Path, base: list[str]) -> None:
    if (data / "cache").exists():
        return
    r = cli("demo", "--data-dir", str(data), "--until", "encode", "--no-progress", *(a for s in base for a in ("--set", s)))
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])


def copy_base(base: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("images", "raw", "state", "captions", "cache", "models/vae"):
        if (base / name).exists():  # hard links: every file here is replaced, never rewritten in place
            shutil.copytree(base / name, dest / name, copy_function=os.link)
    for name in ("metadata.csv", "duplicates.csv"):
        if (base / name).exists():
            shutil.copy2(base / name, dest / name)


def run_variant(base: Path, name: str, sets: list[str], base_sets: list[str], vae_only: bool = False) -> dict:
    dest = base.parent / f"{base.name}-variants" / "".join(c if c.isalnum() else "-" for c in name)[:60]
    copy_base(base, dest)
    if vae_only:
        shutil.rmtree(dest / "models" / "vae", ignore_errors=True)
    args = ["demo", "--data-dir", str(dest), "--from", "vae", "--no-progress"]
    if vae_only:
        args += ["--until", "vae"]
    for s in [*base_sets, *sets]:
        args += ["--set", s]
    start = time.perf_counter()
    r = cli(*args)
    seconds = time.perf_counter() - start
    if r.returncode:
        return {"name": name, "error": (r.stderr or r.stdout)[-800:]}
    return read_results(dest, name, seconds, vae_only)


def read_results(dest: Path, name: str, seconds: float, vae_only: bool = False) -> dict:
    """A table row's figures from a variant's data directory (its VAE, train and eval records)."""
    from sd_core.store.catalog import Catalog
    from sd_core.store.records import load_stage

    cat = Catalog(dest)
    vae = json.loads((cat.vae_dir / "metrics.json").read_text())
    if vae_only:
        return {"name": name, "psnr": vae["heldout_psnr_db"], "colours": vae.get("heldout_colours_kept"),
                "vae_s": load_stage(cat, "vae").seconds}
    records = {s: load_stage(cat, s).__dict__ for s in ("vae", "train", "eval")}
    ev = json.loads(cat.eval_json(cat.latest_run()).read_text())
    scores, colour = ev["scores"], ev["per_attribute"]["skin color"]
    return {
        "name": name, "psnr": vae["heldout_psnr_db"], "colours": vae.get("heldout_colours_kept"),
        "vae_s": records["vae"]["seconds"], "train_s": records["train"]["seconds"],
        "loss": scores["held_out_loss"], "pf": scores["prompt_following"], "pf0": scores["prompt_following_g0"],
        "real": scores["prompt_following_real"], "chance": scores["chance"], "seconds": seconds,
        "vae": scores.get("prompt_following_vae"),
        "colour": colour["guided"], "colour0": colour["g0"],
    }


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['name']} | failed: {r['error'].splitlines()[-1] if r['error'] else ''} |"
    colours = "" if r["colours"] is None else f"{100 * r['colours']:.0f}%"
    ceiling = "" if r.get("vae") is None else f"{100 * r['vae']:.0f}%"
    if "loss" not in r:
        return f"| {r['name']} | {r['psnr']:.2f} dB | {colours} | {r['vae_s']:.0f} s |"
    return (f"| {r['name']} | {r['psnr']:.1f} dB | {colours} | {r['vae_s']:.0f} s | {r['train_s']:.0f} s | "
            f"{r['loss']:.4f} | {100 * r['pf']:.0f}% | {100 * r['pf0']:.0f}% | {100 * (r['pf'] - r['pf0']):+.0f} | "
            f"{ceiling} | "
            f"{100 * r['colour']:.0f}% vs {100 * r['colour0']:.0f}% | {r['seconds']:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "demo-quality")
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    ap.add_argument("--base", nargs="*", default=[], help="--set overrides every variant starts from")
    ap.add_argument("--vae-only", action="store_true", help="the VAE variants, through the vae stage only")
    args = ap.parse_args()
    base = args.data_dir.resolve()
    prepare(base, args.base)
    if args.vae_only:
        print("| VAE | held-out PSNR | colours kept | vae stage |\n| --- | --- | --- | --- |")
        for name, sets in VAE_VARIANTS.items():
            if not args.only or name in args.only:
                print(row(run_variant(base, name, sets, args.base, vae_only=True)), flush=True)
        return
    print(HEADER.format(last="vae → sample"))
    for name, sets in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        print(row(run_variant(base, name, sets, args.base)), flush=True)


if __name__ == "__main__":
    main()
