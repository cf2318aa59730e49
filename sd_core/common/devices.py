"""Where models run and in which dtype."""

from __future__ import annotations

import torch

from sd_core.common.config_base import DType  # noqa: F401  (re-exported)


def device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a config value: 'auto' is bfloat16 on CUDA and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype: str) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def transformers_dtype_arg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def diffusers_dtype_arg() -> str:
    """diffusers renamed ``from_pretrained(torch_dtype=)`` to ``dtype`` (0.42 warns on the old name)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def empty_device_cache() -> None:
    """Give cached GPU memory back between stages (a no-op on the CPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
