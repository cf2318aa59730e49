"""Captioning throughput, batched vs one image at a time.

    .venv/bin/python benchmarks/caption.py [--items 32] [--batch 8] [--model DIR]

Without ``--model`` it builds the tests' tiny random Qwen2.5-VL (CPU figures of the code path, not of
the 3B model); with ``--model Qwen/Qwen2.5-VL-3B-Instruct`` on a GPU it measures the real one. Prints
items/s and peak memory per mode; the last line is ``speedup <batched/one-at-a-time>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import demo_images, in_child, peak_rss_mib


def measure(model_dir: str, n: int, batch: int, max_new_tokens: int) -> dict[str, float]:
    import torch

    from sd_core.caption.config import CaptionConfig
    from sd_core.caption.qwen import QwenCaptioner

    images, titles = demo_images(n)
    cap = QwenCaptioner.from_config(CaptionConfig(model_id=model_dir, batch_size=batch,
                                                  max_new_tokens=max_new_tokens))
    cap.caption(images[:batch], titles[:batch])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cap.caption(images, titles)
    seconds = time.perf_counter() - start
    out = {"items_per_s": n / seconds, "peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", help="model id or folder (default: a tiny random Qwen2.5-VL)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tiny_qwen import build_tiny_qwen

            model = str(build_tiny_qwen(tmp))
        rates = {}
        for label, batch in (("one-at-a-time", 1), ("batched", args.batch)):
            r = in_child(measure, model, args.items, batch, args.max_new_tokens)
            rates[label] = r["items_per_s"]
            print(f"{label:13s} batch={batch} items_per_s={r['items_per_s']:.2f} peak_rss_mib={r['peak_rss_mib']:.0f}"
                  + (f" cuda_max_allocated_mib={r['cuda_max_allocated_mib']:.0f}" if "cuda_max_allocated_mib" in r else ""),
                  flush=True)
    print(f"speedup {rates['batched'] / rates['one-at-a-time']:.2f}")


if __name__ == "__main__":
    main()
