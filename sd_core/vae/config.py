"""Shape and schedule of the offline default VAE (pydantic only, no torch: see ``sd_core.vae.train``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sd_core.common.config_base import StrictModel


class VAETrainConfig(StrictModel):
    """Shape and schedule of the default VAE.

    ``kl_weight`` multiplies the KL summed over the latent per image divided by the pixel values per
    image, so it compares with the LDM/SD autoencoders' weight (1e-6 there) on a per-pixel loss.
    The defaults trained on 228 demo emoji in 145 s on 2 CPU cores to 19.8 dB PSNR on held-out
    images (an 8x8 bicubic thumbnail scores 17.9 dB); on a set this small, longer runs raise the
    training PSNR more than the held-out one.
    """

    steps: int = Field(450, ge=1, description="training steps (AdamW, gradient norm clipped to 1)")
    batch_size: int = Field(16, ge=1, description="images per step, each mirrored with probability 1/2")
    lr: float = Field(2e-3, gt=0, description="learning rate after the warm-up; it is held, then falls linearly to "
                      "10 % of it over the last fifth of the steps")
    warmup_steps: int = Field(20, ge=0, description="steps of linear learning-rate warm-up")
    kl_weight: float = Field(1e-4, ge=0, description="weight of the KL term, per pixel value (see above)")
    loss: Literal["l1", "mse", "l1+mse"] = Field("l1+mse", description="reconstruction loss: L1, MSE or their sum")
    block_out_channels: tuple[int, ...] = Field(
        (16, 32, 64, 64), description="channels of each level of the AutoencoderKL; n levels shrink the image "
        "2^(n-1) times a side (4 levels: 8 x 8 latents at 64 px)")
    layers_per_block: int = Field(1, ge=1, description="ResNet layers per level")
    norm_num_groups: int = Field(16, ge=1, description="GroupNorm groups; each of block_out_channels must be a "
                                 "multiple of it")
    latent_channels: int = Field(4, ge=1, description="channels of the latent")
    resolution: int = Field(64, ge=8, description="side in pixels the images are trained at; a multiple of the "
                            "downsampling")
    holdout: float = Field(0.05, ge=0, lt=1, description="share of images kept out of training to measure PSNR")
    grid_images: int = Field(8, ge=1, description="images in reconstructions.png (held-out ones first)")
    seed: int = Field(0, description="seed of the initial weights, the held-out split, the batches and the noise")

    @field_validator("block_out_channels")
    @classmethod
    def _blocks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("needs at least one block")
        return v

    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)
