"""The one factory for the denoiser: a from-scratch ``UNet2DConditionModel`` or a pretrained one.

Every kind is the same diffusers class, called the same way (``unet(x_t, t, encoder_hidden_states=h).sample``),
so the trainer, checkpoints and exports never ask which one they hold; only which parameters train differs:

* ``scratch``: the seed's UNet (:class:`~sd_core.diffusion.unet.UNetConfig`), every parameter trains.
* ``pretrained_attn2``: a Stable Diffusion UNet (hub id or folder, subfolder ``unet``); only the
  cross-attention layers (parameters whose name contains ``attn2``) train, the seed's rule.
* ``pretrained_attn2_lora``: the same UNet, frozen, with peft LoRA adapters on the ``attn2`` projections
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``); only the adapters train.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from sd_core.diffusion.config import LoRAConfig, ModelConfig, ModelKind  # noqa: F401  (re-exported)
from sd_core.diffusion.schedulers import ScheduleConfig, training_scheduler

log = logging.getLogger(__name__)

ATTN2_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ATTN2_LORA_TARGETS = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_pretrained_unet(model_id: str, revision: str | None = None) -> Any:
    """The ``unet`` subfolder of a diffusers pipeline (hub id or local folder), safetensors only."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", revision=revision, use_safetensors=True)


def freeze_all_but_attn2(unet: nn.Module) -> int:
    """Freeze every parameter whose name lacks ``attn2``; return the trainable count."""
    for name, p in unet.named_parameters():
        p.requires_grad_("attn2" in name)
    return count_parameters(unet, trainable_only=True)


def add_attn2_lora(unet: Any, lora: LoRAConfig) -> int:
    """Freeze the UNet and add peft LoRA adapters to its attn2 projections; return the trainable count."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                init_lora_weights=True, target_modules=ATTN2_LORA_TARGETS))
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return count_parameters(unet, trainable_only=True)


def build_unet(config: ModelConfig, *, sample_size: int, latent_channels: int = 4, seed: int = 0,
               report: Callable[[str], None] | None = None) -> Any:
    """The UNet ``config`` describes, with exactly the parameters that train left trainable.

    A scratch model is initialised from ``seed`` (without touching the global RNG) for latents of
    ``latent_channels`` × side ``sample_size``; a pretrained one is loaded (its own shape is kept).
    """
    from diffusers import UNet2DConditionModel

    if config.kind == "scratch":
        assert config.unet is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**config.unet.diffusers_kwargs(sample_size, latent_channels))
        if config.unet.zero_init_out:
            nn.init.zeros_(unet.conv_out.weight)
            nn.init.zeros_(unet.conv_out.bias)
    else:
        unet = load_pretrained_unet(config.pretrained_model_id, config.revision)
        if config.kind == "pretrained_attn2":
            freeze_all_but_attn2(unet)
        else:
            assert config.lora is not None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                add_attn2_lora(unet, config.lora)
    total, trainable = count_parameters(unet), count_parameters(unet, trainable_only=True)
    (report or log.info)(f"{config.kind} UNet: {trainable:,} trainable of {total:,} parameters")
    return unet


def noise_scheduler(config: ModelConfig, schedule: ScheduleConfig) -> Any:
    """The training ``DDPMScheduler``: ``schedule`` for a scratch model, the base model's own otherwise."""
    if config.kind == "scratch":
        return training_scheduler(schedule)
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(config.pretrained_model_id, subfolder="scheduler", revision=config.revision)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached trainable parameters by name (what checkpoints and EMA hold)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; the names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise KeyError(f"state does not match the model: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(extra)[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def set_attention(unet: Any, backend: str) -> None:
    """Attention implementation: ``sdpa`` (PyTorch's fused kernels), ``math`` (diffusers' classic
    processor, the reference) or ``xformers`` (when installed)."""
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend not in ("sdpa", "math"):
        raise ValueError(f"unknown attention backend {backend!r}")
    unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
