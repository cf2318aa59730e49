"""Settings of the encode stage: the image VAE and the text encoder whose outputs are cached.

Pydantic models only, no torch, so loading a pipeline config never imports the encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, PrivateAttr

from sd_core.common.strict import DType, StrictModel

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

    model_id: str = "stabilityai/sd-vae-ft-mse"
    revision: str | None = None
    subfolder: str | None = None
    resolution: int = Field(64, ge=8, multiple_of=8)
    dtype: DType = "auto"
    batch_size: int = Field(32, ge=1)
    flip: bool = Field(False, description="also store latents of the horizontally mirrored image; training then "
                       "mirrors each item with probability 1/2")


class TextEncoderConfig(_ModelRef):
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
    shard_size: int = Field(256, ge=1, description="entries per safetensors shard; also the items of one encode "
                            "job, the unit the flow's task runner fans out")
