"""Size on disk of each fine-tune export of a Stable-Diffusion-1.4-shaped model, and of the from-scratch export.

    .venv/bin/python benchmarks/export.py [--ranks 4 8 16] [--tmp DIR]

The base is a ``StableDiffusionPipeline`` with CompVis/stable-diffusion-v1-4's component configurations
(UNet 860M, CLIP ViT-L/14 text tower 123M, VAE 84M parameters) built with random weights and saved with
``save_pretrained`` (the weights' values do not change their size). Then, through the exporters the train
stage uses: the attn2 fine-tune (only the cross-attention tensors), LoRA at each rank (diffusers' LoRA file),
and the opt-in merged pipeline. Needs about 9 GB of disk under ``--tmp`` and 8 GB of memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SD14_UNET  # noqa: E402


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def sd14_shaped(path: Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD14_UNET)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    from tiny_models import _tiny_clip_tokenizer  # a CLIP tokenizer made here (the real vocabulary is not on disk)

    tokenizer: CLIPTokenizer = _tiny_clip_tokenizer()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> None:
    from sd_core.diffusion.config import LoRAConfig, ModelConfig
    from sd_core.diffusion.export import write_attn2_export, write_lora_export
    from sd_core.diffusion.models import build_unet, trainable_state

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--tmp", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        base = sd14_shaped(Path(tmp) / "sd14-shaped")
        print(f"SD 1.4-shaped base pipeline (random weights): {folder_mb(base):,.0f} MiB", flush=True)
        manifest = {"step": 0}
        full = build_unet(ModelConfig(kind="pretrained_attn2", pretrained_model_id=str(base)), sample_size=64)
        attn2 = trainable_state(full)
        out = write_attn2_export(Path(tmp) / "attn2", weights=attn2, base_model=str(base), revision=None,
                                 manifest=manifest)
        n = sum(v.numel() for v in attn2.values())
        print(f"attn2 fine-tune export ({n:,} parameters, fp32): {folder_mb(out):,.1f} MiB", flush=True)
        del full
        for i, rank in enumerate(args.ranks):
            cfg = ModelConfig(kind="pretrained_attn2_lora", pretrained_model_id=str(base),
                              lora=LoRAConfig(rank=rank, alpha=float(rank)))
            unet = build_unet(cfg, sample_size=64)
            state = {k: torch.randn_like(v) * 0.01 for k, v in trainable_state(unet).items()}
            merged = i == len(args.ranks) - 1
            out = write_lora_export(Path(tmp) / f"lora-{rank}", unet=unet, weights=state, base_model=str(base),
                                    revision=None, manifest=manifest, merged=merged)
            n = sum(v.numel() for v in state.values())
            lora_mb = (out / "pytorch_lora_weights.safetensors").stat().st_size / 2**20
            print(f"LoRA rank {rank} export ({n:,} parameters, fp32): {lora_mb:,.1f} MiB", flush=True)
            if merged:
                print(f"merged pipeline export (train.export_merged, fp32): {folder_mb(out / 'merged'):,.0f} MiB",
                      flush=True)
            del unet


if __name__ == "__main__":
    main()
