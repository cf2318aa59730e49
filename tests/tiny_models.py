"""Tiny random checkpoints laid out like the hub repos, built offline and saved with save_pretrained.

* ``build_tiny_vae(path)``: an ``AutoencoderKL`` with SD's 8x downsampling and 4 latent channels.
* ``build_tiny_clip(path)``: a ``CLIPTextModel`` and a byte-level BPE ``CLIPTokenizer`` in one folder,
  as in ``openai/clip-vit-base-patch32``.
* ``build_tiny_sd(path)``: a ``StableDiffusionPipeline`` folder (unet/, text_encoder/, tokenizer/, vae/,
  scheduler/, model_index.json) that ``StableDiffusionPipeline.from_pretrained`` loads.

Everything loads through the same ``from_pretrained`` calls as the real models; the weights are random
but deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CLIP_HIDDEN = 32
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_CORPUS = (
    "grinning face emoji with a round head, big eyes, smiling mouth, happy expression, yellow skin color, "
    "no action, with a white background.",
    "cat emoji with an oval head, small closed eyes, open mouth, sleepy expression, orange skin color, "
    "waving a paw, with a blue background.",
    "frog emoji with a wide head, bulging eyes, frowning mouth, sad expression, green skin color, "
    "holding a heart, with a pink background.",
    "red apple pizza ghost robot star heart fire thumbs up party sunglasses crying laughing angry",
)


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer pipeline with a small vocabulary: every byte (plain and word-final) plus BPE merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    trainer = trainers.BpeTrainer(
        vocab_size=len(vocab) + 300,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    scratch = CLIPTokenizer(vocab=dict(vocab), merges=[])
    scratch.backend_tokenizer.train_from_iterator(list(_CORPUS) * 4, trainer)
    trained = json.loads(scratch.backend_tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH
    )


def save_clip_tokenizer(tokenizer: CLIPTokenizer, path: Path) -> None:
    """Save in the hub's CLIP layout: vocab.json, merges.txt and tokenizer_config.json (no tokenizer.json)."""
    path = Path(path)
    tokenizer.save_pretrained(path)
    model = json.loads((path / "tokenizer.json").read_text("utf-8"))["model"]
    (path / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), "utf-8")
    merges = "".join(" ".join(m) + "\n" for m in model["merges"])
    (path / "merges.txt").write_text("#version: 0.2\n" + merges, "utf-8")
    (path / "tokenizer.json").unlink()


def _tiny_clip_text_model(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=CLIP_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def _tiny_vae(seed: int, sample_size: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
    )


def build_tiny_vae(path: Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """A tiny AutoencoderKL (8x downsampling, 4 latent channels, scaling_factor 0.18215) saved at ``path``."""
    path = Path(path)
    _tiny_vae(seed, sample_size).save_pretrained(path)
    return path


def build_tiny_clip(path: Path, *, seed: int = 0) -> Path:
    """A tiny CLIPTextModel (hidden size 32, 77 positions) and its tokenizer, both saved in ``path``."""
    path = Path(path)
    tokenizer = _tiny_clip_tokenizer()
    _tiny_clip_text_model(tokenizer, seed).save_pretrained(path)
    save_clip_tokenizer(tokenizer, path)
    return path


def build_tiny_sd(path: Path, *, seed: int = 0, sample_size: int = 8) -> Path:
    """A Stable Diffusion folder with tiny components; ``sample_size`` is the UNet's latent size."""
    path = Path(path)
    tokenizer = _tiny_clip_tokenizer()
    text_encoder = _tiny_clip_text_model(tokenizer, seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=CLIP_HIDDEN,
    )
    scheduler = PNDMScheduler(  # as CompVis/stable-diffusion-v1-4 ships it
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(seed, sample_size * 8),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    save_clip_tokenizer(tokenizer, path / "tokenizer")
    return path
