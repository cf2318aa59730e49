"""The Qwen2.5-VL captioner: batched greedy generation from the image and the filled-in prompt."""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Any, Sequence

from PIL import Image

from sd_core.caption.config import CaptionConfig
from sd_core.caption.template import render_prompt
from sd_core.common.devices import resolve_dtype, transformers_dtype_arg
from sd_core.common.images import flatten_rgb

logger = logging.getLogger(__name__)

@lru_cache(maxsize=1)
def torchvision_usable() -> bool:
    """Whether torchvision imports; transformers' video processor and qwen-vl-utils need it."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA wheel next to a CPU torch fails with RuntimeError, not ImportError
        return False
    return True


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`: sides divisible by `factor`, area within the pixel bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def vision_inputs(messages: list[list[dict[str, Any]]]) -> list[Image.Image]:
    """The resized images of a batch of conversations, as `process_vision_info` returns them.

    Uses qwen-vl-utils when it imports (it needs torchvision); otherwise applies the same
    flattening and `smart_resize` rule to the PIL images in the messages.
    """
    if torchvision_usable():
        from qwen_vl_utils import process_vision_info

        images, _ = process_vision_info(messages)
        return list(images or [])
    resized = []
    for conversation in messages:
        for message in conversation:
            for part in message["content"]:
                if isinstance(part, dict) and part.get("type") == "image":
                    image = flatten_rgb(part["image"])
                    height, width = _smart_resize(
                        image.height, image.width, 28, part.get("min_pixels", 4 * 28 * 28),
                        part.get("max_pixels", 16384 * 28 * 28),
                    )
                    resized.append(image.resize((width, height)))
    return resized


def _load_processor(cfg: CaptionConfig) -> Any:
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    # The pixel bounds go with each call (`QwenCaptioner.inputs`), not here: a hub-style
    # preprocessor_config.json's min_pixels/max_pixels override a `size=` given at load, and
    # min_pixels/max_pixels given at load leak into every call through the tokenizer's init
    # kwargs, where transformers 5.23 warns that they are deprecated.
    kwargs: dict[str, Any] = {}
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    if torchvision_usable():
        return AutoProcessor.from_pretrained(cfg.model_id, **kwargs)

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without its video processor, which cannot load without torchvision."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    logger.info("torchvision is unavailable: loading the Qwen2.5-VL processor without video support")
    return ImageOnlyQwen2_5_VLProcessor.from_pretrained(cfg.model_id, **kwargs)


class QwenCaptioner:
    """Batched greedy captioning with Qwen2.5-VL; counts generate calls and captioned items."""

    def __init__(self, model: Any, processor: Any, cfg: CaptionConfig) -> None:
        self.model = model
        self.processor = processor
        self.cfg = cfg
        self.source = f"qwen:{cfg.model_id}"
        self.calls = 0
        self.items = 0
        processor.tokenizer.padding_side = "left"

    @classmethod
    def from_config(cls, cfg: CaptionConfig) -> QwenCaptioner:
        """Load the model and processor named by `cfg` (hub id or local folder)."""
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        kwargs: dict[str, Any] = {transformers_dtype_arg(): resolve_dtype(cfg.dtype)}
        if cfg.revision is not None:
            kwargs["revision"] = cfg.revision
        device_map = cfg.device_map or ("auto" if torch.cuda.is_available() else None)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.model_id, **kwargs).eval()
        return cls(model, _load_processor(cfg), cfg)

    def messages(self, image: Image.Image, title: str, *, strict: bool = False) -> list[dict[str, Any]]:
        """One user turn holding the image and the filled-in prompt."""
        content = [
            {"type": "image", "image": image, "min_pixels": self.cfg.min_pixels, "max_pixels": self.cfg.max_pixels},
            {"type": "text", "text": render_prompt(self.cfg.prompt_template, title, strict=strict)},
        ]
        return [{"role": "user", "content": content}]

    def caption(self, images: Sequence[Image.Image], titles: Sequence[str], *, strict: bool = False) -> list[str]:
        """Raw decoded captions, generated `cfg.batch_size` items at a time."""
        if len(images) != len(titles):
            raise ValueError(f"{len(images)} images but {len(titles)} titles")
        out: list[str] = []
        step = self.cfg.batch_size
        for start in range(0, len(images), step):
            out.extend(self._generate(images[start : start + step], titles[start : start + step], strict))
        return out

    def inputs(self, images: Sequence[Image.Image], titles: Sequence[str], *, strict: bool = False) -> Any:
        """The left-padded model inputs for one batch, on the model's device."""
        conversations = [self.messages(image, title, strict=strict) for image, title in zip(images, titles)]
        texts = self.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        return self.processor(
            text=texts,
            images=vision_inputs(conversations),
            size={"shortest_edge": self.cfg.min_pixels, "longest_edge": self.cfg.max_pixels},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(self.model.device)

    def _generate(self, images: Sequence[Image.Image], titles: Sequence[str], strict: bool) -> list[str]:
        import torch

        inputs = self.inputs(images, titles, strict=strict)
        with torch.inference_mode():
            generated = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        self.calls += 1
        self.items += len(images)
        trimmed = generated[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
