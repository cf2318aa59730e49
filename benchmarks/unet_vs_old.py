"""The diffusers UNet2DConditionModel against the private EmojiUNet it replaced, at equal size.

    .venv/bin/python benchmarks/unet_vs_old.py [--sizes demo seed] [--steps 10] [--rounds 3] [--rev 1e863c6]

The old model is read from git history (``sd_core/unet.py`` at ``--rev``, the last commit that had it; it
imports nothing from the project). Both are built at the same size, ``demo`` (h_dim 64, 4 heads, context 384,
batch 24, 48 tokens; plain, without the demo preset's pooled text, which the old model did not have) and
``seed`` (h_dim 256, 8 heads, context 512, batch 16, 77 tokens), on 4 × 8 × 8 latents. One training step is
forward, MSE, backward, AdamW; rounds of ``--steps`` steps alternate between the two models and the best
round of each counts. The last column is ``new/old`` (above 1: the new model is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (UNet config fields, batch, tokens, width)
    "demo": ({"h_dim": 64, "n_heads": 4, "groups": 16, "context_dim": 384}, 24, 48, 384),
    "seed": ({}, 16, 77, 512),
}


def old_module(rev: str) -> Any:
    source = subprocess.run(["git", "show", f"{rev}:sd_core/unet.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_unet.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_unet", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def stepper(model: torch.nn.Module, call: Callable[..., torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        F.mse_loss(call(), x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rev", default="1e863c6")
    args = ap.parse_args()
    from sd_core.diffusion.models import ModelConfig, build_unet, count_parameters
    from sd_core.diffusion.unet import UNetConfig

    old_unet = old_module(args.rev)
    for size in args.sizes:
        kw, batch, tokens, width = SIZES[size]
        old = old_unet.EmojiUNet(old_unet.UNetConfig(**kw))
        new = build_unet(ModelConfig(unet=UNetConfig(**kw)), sample_size=8, report=lambda _: None)
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, tokens, width, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        runs = {"old": stepper(old, lambda: old(x, t, ctx), x),
                "new": stepper(new, lambda: new(x, t, encoder_hidden_states=ctx).sample, x)}
        for step in runs.values():  # warm-up
            step()
            step()
        best = {k: 0.0 for k in runs}
        for _ in range(args.rounds):
            for k, step in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                best[k] = max(best[k], args.steps / (time.perf_counter() - start))
        print(f"{size} size, batch {batch}, {torch.get_num_threads()} threads: "
              f"old EmojiUNet {count_parameters(old):,} params {best['old']:.2f} steps/s; "
              f"new UNet2DConditionModel {count_parameters(new):,} params {best['new']:.2f} steps/s; "
              f"new/old {best['new'] / best['old']:.3f}", flush=True)


if __name__ == "__main__":
    main()
