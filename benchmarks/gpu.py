"""One short run on a GPU: training throughput at the seed size, its share of the card's bf16 peak, and
captioning throughput of a Qwen2.5-VL-3B-shaped model, batched against one image at a time.

    .venv/bin/python benchmarks/gpu.py [--batch 128] [--steps 30] [--captions 32] [--caption-batch 8]
    .venv/bin/python benchmarks/gpu.py --smoke      # the same code path with tiny sizes (a CPU check)

Training: the seed's UNet (72.9M parameters, ``UNet2DConditionModel``) trained by the pipeline's own trainer
(cached pairs read through the store, bf16 autocast where the card has it), against a bare loop on the same
model and batch; FLOPs of one step are counted with ``torch.utils.flop_counter`` (forward + backward).
Captioning: a ``Qwen2_5_VLForConditionalGeneration`` built from Qwen2.5-VL-3B-Instruct's configuration with
random weights (the cost of a forward pass does not depend on the weights' values), in bf16, generating a
fixed number of tokens per image through the captioner's own batching and preprocessing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_images  # noqa: E402
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
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = build_store(Path(tmp), max(batch * 4, 64), 77, unet_cfg.context_dim, False)
        cfg = TrainConfig(steps=warmup + steps, batch_size=batch, val_fraction=0.0, val_every=10**6,
                          save_every=10**6, log_every=1, mixed_precision="auto", model=ModelConfig(unet=unet_cfg))
        trainer = Trainer(cfg, pairs, Path(tmp) / "run", progress=False,
                          callbacks=[lambda p: stamps.append(time.perf_counter())])
        trainer.train()
        precision = trainer.accelerator.mixed_precision
    timed = stamps[warmup - 1:]
    trainer_sps = (len(timed) - 1) / (timed[-1] - timed[0])

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
    """A Qwen2.5-VL checkpoint with the 3B model's shapes (random weights) and the tests' small tokenizer."""
    from tiny_qwen import build_config, build_tiny_qwen, build_tokenizer
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    folder = build_tiny_qwen(tmp / "qwen")  # processor, tokenizer and chat template files
    if smoke:
        return folder
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    config.text_config.update(dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                   num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                   tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                                    "mrope_section": [16, 24, 24]}))
    config.vision_config.update(dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                     out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31]))
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig.from_pretrained(folder)
    model.save_pretrained(folder)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--captions", type=int, default=32)
    ap.add_argument("--caption-batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path on a CPU")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.steps, args.warmup, args.captions, args.caption_batch, args.new_tokens = 8, 3, 2, 4, 2, 4
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    t = in_child(train_throughput, args.batch, args.steps, args.warmup, args.smoke)
    size = "tiny UNet (smoke)" if args.smoke else "seed UNet"
    line = (f"{card}: {size} ({t['params']:,} parameters), batch {args.batch}, {t['precision']}: trainer "
            f"{t['trainer_sps'] * args.batch:.0f} samples/s ({t['trainer_sps']:.2f} steps/s), bare loop "
            f"{t['bare_sps'] * args.batch:.0f} samples/s, ratio {t['trainer_sps'] / t['bare_sps']:.3f}")
    peak = peak_flops()
    if peak:
        line += f"; {t['flops_per_step'] * t['trainer_sps'] / 1e12:.1f} TFLOP/s = " \
                f"{100 * t['flops_per_step'] * t['trainer_sps'] / peak:.1f}% of the bf16 peak"
    print(line, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(qwen_3b_shaped(Path(tmp), args.smoke))
        one = in_child(caption_throughput, folder, args.captions, 1, args.new_tokens)
        many = in_child(caption_throughput, folder, args.captions, args.caption_batch, args.new_tokens)
    shape = "tiny Qwen2.5-VL (smoke)" if args.smoke else "Qwen2.5-VL-3B-shaped (random weights)"
    print(f"{card}: {shape}, {args.new_tokens} new tokens per image: one at a time {one:.2f} captions/s, batch "
          f"{args.caption_batch} {many:.2f} captions/s, ratio {many / one:.2f}", flush=True)


if __name__ == "__main__":
    main()
