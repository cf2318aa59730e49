"""Shape and schedule of the offline default VAE (pydantic only, no torch: see ``sd_core.vae.train``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sd_core.common.strict import StrictModel


class VAETrainConfig(StrictModel):
    """Shape and schedule of the default VAE.

    ``kl_weight`` multiplies the KL summed over the latent per image divided by the pixel values per
    image, so it compares with the LDM/SD autoencoders' weight (1e-6 there) on a per-pixel loss.
    The defaults trained on 228 demo emoji in 145 s on 2 CPU cores to 19.8 dB PSNR on held-out
    images (an 8x8 bicubic thumbnail scores 17.9 dB); on a set this small, longer runs raise the
    training PSNR more than the held-out one.
    """

    steps: int = Field(450, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    kl_weight: float = Field(1e-4, ge=0)
    loss: Literal["l1", "mse", "l1+mse"] = "l1+mse"
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    latent_channels: int = Field(4, ge=1)
    resolution: int = Field(64, ge=8)
    holdout: float = Field(0.05, ge=0, lt=1, description="share of images kept out of training to measure PSNR")
    grid_images: int = Field(8, ge=1)
    seed: int = 0

    @field_validator("block_out_channels")
    @classmethod
    def _blocks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("needs at least one block")
        return v

    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)
