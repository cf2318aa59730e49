"""Settings of the encode stage: the image VAE and the text encoder whose outputs are cached.

Pydantic models only, no torch, so loading a pipeline config never imports the encoders."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sd_core.common.strict import DType, StrictModel


class VAEConfig(StrictModel):
    """The image autoencoder and how images are fed to it."""

    model_id: str = "stabilityai/sd-vae-ft-mse"
    revision: str | None = None
    subfolder: str | None = None
    resolution: int = Field(64, ge=8, multiple_of=8)
    dtype: DType = "auto"
    batch_size: int = Field(32, ge=1)
    flip: bool = Field(False, description="also store latents of the horizontally mirrored image; training then "
                       "mirrors each item with probability 1/2")


class TextEncoderConfig(StrictModel):
    """The frozen text encoder whose last hidden states condition the UNet."""

    model_id: str = "openai/clip-vit-base-patch32"
    revision: str | None = None
    subfolder: str | None = None
    tokenizer_subfolder: str | None = None
    kind: Literal["clip", "auto"] = Field("clip", description="clip: CLIPTextModel; auto: transformers.AutoModel")
    max_length: int = Field(77, ge=2)
    batch_size: int = Field(64, ge=1)
    dtype: DType = "auto"


class EncodeStageConfig(StrictModel):
    """The image VAE and the text encoder whose outputs are cached for training."""

    vae: VAEConfig = VAEConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    shard_size: int = Field(256, ge=1, description="entries per safetensors shard")
