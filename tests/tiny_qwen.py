"""Build a tiny random Qwen2.5-VL checkpoint on disk, laid out like the hub repo.

The folder holds what `Qwen/Qwen2.5-VL-3B-Instruct` holds, at toy size: `config.json`,
`generation_config.json` and safetensors weights, a byte-level BPE tokenizer carrying the
Qwen special tokens, `preprocessor_config.json` and `chat_template.jinja`. It loads through
the same `from_pretrained` calls as the real model. The weights are random, so generations
are nonsense, but they are deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template, as shipped with the Qwen2.5-VL instruct checkpoints.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_HIDDEN = 64
TEXT_HEADS = 4  # head_dim 16: rotary uses 8 frequencies, split 2/3/3 over (time, height, width)
VISION_HIDDEN = 32
VISION_HEADS = 2


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus the Qwen special tokens."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


def build_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """A two-layer text model and a two-block vision tower whose token ids match `tokenizer`."""
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 64,
        "num_heads": VISION_HEADS,
        "out_hidden_size": TEXT_HIDDEN,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint and its processor files into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config = GenerationConfig(
        bos_token_id=eos[1], eos_token_id=eos, pad_token_id=eos[1], do_sample=False
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)

    # Written the way the hub checkpoint has it: pixel bounds as min_pixels/max_pixels keys.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(path)
    preprocessor = path / "preprocessor_config.json"
    settings = json.loads(preprocessor.read_text())
    bounds = settings.pop("size")
    settings.update(
        min_pixels=bounds["shortest_edge"],
        max_pixels=bounds["longest_edge"],
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen2_5_VLProcessor",
    )
    preprocessor.write_text(json.dumps(settings, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def parameter_count(path: str | Path) -> int:
    """Number of parameters of the checkpoint at `path`."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    return sum(p.numel() for p in model.parameters())
