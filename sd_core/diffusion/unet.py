"""The seed's from-scratch UNet, expressed as a ``diffusers.UNet2DConditionModel`` configuration.

The seed's design (``h = h_dim``, ``L = layers_per_block``):

* down:   conv-in; L × (res + spatial transformer) at h; stride-2 conv; L × res at 2h
* middle: res – transformer – res at 2h
* up:     (L + 1) × res at 2h, nearest ×2 + conv; (L + 1) × (res + transformer) at h, skips concatenated
* out:    GroupNorm, SiLU, conv3×3
* time:   sinusoid ``[cos, sin]`` → Linear → SiLU → Linear to ``time_mlp_dim`` (1280)

is exactly ``CrossAttnDownBlock2D, DownBlock2D / UNetMidBlock2DCrossAttn / UpBlock2D, CrossAttnUpBlock2D``
with ``block_out_channels = (h, 2h)``. The one difference: diffusers ties the sinusoid's width to
``block_out_channels[0]`` (256 at the seed size) where the seed used 320; at the seed size that is
72,911,620 parameters against the seed's 72,993,540 (81,920 fewer, all in the first time Linear).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sd_core.common.config_base import StrictModel

SEED_PARAMETERS = 72_993_540  # the seed's own count (with a 320-wide sinusoid)


class UNetConfig(StrictModel):
    """Shape of the from-scratch UNet. The defaults are the seed's size (73M parameters)."""

    in_channels: int | None = Field(None, ge=1, description="latent channels; None: the VAE's (4 for SD's)")
    out_channels: int | None = Field(None, ge=1, description="None: the VAE's latent channels (like in_channels)")
    h_dim: int = Field(256, ge=1, description="channels of the first level; the second has 2·h_dim")
    n_heads: int = Field(8, ge=1, description="attention heads at every level")
    context_dim: int = Field(512, ge=1, description="width of the text encoder's hidden states")
    groups: int = Field(32, ge=1, description="GroupNorm groups")
    layers_per_block: int = Field(2, ge=1, description="ResNet blocks per level on the way down (the way up has one "
                                  "more)")
    time_mlp_dim: int = Field(1280, ge=1, description="width of the timestep MLP (the seed's 1280)")
    norm_eps: float = Field(1e-5, gt=0, description="GroupNorm epsilon")
    text_time_embedding: bool = Field(
        False, description="add an attention-pooled summary of the text to the timestep embedding "
                           "(diffusers' addition_embed_type='text'): global attributes such as colour "
                           "then condition every ResNet block, not only the cross-attention layers")
    zero_init_out: bool = Field(True, description="start with a zero output conv (predicts ε = 0 at step 0)")

    @model_validator(mode="after")
    def _check_divisibility(self) -> "UNetConfig":
        if self.h_dim % self.n_heads:
            raise ValueError(f"h_dim ({self.h_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.h_dim % self.groups:
            raise ValueError(f"h_dim ({self.h_dim}) must be divisible by groups ({self.groups})")
        return self

    def diffusers_kwargs(self, sample_size: int, latent_channels: int = 4) -> dict[str, Any]:
        """Arguments of ``UNet2DConditionModel(**kwargs)`` for latents of ``latent_channels`` × side ``sample_size``
        (channels given in the config must be the latents')."""
        for name in ("in_channels", "out_channels"):
            given = getattr(self, name)
            if given is not None and given != latent_channels:
                raise ValueError(f"train.model.unet.{name} = {given}, but the VAE's latents have {latent_channels} "
                                 f"channels: leave it unset (it follows the VAE) or set {latent_channels}")
        h = self.h_dim
        kwargs: dict[str, Any] = dict(
            sample_size=sample_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(h, 2 * h),
            layers_per_block=self.layers_per_block,
            attention_head_dim=self.n_heads,  # diffusers' legacy name: the number of heads in SD 1.x configs
            cross_attention_dim=self.context_dim,
            norm_num_groups=self.groups,
            norm_eps=self.norm_eps,
            flip_sin_to_cos=True,
            freq_shift=0,
            time_embedding_dim=self.time_mlp_dim,
        )
        if self.text_time_embedding:
            kwargs.update(addition_embed_type="text", addition_embed_type_num_heads=self.n_heads)
        return kwargs
