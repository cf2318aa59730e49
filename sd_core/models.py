"""The one factory for denoisers: a from-scratch :class:`EmojiUNet` or a pretrained diffusers UNet.

Both are ``nn.Module``s called the same way, ``denoiser(x, t, context, context_mask) -> eps``, so the
trainer, checkpoints and sampler never ask which kind they hold.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal

import torch
from pydantic import model_validator
from torch import nn

from sd_core.strict import StrictModel
from sd_core.unet import EmojiUNet, UNetConfig, count_parameters

__all__ = [
    "ModelConfig",
    "DiffusersDenoiser",
    "build_denoiser",
    "freeze_all_but_attn2",
    "load_pretrained_unet",
    "trainable_state",
    "load_trainable_state",
]

log = logging.getLogger(__name__)

ModelKind = Literal["scratch", "pretrained_attn2"]


class ModelConfig(StrictModel):
    """Which denoiser to train.

    * ``scratch``: an :class:`EmojiUNet` of shape ``unet`` (default: the seed's size).
    * ``pretrained_attn2``: the UNet of a Stable Diffusion pipeline (model id or local folder,
      subfolder ``unet``), every parameter frozen except the cross-attention (``attn2``) layers.
    """

    kind: ModelKind = "scratch"
    unet: UNetConfig | None = None
    pretrained_model_id: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_unet(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind", "scratch") == "scratch" and data.get("unet") is None:
            return {**data, "unet": UNetConfig()}
        return data

    @model_validator(mode="after")
    def _unet_only_for_scratch(self) -> "ModelConfig":
        if self.kind == "pretrained_attn2" and self.unet is not None:
            raise ValueError("unet: only for kind='scratch' (the pretrained UNet's shape comes with it)")
        return self


class DiffusersDenoiser(nn.Module):
    """``UNet2DConditionModel`` behind the ``(x, t, context, context_mask) -> eps`` interface.

    The text mask is not passed on: Stable Diffusion was trained, and its pipeline samples,
    attending every one of the 77 padded CLIP tokens.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample  # (B, 4, H, W)


def load_pretrained_unet(model_id: str, revision: str | None = None) -> nn.Module:
    """The ``unet`` subfolder of a diffusers pipeline (hub id or local folder), safetensors only."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        model_id, subfolder="unet", revision=revision, use_safetensors=True
    )


def freeze_all_but_attn2(unet: nn.Module) -> int:
    """Freeze every parameter whose name lacks ``attn2``; return the trainable count."""
    for name, p in unet.named_parameters():
        p.requires_grad_("attn2" in name)
    return count_parameters(unet, trainable_only=True)


def build_denoiser(config: ModelConfig, report: Callable[[str], None] | None = None) -> nn.Module:
    """Build the denoiser ``config`` describes (pretrained weights are loaded, attn2 left trainable)."""
    say = report or log.info
    if config.kind == "scratch":
        assert config.unet is not None
        model: nn.Module = EmojiUNet(config.unet)
    else:
        unet = load_pretrained_unet(config.pretrained_model_id, config.revision)
        freeze_all_but_attn2(unet)
        model = DiffusersDenoiser(unet)
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    say(f"{config.kind} denoiser: {trainable:,} trainable of {total:,} parameters")
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached trainable parameters by name (what checkpoints and EMA hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; the names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise KeyError(f"state does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
