"""Captioning a batch: any captioner's raw text is cleaned and validated, failures are retried once
with a stricter prompt, and what still fails is replaced by the fallback's caption, flagged."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

from PIL import Image

from sd_core.caption.config import CaptionConfig
from sd_core.caption.offline import OfflineCaptioner
from sd_core.caption.template import clean_caption, validate_caption

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionResult:
    """One caption, where it came from, and why it was flagged if it was."""

    text: str
    source: str
    flagged: bool = False
    reason: str | None = None


class Captioner(Protocol):
    """Anything that turns emoji images and titles into raw caption strings."""

    source: str

    def caption(self, images: Sequence[Image.Image], titles: Sequence[str], *, strict: bool = False) -> list[str]:
        ...


def build_captioner(cfg: CaptionConfig) -> Captioner:
    """The captioner `cfg.captioner` names; loading Qwen weights may raise OSError when they are out of reach."""
    if cfg.captioner == "offline":
        return OfflineCaptioner()
    from sd_core.caption.qwen import QwenCaptioner

    return QwenCaptioner.from_config(cfg)


# --- batch with validation, retry and fallback ------------------------------------------------


def caption_batch(
    captioner: Captioner,
    fallback: Captioner,
    images: Sequence[Image.Image],
    titles: Sequence[str],
) -> list[CaptionResult]:
    """Caption, clean and validate; retry failures once in one batch, then fall back and flag."""
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if not images:
        return []
    texts = [clean_caption(t) for t in captioner.caption(images, titles)]
    reasons = [validate_caption(t, title) for t, title in zip(texts, titles)]

    failed = [i for i, reason in enumerate(reasons) if reason]
    if failed:
        # Decoding is greedy, so the retry asks with the stricter prompt rather than the same one.
        retried = captioner.caption([images[i] for i in failed], [titles[i] for i in failed], strict=True)
        for i, raw in zip(failed, retried):
            texts[i] = clean_caption(raw)
            reasons[i] = validate_caption(texts[i], titles[i])

    results = [CaptionResult(text, captioner.source) for text in texts]
    still = [i for i in failed if reasons[i]]
    if still:
        for i in still:
            logger.warning("caption for %r rejected (%s); using %s", titles[i], reasons[i], fallback.source)
        replacements = fallback.caption([images[i] for i in still], [titles[i] for i in still])
        for i, raw in zip(still, replacements):
            results[i] = CaptionResult(clean_caption(raw), fallback.source, flagged=True, reason=reasons[i])
    return results
