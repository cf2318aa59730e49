"""Training throughput on the pipeline's own read path, against the simplest correct baselines.

    .venv/bin/python benchmarks/train.py store [--sizes demo seed] [--data resident windowed] [--windows 4]
                                              [--items 512] [--steps 20] [--warmup 3] [--rounds 3] [--log-every 1]
    .venv/bin/python benchmarks/train.py encode [--items 256] [--batch 16] [--steps 10] [--warmup 2]
    .venv/bin/python benchmarks/train.py log [--size seed] [--steps 8] [--warmup 2] [--repeats 2000]

``store``: the trainer exactly as the train stage runs it — cached pairs read from the encode stage's
safetensors shards (``CachedPairs``: keys checked once, tensors loaded into contiguous memory), batches
assembled as the trainer does on this device (a prefetch thread only for windows read from disk or a GPU),
noise and timesteps drawn on the device, EMA, gradient clipping, logging every ``--log-every`` steps (1 by
default: the losses read from the device, a row appended to ``metrics.csv`` and ``progress.json`` replaced
after every step, as the bare loop reads its loss every step) — against a *bare
loop*: the same UNet, the same batch size, the same tensors already on the device, only forward, MSE,
backward and AdamW. The ratio ``trainer / bare`` is the trainer's share of the
hardware's speed. The trainer uses torch's fused AdamW; the bare loop runs twice, with torch's default
AdamW (what a hand-written loop gets) and with the fused one (so the second ratio is the cost of
everything else the trainer does: loader, EMA, clipping, logging). Rounds alternate between the three
runs, each in its own process, and the medians are printed (step times on this VM vary by about ±10 %
from one process to the next). ``--data`` picks how the trainer holds the pairs: ``resident`` (they fit in
``train.data_memory_gb`` and are read once) and ``windowed`` (the budget is a ``1/--windows`` share of the
pairs, in shards of ``items / (4 · windows)`` entries: every epoch reads ``--windows`` windows of 4 shards
from disk while it trains, as a data set larger than memory is read). Both are compared with the same bare
loops; samples/s are steps/s × batch. Sizes (both are the from-scratch ``UNet2DConditionModel``):

* ``demo``: the demo preset's UNet (h_dim 64, 4 heads, pooled text in the timestep embedding, 8.5M
  parameters), MiniLM-shaped text (48 × 384), batch 24, mirrored latents cached (as the demo does);
* ``seed``: the seed's UNet (h_dim 256, 8 heads, 72.9M parameters), CLIP-shaped text (77 × 512), batch 16.

``encode``: cached pairs against the seed's loop, which re-ran the VAE on the batch's images and the text
encoder on its captions at every step; the seed-size UNet, encoders of ``stabilityai/sd-vae-ft-mse``'s and
``openai/clip-vit-base-patch32``'s shapes built from configs (random weights: only their cost matters).

``log``: what one log costs the trainer (``train.log_every``): the losses read from the device
(``Trainer.read``), then ``Trainer.log`` (rows appended to ``metrics.csv``, ``progress.json`` replaced, the
trackers and callbacks), timed in a run at ``--size`` with ``log_every=1`` against the step's wall time; then
the file writes alone, ``--repeats`` times each (one row appended, ``progress.json`` replaced, the progress
bar's postfix), and the FLOPs of one training step of the seed-size preset (``configs/scratch-gpu.toml``: batch
128), from which a GPU's step time is estimated at a share of the card's bf16 peak.

Each measurement runs in its own process. Lines end with the ratio printed as ``ratio``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Any, Sequence

import torch

BF16_PEAK_H100 = 989e12  # dense bf16 tensor-core FLOP/s (the vendor's data sheet; as benchmarks/gpu.py)

SIZES = {
    # name: (unet overrides, text tokens, text width, batch, mirrored latents)
    "demo": ({"h_dim": 64, "n_heads": 4, "groups": 16, "context_dim": 384, "text_time_embedding": True}, 48, 384, 24,
             True),
    "seed": ({}, 77, 512, 16, False),
}


def build_store(root: Path, n: int, tokens: int, width: int, flip: bool, shard_size: int = 256) -> Any:
    """``n`` items of cached pairs written by the encode stage's own store, read back as the train stage does."""
    from sd_core.encode.pairs import CachedPairs
    from sd_core.store.tensors import TensorStore

    g = torch.Generator().manual_seed(0)
    latents = TensorStore(root / "latents", shard_size=shard_size)
    texts = TensorStore(root / "text", shard_size=shard_size)
    lkeys = [{"kind": "latent", "md5": f"{i:032x}"} for i in range(n)]
    tkeys = [{"kind": "text", "caption": i} for i in range(n + 1)]
    mean = torch.randn(n, 4, 8, 8, generator=g)
    entries = []
    for i, key in enumerate(lkeys):
        t = {"mean": mean[i], "std": torch.full((4, 8, 8), 0.1)}
        if flip:
            t.update(mean_flip=mean[i].flip(2), std_flip=torch.full((4, 8, 8), 0.1))
        entries.append((key, t))
    latents.put(entries)
    mask = torch.ones(tokens, dtype=torch.long)
    texts.put([(key, {"last_hidden_state": torch.randn(tokens, width, generator=g).half(), "attention_mask": mask})
               for key in tkeys])
    return CachedPairs(latents, texts, ids=[k["md5"] for k in lkeys], captions=[""] * n, latent_keys=lkeys,
                       text_keys=tkeys[:n], empty_key=tkeys[n], scaling_factor=0.18215)


def _stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time: every thread's, the prefetch thread's included)."""
    return time.perf_counter(), time.process_time()


def _rates(stamps: list[tuple[int, float, float]], warmup: int) -> dict[str, float]:
    """Steps per wall-clock second, and per CPU second of the process, from the first stamp at or after
    ``warmup`` steps to the last (stamps are ``(step, wall, cpu)`` taken when the losses were read: every
    ``log_every`` steps). The second is what a step costs the machine, and moves far less than the first when
    other work shares the cores."""
    timed = [s for s in stamps if s[0] >= warmup]
    (s0, w0, c0), (s1, w1, c1) = timed[0], timed[-1]
    return {"steps_per_s": (s1 - s0) / (w1 - w0), "steps_per_cpu_s": (s1 - s0) / (c1 - c0)}


def trainer_steps_per_s(size: str, n: int, steps: int, warmup: int, windows: int = 0,
                        log_every: int = 1) -> dict[str, Any]:
    """The trainer through the store; ``windows > 0``: a memory budget of ``1/windows`` of the pairs, so each
    epoch reads ``windows`` windows (of 4 shards) from disk."""
    from sd_core.diffusion.models import ModelConfig, count_parameters
    from sd_core.diffusion.unet import UNetConfig
    from sd_core.training.config import TrainConfig
    from sd_core.training.trainer import Trainer

    unet, tokens, width, batch, flip = SIZES[size]
    stamps: list[tuple[int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = max(1, n // (4 * windows)) if windows else 256
        pairs = build_store(Path(tmp), n, tokens, width, flip, shard_size=shard)
        # ``windows`` windows of 4 shards (half an item of headroom against rounding)
        memory_gb = (n * pairs.item_bytes() / windows + pairs.item_bytes() / 2) / 1e9 if windows else 4.0
        cfg = TrainConfig(steps=warmup + steps, batch_size=batch, val_fraction=0.0, val_every=10**6,
                          save_every=10**6, log_every=log_every, data_memory_gb=memory_gb,
                          model=ModelConfig(unet=UNetConfig(**unet)))
        trainer = Trainer(cfg, pairs, Path(tmp) / "run", callbacks=[lambda p: stamps.append((p.step, *_stamp()))],
                          progress=False)
        params = count_parameters(trainer.net)
        assert trainer.data.resident == (windows == 0)
        per_epoch = len(trainer.data.windows(0))
        trainer.train()
        loaded, read_s, wait_s = trainer.data.windows_loaded, trainer.data.read_s, trainer.data.wait_s
    return {**_rates(stamps, warmup), "params": params, "batch": batch,
            "windows_per_epoch": per_epoch, "windows_loaded": loaded, "read_s": read_s, "wait_s": wait_s,
            "run_s": stamps[-1][1] - stamps[0][1], "shard_size": shard,
            "memory_mb": memory_gb * 1e3}


def bare_steps_per_s(size: str, steps: int, warmup: int, fused: bool) -> dict[str, Any]:
    """Forward, MSE, backward, AdamW on tensors already on the device: the simplest correct loop, with
    torch's default AdamW or (``fused``) the fused one the trainer uses."""
    import torch.nn.functional as F

    from sd_core.common.devices import device
    from sd_core.diffusion.models import ModelConfig, build_unet
    from sd_core.diffusion.schedulers import ScheduleConfig, training_scheduler
    from sd_core.diffusion.unet import UNetConfig

    unet_kw, tokens, width, batch, _ = SIZES[size]
    dev = device()
    unet = build_unet(ModelConfig(unet=UNetConfig(**unet_kw)), sample_size=8, report=lambda _: None).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused or None)
    noise_sched = training_scheduler(ScheduleConfig())
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(batch, 4, 8, 8, device=dev, generator=g)
    text = torch.randn(batch, tokens, width, device=dev, generator=g)
    stamps = []
    for _ in range(warmup + steps):
        noise = torch.randn(x0.shape, device=dev, generator=g)
        t = torch.randint(0, 1000, (batch,), device=dev, generator=g)
        loss = F.mse_loss(unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads its loss every step too (with --log-every 1)
        stamps.append((len(stamps) + 1, *_stamp()))
    return _rates(stamps, warmup)


# --- cached pairs against encoding every step ----------------------------------------------------------


class EncodingPairs:
    """A pair source that runs the VAE encoder and the text encoder whenever a batch is loaded (the seed's
    loop): one item per group and a memory budget of one batch make the trainer load every batch afresh."""

    def __init__(self, n: int, seed_encoders: bool = True) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        self.vae = AutoencoderKL(  # sd-vae-ft-mse's config
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ).eval().requires_grad_(False)
        self.text = CLIPTextModel(CLIPTextConfig(  # clip-vit-base-patch32's text tower
            vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77,
        )).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
        self.tokens = torch.randint(0, 49408, (n, 77), generator=g)
        self.ids, self.captions = [f"{i:032x}" for i in range(n)], [""] * n
        self.scaling_factor = 0.18215
        with torch.no_grad():
            self.empty_text = self.text(self.tokens[:1]).last_hidden_state[0]
        self.empty_mask = torch.ones(77, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (4, 8, 8)

    def groups(self) -> list[list[int]]:
        return [[i] for i in range(len(self))]

    def item_bytes(self) -> int:
        return 1

    @torch.no_grad()
    def load(self, items: Sequence[int]) -> Any:
        from sd_core.encode.pairs import Pairs

        idx = list(items)
        dist = self.vae.encode(self.pixels[idx]).latent_dist
        text = self.text(self.tokens[idx]).last_hidden_state
        return Pairs(ids=[self.ids[i] for i in idx], mean=dist.mean, std=dist.std, text=text.half(),
                     mask=torch.ones(len(idx), 77, dtype=torch.long), empty_text=self.empty_text,
                     empty_mask=self.empty_mask, scaling_factor=self.scaling_factor)


def encode_vs_cached(mode: str, n: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    from sd_core.diffusion.models import ModelConfig
    from sd_core.training.config import TrainConfig
    from sd_core.training.trainer import Trainer

    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "cached":
            pairs: Any = build_store(Path(tmp), n, 77, 512, False)
            memory = 4.0
        else:
            pairs = EncodingPairs(n)
            memory = batch / 1e9  # one batch per window: every batch is encoded when it is drawn
        cfg = TrainConfig(steps=warmup + steps, batch_size=batch, val_fraction=0.0, val_every=10**6,
                          save_every=10**6, log_every=1, data_memory_gb=memory, model=ModelConfig())
        Trainer(cfg, pairs, Path(tmp) / "run", callbacks=[lambda p: stamps.append(time.perf_counter())],
                progress=False).train()
    timed = stamps[warmup - 1 :]
    return {"steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0])}


# --- what one log costs --------------------------------------------------------------------------------


def logging_cost(size: str, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """The trainer at ``size`` logging every step: the wall time of each read (the device sync) and log, and of
    the step between them; then the file writes of one log alone, ``repeats`` times each."""
    import io
    import statistics as st

    from torch.utils.flop_counter import FlopCounterMode
    from tqdm.auto import tqdm

    from sd_core.diffusion.models import ModelConfig, build_unet
    from sd_core.diffusion.unet import UNetConfig
    from sd_core.training.config import TrainConfig
    from sd_core.training.metrics import MetricsLog, Progress, StepRecord
    from sd_core.training.trainer import Trainer

    unet_kw, tokens, width, batch, flip = SIZES[size]
    spent: dict[str, list[float]] = {"read": [], "log": []}
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = build_store(Path(tmp), 256, tokens, width, flip)
        cfg = TrainConfig(steps=warmup + steps, batch_size=batch, val_fraction=0.0, val_every=10**6,
                          save_every=10**6, log_every=1, model=ModelConfig(unet=UNetConfig(**unet_kw)))
        trainer = Trainer(cfg, pairs, Path(tmp) / "run", callbacks=[lambda p: marks.append(time.perf_counter())],
                          progress=False)
        for name in spent:
            def timed(*args: Any, _f: Any = getattr(trainer, name), _n: str = name) -> Any:
                start = time.perf_counter()
                out = _f(*args)
                spent[_n].append(time.perf_counter() - start)
                return out
            setattr(trainer, name, timed)
        trainer.train()
        step_s = st.median(b - a for a, b in zip(marks[warmup - 1 :], marks[warmup:]))
        read_s, log_s = st.median(spent["read"][warmup:]), st.median(spent["log"][warmup:])

        # the writes of one log, alone
        metrics = MetricsLog(Path(tmp) / "m" / "metrics.csv", keep_until=None)
        record, report = StepRecord(1, 0.1234, 1.0, 1e-4), Progress(1, 10**6, 0.1234, 1e-4, 1.0)
        bar = tqdm(total=repeats, file=io.StringIO(), dynamic_ncols=True)

        def each(fn: Any) -> float:
            start = time.perf_counter()
            for i in range(repeats):
                fn(i)
            return (time.perf_counter() - start) / repeats

        csv_s = each(lambda i: metrics.write([record], val=None, seconds=float(i)))
        json_s = each(lambda i: metrics.progress(report, Path(tmp) / "m" / "progress.json"))
        bar_s = each(lambda i: (bar.update(1), bar.set_postfix(loss=f"{0.1234:.4f}", lr=f"{1e-4:.2e}")))
        bar.close()
    # FLOPs of one step (forward + backward) of the seed's UNet (8x8 latents, CLIP-shaped text), per sample
    seed_kw, seed_tokens, seed_width, n, _ = SIZES["seed"]
    unet = build_unet(ModelConfig(unet=UNetConfig(**seed_kw)), sample_size=8, report=lambda _: None)
    x, t = torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,))
    with FlopCounterMode(display=False) as counter:
        text = torch.randn(n, seed_tokens, seed_width)
        torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=text).sample, x).backward()
    return {"step_s": step_s, "read_s": read_s, "log_s": log_s, "csv_s": csv_s, "json_s": json_s, "bar_s": bar_s,
            "batch": batch, "flops_per_sample": counter.get_total_flops() / n, "log_all_s": spent["log"][warmup:]}


# --- processes -----------------------------------------------------------------------------------------


def _child(queue: Any, fn: Any, args: tuple[Any, ...]) -> None:
    queue.put(fn(*args))


def in_child(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned process, returning its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{fn.__name__} failed in its process (exit code {proc.exitcode})") from None
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    store = sub.add_parser("store", help="trainer through the store vs a bare loop")
    store.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    store.add_argument("--data", nargs="+", choices=["resident", "windowed"], default=["resident", "windowed"],
                       help="pairs held in memory, or read in windows (a budget smaller than the pairs)")
    store.add_argument("--windows", type=int, default=4, help="windowed: windows an epoch")
    store.add_argument("--items", type=int, default=512)
    store.add_argument("--steps", type=int, default=20)
    store.add_argument("--warmup", type=int, default=3)
    store.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are printed")
    store.add_argument("--log-every", type=int, default=1, help="the trainer's train.log_every")
    enc = sub.add_parser("encode", help="cached pairs vs encoding every step (seed-size UNet and encoders)")
    enc.add_argument("--items", type=int, default=256)
    enc.add_argument("--batch", type=int, default=16)
    enc.add_argument("--steps", type=int, default=10)
    enc.add_argument("--warmup", type=int, default=2)
    logc = sub.add_parser("log", help="what one log costs (train.log_every), against the step")
    logc.add_argument("--size", choices=list(SIZES), default="seed")
    logc.add_argument("--steps", type=int, default=8)
    logc.add_argument("--warmup", type=int, default=2)
    logc.add_argument("--repeats", type=int, default=2000)
    args = ap.parse_args()
    if args.what == "store" and (args.warmup % args.log_every or args.steps % args.log_every):
        ap.error(f"--warmup ({args.warmup}) and --steps ({args.steps}) must be multiples of --log-every "
                 f"({args.log_every}): the trainer reports its steps only when it reads the losses")
    dev = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    if args.what == "store":
        for size in args.sizes:
            cases = {"trainer" if d == "resident" else "trainer_windowed": (args.windows if d == "windowed" else 0)
                     for d in args.data}
            names = [*cases, "bare", "bare_fused"]
            runs = {k: {n: [] for n in names} for k in ("steps_per_s", "steps_per_cpu_s")}
            info: dict[str, dict[str, Any]] = {}
            for r in range(args.rounds):  # alternating, so that a slow spell of the machine hits every run
                for case, windows in cases.items():
                    info[case] = in_child(trainer_steps_per_s, size, args.items, args.steps, args.warmup, windows,
                                          args.log_every)
                for name, fused in (("bare", False), ("bare_fused", True)):
                    info[name] = in_child(bare_steps_per_s, size, args.steps, args.warmup, fused)
                for k in runs:
                    for n in names:
                        runs[k][n].append(info[n][k])
                print(f"  {size} round {r + 1}, steps/s (per CPU s): " + ", ".join(
                    f"{n} {runs['steps_per_s'][n][-1]:.3f} ({runs['steps_per_cpu_s'][n][-1]:.3f})" for n in names),
                    flush=True)
            m = {k: {n: statistics.median(v) for n, v in per.items()} for k, per in runs.items()}
            wall, cpu = m["steps_per_s"], m["steps_per_cpu_s"]
            t = info[next(iter(cases))]
            batch = t["batch"]
            print(f"{size} UNet ({t['params']:,} parameters), batch {batch}, {dev}, median of {args.rounds} rounds, "
                  f"samples/s (per CPU second): bare loop with torch's default AdamW {wall['bare'] * batch:.1f} "
                  f"({cpu['bare'] * batch:.1f}), with the trainer's fused AdamW {wall['bare_fused'] * batch:.1f} "
                  f"({cpu['bare_fused'] * batch:.1f})", flush=True)
            for case in cases:
                i = info[case]
                how = ("resident (read once)" if case == "trainer" else
                       f"windowed ({i['windows_per_epoch']} windows an epoch of {4 * i['shard_size']} items, budget "
                       f"{i['memory_mb']:.1f} MB; in the last run {i['windows_loaded']} windows read in "
                       f"{i['read_s']:.2f} s, waited for {i['wait_s']:.2f} s (the first read included), steps "
                       f"{i['run_s']:.1f} s)")
                print(f"  {case}: trainer through the store, {how}: {wall[case] * batch:.1f} samples/s "
                      f"({cpu[case] * batch:.1f} per CPU s); ratio {wall[case] / wall['bare']:.3f} to the bare loop "
                      f"({cpu[case] / cpu['bare']:.3f} per CPU s), ratio {wall[case] / wall['bare_fused']:.3f} to the "
                      f"bare loop with fused AdamW ({cpu[case] / cpu['bare_fused']:.3f} per CPU s)", flush=True)
    elif args.what == "log":
        r = in_child(logging_cost, args.size, args.steps, args.warmup, args.repeats)
        per_log = r["read_s"] + r["log_s"]
        print(f"{args.size} UNet, batch {r['batch']}, {dev}: step {r['step_s'] * 1e3:.0f} ms (wall, median of "
              f"{args.steps}); one log {per_log * 1e3:.2f} ms = read from the device {r['read_s'] * 1e3:.2f} ms + "
              f"Trainer.log {r['log_s'] * 1e3:.2f} ms; alone ({args.repeats}x each): a metrics.csv row "
              f"{r['csv_s'] * 1e3:.3f} ms, progress.json {r['json_s'] * 1e3:.3f} ms, progress bar "
              f"{r['bar_s'] * 1e3:.3f} ms; logging every step costs {100 * per_log / r['step_s']:.2f} % of the step "
              f"here", flush=True)
        flops = r["flops_per_sample"] * 128
        for share in (0.2, 0.5):
            gpu_step = flops / (share * BF16_PEAK_H100)
            print(f"  seed-size preset (batch 128): {flops / 1e12:.2f} TFLOP a step; on an H100 at {share:.0%} of the "
                  f"bf16 peak a step is {gpu_step * 1e3:.1f} ms, and one log ({per_log * 1e3:.2f} ms, the CPU part "
                  f"measured here) is {100 * per_log / gpu_step:.1f} % of it: log_every >= "
                  f"{math.ceil(per_log / (0.01 * gpu_step))} keeps logging under 1 %", flush=True)
    else:
        c = in_child(encode_vs_cached, "cached", args.items, args.batch, args.steps, args.warmup)
        e = in_child(encode_vs_cached, "encode", args.items, args.batch, args.steps, args.warmup)
        print(f"seed UNet (72,911,620 parameters), batch {args.batch}, {dev}: cached pairs {c['steps_per_s']:.3f} "
              f"steps/s, encoding every step (sd-vae-ft-mse + CLIP ViT-B/32 shapes) {e['steps_per_s']:.3f} steps/s, "
              f"ratio {c['steps_per_s'] / e['steps_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
