"""Tests for sd_core.caption: config, caption checks, the offline captioner and a tiny Qwen2.5-VL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from pydantic import ValidationError

from sd_core.caption.captioners import CaptionResult, caption_batch
from sd_core.caption.config import CaptionConfig
from sd_core.caption.offline import OfflineCaptioner, color_name
from sd_core.caption.qwen import QwenCaptioner, vision_inputs
from sd_core.caption.template import clean_caption, render_prompt, validate_caption

PEPE = (
    "Pepe the frog emoji with a round head, big eyes, smiling mouth, happy expression, "
    "green skin color, no action, with a green background."
)


def circle(fill: tuple[int, int, int], background: tuple[int, int, int], size: int = 128) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    margin = size // 8
    ImageDraw.Draw(image).ellipse([margin, margin, size - margin - 1, size - margin - 1], fill=fill)
    return image


def square(fill: tuple[int, int, int], background: tuple[int, int, int], size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    margin = size // 6
    ImageDraw.Draw(image).rectangle([margin, margin, size - margin - 1, size - margin - 1], fill=fill)
    return image


@pytest.fixture(scope="session")
def tiny_cfg(tiny_qwen_dir: Path) -> CaptionConfig:
    return CaptionConfig(model_id=str(tiny_qwen_dir), max_new_tokens=12, dtype="float32")


@pytest.fixture()
def qwen(tiny_cfg: CaptionConfig) -> QwenCaptioner:
    return QwenCaptioner.from_config(tiny_cfg)


@pytest.fixture(scope="session")
def emoji() -> tuple[list[Image.Image], list[str]]:
    images = [
        circle((255, 204, 77), (255, 255, 255), size=32),
        circle((255, 0, 0), (255, 255, 255), size=128),
        square((0, 0, 255), (0, 160, 0), size=72),
    ]
    return images, ["Happy Blob", "red_ball", "Blob Wave"]


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_and_cache_key() -> None:
    cfg = CaptionConfig()
    assert cfg.model_id == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert cfg.max_new_tokens == 128 and cfg.batch_size == 8
    assert cfg.min_pixels == 112 * 112 and cfg.max_pixels == 224 * 224
    key = cfg.cache_key()
    assert key["captioner"] == "qwen" and key["model_id"] == cfg.model_id and key["prompt_version"] == "v1"
    assert cfg.cache_digest() == CaptionConfig().cache_digest()
    changed = CaptionConfig(prompt_template=cfg.prompt_template + " Be brief.")
    assert changed.cache_key()["prompt_sha"] != key["prompt_sha"]
    assert changed.cache_digest() != cfg.cache_digest()
    assert CaptionConfig(captioner="offline").cache_key()["captioner"] == "offline"


def test_bad_config_field_is_named() -> None:
    with pytest.raises(ValidationError, match="captoner"):
        CaptionConfig(captoner="x")
    with pytest.raises(ValidationError, match="captioner"):
        CaptionConfig(captioner="llava")
    with pytest.raises(ValidationError, match="title"):
        CaptionConfig(prompt_template="Describe this emoji.")
    with pytest.raises(ValidationError, match="frozen"):
        CaptionConfig().batch_size = 2  # type: ignore[misc]


def test_prompt_names_the_title_and_template() -> None:
    prompt = render_prompt(CaptionConfig().prompt_template, ":party_parrot:")
    assert "'party parrot'" in prompt
    assert "{head shape}" in prompt and "Pepe the frog emoji with a round head" in prompt
    assert "{title}" not in prompt
    strict = render_prompt(CaptionConfig().prompt_template, "Blob {x}", strict=True)
    assert strict.endswith("the skin color and the background.") and "'Blob {x} emoji with a'" in strict


# --- cleaning and validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (f'"{PEPE}"', PEPE),
        (f"\u201c{PEPE}\u201d", PEPE),
        (f"Caption: {PEPE}", PEPE),
        (f"  '{PEPE[:-1]}'.\n", PEPE),
        ("Pepe emoji with a round head,\n  big eyes", "Pepe emoji with a round head, big eyes."),
        ("Answer: \"A frog,\"", "A frog."),
        ("", ""),
    ],
)
def test_clean_caption(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_validate_caption_accepts_template_shape() -> None:
    assert validate_caption(PEPE, "Pepe the Frog") is None
    assert validate_caption(PEPE, "pepe") is None
    assert validate_caption(PEPE.replace("Pepe the frog", "Pepe"), "Pepe the Frog") is None
    assert validate_caption(PEPE.replace("Pepe the frog", "blob wave"), ":blob_wave:") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("Pepe emoji.", "too short"),
        (PEPE + " " + "x" * 400, "too long"),
        (PEPE.replace("Pepe the frog", "A frog"), "does not start with the title"),
        (PEPE.replace("skin color", "skin tone"), "missing 'skin color'"),
        ("Pepe the frog, a cartoon frog with big eyes and a smile on a green card.", "missing 'emoji with a'"),
    ],
)
def test_validate_caption_reasons(text: str, reason: str) -> None:
    result = validate_caption(text, "Pepe the Frog")
    assert result is not None and reason in result


# --- offline captioner -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((255, 0, 0), "red"),
        ((255, 204, 77), "yellow"),
        ((244, 144, 12), "orange"),
        ((255, 105, 180), "pink"),
        ((128, 0, 128), "purple"),
        ((0, 0, 255), "blue"),
        ((0, 160, 0), "green"),
        ((139, 69, 19), "brown"),
        ((10, 10, 10), "black"),
        ((255, 255, 255), "white"),
        ((128, 128, 128), "gray"),
    ],
)
def test_color_names(rgb: tuple[int, int, int], name: str) -> None:
    assert color_name(rgb) == name


def test_offline_red_circle_on_white() -> None:
    [text] = OfflineCaptioner().caption([circle((255, 0, 0), (255, 255, 255))], ["Red Ball"])
    assert text.startswith("Red Ball emoji with a round head")
    assert "red skin color" in text and "white background" in text
    assert "neutral expression" in text and "no action" in text
    assert validate_caption(text, "Red Ball") is None


def test_offline_blue_square_on_green_with_title_words() -> None:
    captioner = OfflineCaptioner()
    [text] = captioner.caption([square((0, 0, 255), (0, 160, 0))], ["Blob Wave"])
    assert "square head" in text and "blue skin color" in text and "green background" in text
    assert "waving" in text
    assert validate_caption(text, "Blob Wave") is None
    assert "waving" in captioner.caption([square((0, 0, 255), (0, 160, 0))], ["blobwave"])[0]
    assert (captioner.calls, captioner.items) == (2, 2)


def test_offline_expressions_transparency_and_determinism() -> None:
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse([8, 8, 55, 55], fill=(255, 204, 77, 255))
    titles = [":laughing_blob:", "sad_cat", "AngryFace", "thinking", "heart eyes", "peepoWink"]
    captions = OfflineCaptioner().caption([rgba] * len(titles), titles)
    assert all(validate_caption(c, t) is None for c, t in zip(captions, titles))
    assert all("yellow skin color" in c and "white background" in c for c in captions)
    for caption, word in zip(captions, ["laughing", "sad", "angry", "thinking", "loving", "playful"]):
        assert f"{word} expression" in caption
    assert captions == OfflineCaptioner().caption([rgba] * len(titles), titles)
    [blank] = OfflineCaptioner().caption([Image.new("RGB", (20, 20), "white")], ["Nothing"])
    assert validate_caption(blank, "Nothing") is None


# --- tiny Qwen2.5-VL ---------------------------------------------------------------------------------


def test_qwen_loads_through_from_pretrained(qwen: QwenCaptioner, tiny_cfg: CaptionConfig) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    assert isinstance(qwen.model, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(qwen.processor, Qwen2_5_VLProcessor)
    assert qwen.processor.tokenizer.padding_side == "left"
    assert qwen.model.dtype == torch.float32
    assert qwen.source == f"qwen:{tiny_cfg.model_id}"


def test_qwen_batched_generation_and_fallback(
    qwen: QwenCaptioner, emoji: tuple[list[Image.Image], list[str]]
) -> None:
    images, titles = emoji
    raw = qwen.caption(images, titles)
    assert len(raw) == 3 and all(isinstance(text, str) and text for text in raw)
    assert (qwen.calls, qwen.items) == (1, 3)

    qwen.calls = qwen.items = 0
    fallback = OfflineCaptioner()
    results = caption_batch(qwen, fallback, images, titles)
    assert (qwen.calls, qwen.items) == (2, 6)
    assert (fallback.calls, fallback.items) == (1, 3)
    assert all(isinstance(r, CaptionResult) for r in results)
    assert all(r.flagged and r.reason and r.source == "offline" for r in results)
    assert all(validate_caption(r.text, t) is None for r, t in zip(results, titles))
    assert "waving" in results[2].text and "blue skin color" in results[2].text


def test_vision_inputs_sizes(qwen: QwenCaptioner, emoji: tuple[list[Image.Image], list[str]]) -> None:
    images, _ = emoji
    images = [*images, Image.new("RGB", (400, 300), "white")]
    conversations = [qwen.messages(image, "Blob") for image in images]
    resized = vision_inputs(conversations)
    assert [image.size for image in resized] == [(112, 112), (140, 140), (112, 112), (252, 168)]
    texts = qwen.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    assert texts[0].count("<|image_pad|>") == 1 and texts[0].endswith("<|im_start|>assistant\n")
    inputs = qwen.inputs(images, ["Blob"] * 4)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 10, 10], [1, 8, 8], [1, 12, 18]]
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    assert lengths[1] - lengths[0] == (100 - 64) // 4
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][0, -1] == 1


def test_qwen_batched_equals_one_at_a_time(
    qwen: QwenCaptioner, emoji: tuple[list[Image.Image], list[str]]
) -> None:
    images, titles = emoji
    batched = qwen.caption(images, titles)
    single = [qwen.caption([image], [title])[0] for image, title in zip(images, titles)]
    assert qwen.calls == 4
    assert batched == single


def test_qwen_batches_by_batch_size(tiny_cfg: CaptionConfig, emoji: tuple[list[Image.Image], list[str]]) -> None:
    captioner = QwenCaptioner.from_config(tiny_cfg.model_copy(update={"batch_size": 2}))
    images, titles = emoji
    assert len(captioner.caption(images, titles)) == 3
    assert (captioner.calls, captioner.items) == (2, 3)


def test_caption_batch_passes_good_captions_through(emoji: tuple[list[Image.Image], list[str]]) -> None:
    images, titles = emoji
    offline = OfflineCaptioner()
    results = caption_batch(offline, OfflineCaptioner(), images, titles)
    assert offline.calls == 1
    assert [r.flagged for r in results] == [False, False, False]
    assert all(r.source == "offline" and r.reason is None for r in results)
