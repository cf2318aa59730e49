"""The base class of every config model (`StrictModel`: unknown fields refused, values immutable) and the
config type of a model's dtype."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

DType = Literal["auto", "float32", "bfloat16", "float16"]  # a model's dtype in a config (see common.devices)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
