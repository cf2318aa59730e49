"""The promotion gate on demo data: runs of one configuration that differ only in their training seed must not
reject each other, and a run trained 2 steps must be rejected; and what the eval costs.

    .venv/bin/python benchmarks/eval_gate.py [--scale test|demo] [--items 40] [--seeds 4] [--set KEY=VALUE ...]

The demo site (``--items`` emoji) is crawled, captioned and encoded once; then the train stage runs once per
training seed (``train.seed = 0 .. seeds-1``, each a run of its own) and once more for 2 steps (with the next
seed: the run length is not part of a run's key, so the same seed would continue that seed's run). Each
run's export is evaluated on the same held-out items and seeds (:func:`sd_core.eval.stage.evaluate`), and
every ordered pair is judged with the configured gate (:func:`sd_core.eval.gate.compare`), each run in turn
the champion. Printed: each run's scores with their intervals, each verdict with the paired differences,
the count of same-configuration pairs rejected (must be 0) and of 2-step runs accepted (must be 0), and the
eval's seconds and images drawn.

``--scale test``: the tests' tiny settings (tests/test_pipeline.py's FAST: an 8-16 channel VAE trained 25
steps, a 32-wide UNet trained ``train.steps=30``, 2 sampling steps in the eval). ``--scale demo``: the demo
preset (its UNet and VAE sizes, 20 sampling steps), with ``vae.steps=100``; ``--set train.steps=...`` sets
the run length (the preset's 900 by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TEST_SCALE = [
    "vae.steps=25", "vae.batch_size=8", "vae.block_out_channels=[8, 16, 16, 16]", "vae.norm_num_groups=8",
    "train.steps=30", "train.batch_size=8", "train.val_every=6", "train.save_every=30", "train.sample_every=null",
    "train.model.unet.h_dim=32", "train.model.unet.groups=8", "train.model.unet.n_heads=4",
    "encode.text.max_length=32", "eval.steps=2", "eval.grid_items=4", "eval.features=null", "eval.clip_model=null",
]
DEMO_SCALE = ["vae.steps=100", "train.sample_every=null", "eval.features=null", "eval.clip_model=null"]


def fmt(result: dict, name: str) -> str:
    from sd_core.eval.table import with_interval

    return with_interval(result["scores"].get(name), result.get("intervals", {}).get(name), "{:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=("test", "demo"), default="test")
    ap.add_argument("--items", type=int, default=40, help="emoji on the demo site")
    ap.add_argument("--site-seed", type=int, default=9)
    ap.add_argument("--seeds", type=int, default=4, help="training seeds of the same configuration")
    ap.add_argument("--data-dir", type=Path, help="kept between calls (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (train and eval alike)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE over the scale's settings")
    args = ap.parse_args()

    import tasks  # noqa: F401  (Prefect defaults for offline use)
    from flows.pipeline import pipeline
    from sd_core.config import load_config, preset
    from sd_core.demo.emoji_art import build_demo_items
    from sd_core.demo.site import DemoSite
    from sd_core.eval.gate import compare
    from sd_core.eval.stage import eval_set, evaluate, promotion_rules
    from sd_core.store.catalog import Catalog
    import torch

    base = TEST_SCALE if args.scale == "test" else DEMO_SCALE
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = (args.data_dir or Path(tmp) / "data").resolve()
        cat = Catalog(data)
        with DemoSite(build_demo_items(args.items, seed=args.site_seed), per_page=12) as site:
            url = site.base_url

            def config(*sets: str):  # every run kept (keep_runs), none evaluated by the pipeline
                return load_config(base=preset("demo"), sets=[*base, "train.keep_runs=100", *args.sets, *sets],
                                   overrides={"data_dir": str(data), "crawl.base_url": url})

            start = time.perf_counter()
            pipeline(config(), until="encode", progress=False)
            print(f"crawl..encode: {time.perf_counter() - start:.0f} s", flush=True)
            runs: dict[str, Path] = {}
            for name, sets in [*((f"seed {k}", [f"train.seed={k}"]) for k in range(args.seeds)),
                               ("2 steps", [f"train.seed={args.seeds}", "train.steps=2"])]:
                start = time.perf_counter()
                pipeline(config(*sets), start="train", until="train", progress=False)
                runs[name] = cat.latest_run()
                print(f"train {name}: {time.perf_counter() - start:.0f} s ({runs[name].name})", flush=True)

        cfg = config()
        items = eval_set(cat, cfg.eval, cfg.train.val_fraction, cfg.train.split_seed)
        results = {}
        for name, run in runs.items():
            results[name] = evaluate(run / "model", cfg=cfg.eval, captioner_cfg=cfg.caption, catalog=cat, items=items)
            r = results[name]
            print(f"eval {name}: {r['items']} items x {r['seeds_per_item']} seeds, {r['images_drawn']} images drawn "
                  f"in {r['drawing_seconds']} s, {r['seconds']} s in all; kappa {fmt(r, 'prompt_kappa')} "
                  f"(g0 {fmt(r, 'prompt_kappa_g0')}, real {fmt(r, 'prompt_kappa_real')}, vae "
                  f"{fmt(r, 'prompt_kappa_vae')}; counted: {', '.join(r['varying']['attributes'])}); "
                  f"share {fmt(r, 'prompt_following')} (g0 {fmt(r, 'prompt_following_g0')}); "
                  f"held-out loss {r['scores']['held_out_loss']:.4f}", flush=True)

    gate = cfg.eval.promote_if
    print(f"gate: {json.dumps(gate.model_dump())}, {cfg.eval.bootstrap} replicates", flush=True)
    same_rejected = same_pairs = short_accepted = short_pairs = 0
    for new, old in itertools.permutations(results, 2):
        rules, note = promotion_rules(gate.scores, results[new], results[old])
        verdict = compare(results[new], results[old], rules, confidence=gate.confidence,
                          replicates=cfg.eval.bootstrap)
        rejected = bool(verdict.worse)
        if "2 steps" not in new and "2 steps" not in old:
            same_pairs, same_rejected = same_pairs + 1, same_rejected + rejected
        elif "2 steps" in new:
            short_pairs, short_accepted = short_pairs + 1, short_accepted + (not rejected)
        else:
            continue  # the champion trained 2 steps: nothing is asked of it
        print(f"{new} against champion {old}: {'REJECTED' if rejected else 'accepted'}: "
              f"{'; '.join(verdict.worse or verdict.held)}{note}", flush=True)
    print(f"same configuration, other seed: {same_rejected} of {same_pairs} pairs rejected; "
          f"2 steps: {short_accepted} of {short_pairs} accepted", flush=True)


if __name__ == "__main__":
    main()
