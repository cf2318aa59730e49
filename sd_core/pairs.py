"""What the trainer reads: cached (latent distribution, text embedding) pairs, and the train/val split.

The trainer never runs a VAE or a text encoder: a :class:`PairSource` hands it the VAE's latent
distribution parameters and the text encoder's hidden states, computed once by the encode stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = ["PairSource", "InMemoryPairs", "split_ids", "synthetic_pairs"]


@runtime_checkable
class PairSource(Protocol):
    """Indexable cached pairs. ``batch`` returns CPU tensors:

    * ``mean``, ``std``: (B, 4, h, w) unscaled latent distribution; a latent is ``(mean + std·ε) · scaling_factor``
    * ``text``: (B, T, D) text-encoder ``last_hidden_state``; ``mask``: (B, T), 1 = real token
    * optionally ``mean_flip``, ``std_flip``: (B, 4, h, w) of the horizontally mirrored image; the trainer
      then draws each training item mirrored with probability 1/2 (held-out items are never mirrored)
    """

    scaling_factor: float
    empty_text: torch.Tensor  # (T, D) embedding of "" (caption dropout, CFG)
    empty_mask: torch.Tensor  # (T,)

    def __len__(self) -> int: ...

    def ids(self) -> list[str]: ...

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...


@dataclass
class InMemoryPairs:
    """A :class:`PairSource` over tensors already in memory (tests, small data sets)."""

    item_ids: list[str]
    mean: torch.Tensor  # (N, 4, h, w)
    std: torch.Tensor  # (N, 4, h, w)
    text: torch.Tensor  # (N, T, D)
    mask: torch.Tensor  # (N, T)
    empty_text: torch.Tensor  # (T, D)
    empty_mask: torch.Tensor  # (T,)
    scaling_factor: float = 0.18215
    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("mean", "std", "text", "mask"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows, expected {n}")
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} differ")
        if self.empty_text.shape != self.text.shape[1:]:
            raise ValueError(f"empty_text must be {tuple(self.text.shape[1:])}, got {tuple(self.empty_text.shape)}")
        if self.empty_mask.shape != self.mask.shape[1:]:
            raise ValueError(f"empty_mask must be {tuple(self.mask.shape[1:])}, got {tuple(self.empty_mask.shape)}")

    def __len__(self) -> int:
        return len(self.item_ids)

    def ids(self) -> list[str]:
        return list(self.item_ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"mean": self.mean[idx], "std": self.std[idx], "text": self.text[idx], "mask": self.mask[idx]}


def _unit_hash(item_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, id)."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_ids(ids: Sequence[str], val_fraction: float, seed: int = 42) -> tuple[list[int], list[int]]:
    """Indices of the (train, val) split, each item placed by a hash of ``(seed, id)``.

    An item keeps its side of the split as the collection grows (no held-out item ever moves into
    training). When the fraction rounds to no item at all, the lowest-hash item is held out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    keys = [_unit_hash(i, seed) for i in ids]
    val = [i for i, k in enumerate(keys) if k < val_fraction]
    if val_fraction > 0 and not val and len(ids) >= 2:
        val = [min(range(len(ids)), key=keys.__getitem__)]
    held = set(val)
    return [i for i in range(len(ids)) if i not in held], val


def synthetic_pairs(
    n: int = 40,
    *,
    latent_size: int = 8,
    tokens: int = 8,
    dim: int = 16,
    classes: int = 4,
    seed: int = 0,
) -> InMemoryPairs:
    """A learnable toy data set: ``classes`` latent patterns, each with its own caption embedding.

    Item ``i`` belongs to class ``i % classes``; its latent mean is the class pattern plus a little
    noise, and its text is the class embedding over a per-item number of real tokens.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 4, latent_size, latent_size, generator=g) * 4.0  # (K, 4, h, w)
    words = torch.randn(classes, tokens, dim, generator=g)  # (K, T, D)
    cls = torch.arange(n) % classes
    mean = patterns[cls] + 0.1 * torch.randn(n, 4, latent_size, latent_size, generator=g)
    std = torch.full_like(mean, 0.05)
    lengths = torch.randint(2, tokens + 1, (n,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()  # (N, T)
    text = words[cls] * mask[:, :, None]
    empty_mask = torch.zeros(tokens, dtype=torch.long)
    empty_mask[0] = 1
    empty_text = torch.zeros(tokens, dim)
    empty_text[0] = torch.randn(dim, generator=g)
    return InMemoryPairs(
        item_ids=[hashlib.md5(f"{seed}-{i}".encode()).hexdigest() for i in range(n)],
        mean=mean,
        std=std,
        text=text,
        mask=mask,
        empty_text=empty_text,
        empty_mask=empty_mask,
        captions=[f"class {int(c)} emoji" for c in cls],
    )
