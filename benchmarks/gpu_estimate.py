"""What a GPU run at the seed's sizes should need, estimated on the CPU from the models' shapes (no GPU, no
weights): for each training model, its parameters, the FLOPs of one training sample (forward and backward,
counted by ``torch.utils.flop_counter`` on meta tensors) and the activations autograd keeps for the backward
pass (every tensor saved for backward, counted through ``saved_tensors_hooks``); for the captioner, its
weights. From these it prints a memory estimate per stage and a time estimate at an assumed share of an
H100's dense bf16 peak. These are estimates, not measurements: ``benchmarks/gpu.py`` measures on a GPU.

    .venv/bin/python benchmarks/gpu_estimate.py [--mfu 0.3] [--items 5000]

Memory of a training run = fp32 weights + (for the trainable parameters) fp32 gradients, AdamW's two moments
and the EMA copy + activations at the batch size, halved for bf16 autocast. These activations are an upper
bound: on meta tensors attention runs its math path, which keeps the attention matrix (at 512 px, 4096 x 4096
per head), where a GPU's fused attention does not; gradient checkpointing (on in ``configs/finetune-sd14.toml``)
keeps far less again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SD14_UNET, qwen_3b_config  # noqa: E402

H100_BF16 = 989e12  # dense bf16 FLOP/s, the vendor's data sheet
GB = 1e9


def scratch_seed_unet():
    from sd_core.diffusion.models import ModelConfig, build_unet
    from sd_core.diffusion.unet import UNetConfig

    return build_unet(ModelConfig(unet=UNetConfig()), sample_size=8, report=lambda _: None)


def sd14_unet():
    from diffusers import UNet2DConditionModel

    from sd_core.diffusion.models import freeze_all_but_attn2

    unet = UNet2DConditionModel(**SD14_UNET)
    freeze_all_but_attn2(unet)
    return unet


def per_sample(make, side: int, tokens: int, width: int) -> dict:
    """Parameters, FLOPs and saved activation bytes (fp32) of one training sample, on meta tensors."""
    with torch.device("meta"):
        unet = make()
        x = torch.randn(1, 4, side, side)
        text = torch.randn(1, tokens, width)
        t = torch.tensor([500])
    saved: list[int] = []
    weights = {id(p) for p in unet.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:  # the layers' own weights (or views of them) are not activations
        if id(tensor) not in weights and (tensor._base is None or id(tensor._base) not in weights):
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, encoder_hidden_states=text).sample.float().pow(2).mean().backward()
    params = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return {"params": params, "trainable": trainable, "flops": counter.get_total_flops(), "act_bytes": sum(saved)}


def qwen_3b_params() -> int:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = qwen_3b_config(Qwen2_5_VLConfig())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mfu", type=float, default=0.3, help="assumed share of the bf16 peak a training step reaches")
    ap.add_argument("--items", type=int, default=5000, help="dataset size for the per-epoch times")
    args = ap.parse_args()
    speed = H100_BF16 * args.mfu
    print(f"estimates from shapes on the CPU (no GPU ran this); time at {args.mfu:.0%} of an H100's bf16 peak")

    rows = [
        ("scratch, the seed's UNet (configs/scratch-gpu.toml)", scratch_seed_unet, 8, 77, 512, 128, 20000),
        ("SD 1.4 attn2 fine-tune at 512 px (configs/finetune-sd14.toml)", sd14_unet, 64, 77, 768, 8, 3000),
    ]
    for name, make, side, tokens, width, batch, steps in rows:
        s = per_sample(make, side, tokens, width)
        state = (4 * s["params"] + 16 * s["trainable"]) / GB  # fp32 weights; grads, 2 AdamW moments, EMA
        act = s["act_bytes"] / 2 * batch / GB  # bf16 autocast keeps about half the fp32 bytes
        step_s = s["flops"] * batch / speed
        print(f"\n{name}")
        print(f"  parameters {s['params'] / 1e6:,.1f}M, trainable {s['trainable'] / 1e6:,.1f}M")
        print(f"  {s['flops'] / 1e9:,.1f} GFLOP per training sample; activations {s['act_bytes'] / 1e6:,.0f} MB "
              f"per sample in fp32")
        print(f"  memory at batch {batch}: weights and optimizer {state:.1f} GB + activations {act:.1f} GB "
              f"= {state + act:.1f} GB at most (math attention, no checkpointing)")
        print(f"  time: at least {step_s * 1e3:.1f} ms per step, {steps:,} steps in {steps * step_s / 60:.1f} min "
              "(small shapes are often bound by kernel launches, not FLOPs: expect more)")

    q = qwen_3b_params()
    weights = 2 * q / GB
    # decoding is bound by reading the weights once per generated token of a batch
    per_token_s = weights * GB / 3.35e12  # H100 SXM memory bandwidth, bytes/s
    print("\ncaption: Qwen2.5-VL-3B-Instruct in bf16")
    print(f"  parameters {q / 1e9:.2f}B: weights {weights:.1f} GB (+ about 1-2 GB of activations and KV cache "
          f"at batch 8 of emoji-sized images)")
    print(f"  time: at least {per_token_s * 1e3:.1f} ms per generated token of a batch (weight reads); "
          f"~60 tokens a caption at batch 8: at most {8 / (60 * per_token_s):.0f} captions/s; "
          f"{args.items:,} items in at least {args.items / (8 / (60 * per_token_s)) / 60:.1f} min")


if __name__ == "__main__":
    main()
