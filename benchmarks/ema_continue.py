"""Which EMA a continuation should export: ``train.ema_on_continue`` = keep, rewarm or adapt.

The demo pipeline runs once on ``--items`` emoji (the champion), the demo site then lists ``--grow`` more,
and the refreshed data directory is copied once per mode; each copy runs train (a continuation of
``train.continue_steps`` from the champion) and eval. A row per mode: the held-out ε-MSE of the exported EMA
model (the eval stage's fixed timesteps and noise, on the same held-out sample for every mode), the train
stage's own EMA and raw validation losses, prompt following at the evaluated guidance and at guidance 0,
and the train stage's seconds.

    .venv/bin/python benchmarks/ema_continue.py [--items 240] [--grow 0.25] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import tasks  # noqa: F401  (Prefect defaults for offline use)
from flows.pipeline import pipeline
from sd_core.config import load_config, preset
from sd_core.demo.emoji_art import build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog
from sd_core.store.records import load_stage

MODES = ("keep", "rewarm", "adapt")


def scores(data_dir: Path) -> dict:
    cat = Catalog(data_dir)
    ev = json.loads(cat.eval_json(cat.latest_run()).read_text())
    train = load_stage(cat, "train")
    return {"eval": ev["scores"], "train": train.summary, "train_s": train.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=240)
    ap.add_argument("--grow", type=float, default=0.25)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--keep-dir", type=Path, help="work here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, DemoSite(build_demo_items(args.items)) as site:
        root = args.keep_dir or Path(tmp)
        base = root / "base"
        cfg = load_config(base=preset("demo"), sets=args.sets,
                          overrides={"data_dir": str(base), "crawl.base_url": site.base_url})
        if not (base / "models" / "current.json").exists():  # a --keep-dir from an earlier run: reuse its first run
            pipeline(cfg, until="eval", progress=False)
        first = scores(base)
        print(f"first run: {args.items} items, held-out ε-MSE {first['eval']['held_out_loss']:.4f}", flush=True)
        site.prepend(build_growth_items(max(1, round(args.items * args.grow)), after=args.items))
        pipeline(cfg, until="encode", progress=False)
        print("| ema_on_continue | eval held-out ε-MSE (EMA export) | train val loss, EMA | train val loss, raw "
              "| prompt following at w | at w = 0 | train |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for mode in MODES:
            dest = root / mode
            if dest.exists():
                shutil.rmtree(dest)
            # hard links: the pipeline replaces files, it never rewrites one in place
            shutil.copytree(base, dest, copy_function=os.link)
            run = load_config(base=preset("demo"), sets=[*args.sets, f"train.ema_on_continue={mode}"],
                              overrides={"data_dir": str(dest), "crawl.base_url": site.base_url})
            pipeline(run, start="train", until="eval", progress=False)
            s = scores(dest)
            e, t = s["eval"], s["train"]
            print(f"| {mode} | {e['held_out_loss']:.4f} | {t.get('ema_val_loss', float('nan')):.4f} | "
                  f"{t.get('val_loss', float('nan')):.4f} | {100 * e['prompt_following']:.1f}% | "
                  f"{100 * e['prompt_following_g0']:.1f}% | {s['train_s']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
