"""What the trainer reads: cached (latent distribution, text states) pairs, as contiguous tensors.

The trainer never runs a VAE or a text encoder. It reads, once per run, the VAE's latent distribution
(``mean``, ``std``; a latent is ``(mean + std·ε) · scaling_factor``) and the text encoder's hidden states
the encode stage cached, checking each entry's key as it loads it. :class:`Pairs` holds them in memory;
:class:`CachedPairs` is the view over the encode stage's stores that loads any subset (shard by shard,
so a data set larger than memory can be trained on in windows of shards).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:
    from sd_core.store.tensors import TensorStore

__all__ = ["Pairs", "PairSource", "CachedPairs", "split_ids", "split_marker"]

LATENT_NAMES = ("mean", "std")
FLIP_NAMES = ("mean_flip", "std_flip")


@dataclass
class Pairs:
    """Pairs in memory. ``mean``/``std`` (N, C, h, w) float32, ``text`` (N, T, D) as stored (float16),
    ``mask`` (N, T); optionally ``mean_flip``/``std_flip`` of the mirrored images."""

    ids: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor
    empty_text: torch.Tensor  # (T, D): the empty prompt, for caption dropout
    empty_mask: torch.Tensor  # (T,)
    scaling_factor: float = 0.18215
    mean_flip: torch.Tensor | None = None
    std_flip: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("mean", "std", "text", "mask", *FLIP_NAMES):
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} rows, expected {n}")
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} differ")
        if (self.mean_flip is None) != (self.std_flip is None):
            raise ValueError("mean_flip and std_flip come together")
        if self.empty_text.shape != self.text.shape[1:]:
            raise ValueError(f"empty_text must be {tuple(self.text.shape[1:])}, got {tuple(self.empty_text.shape)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    @property
    def flipped(self) -> bool:
        return self.mean_flip is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"mean": self.mean, "std": self.std, "text": self.text, "mask": self.mask}
        if self.mean_flip is not None and self.std_flip is not None:
            out.update(mean_flip=self.mean_flip, std_flip=self.std_flip)
        return out

    def select(self, rows: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """A batch: the tensors at ``rows`` (one ``index_select`` per tensor)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return {k: v.index_select(0, idx) for k, v in self.tensors().items()}

    # the PairSource interface: an in-memory set is one group, and loading is selecting
    def groups(self) -> list[list[int]]:
        return [list(range(len(self)))]

    def item_bytes(self) -> int:
        return sum(v[0].numel() * v.element_size() for v in self.tensors().values())

    def load(self, items: Sequence[int]) -> "Pairs":
        idx = torch.as_tensor(list(items), dtype=torch.long)
        sub = {k: v.index_select(0, idx) for k, v in self.tensors().items()}
        return Pairs(ids=[self.ids[i] for i in items], empty_text=self.empty_text, empty_mask=self.empty_mask,
                     scaling_factor=self.scaling_factor,
                     captions=[self.captions[i] for i in items] if self.captions else [], **sub)


@runtime_checkable
class PairSource(Protocol):
    """Pairs the trainer can load in parts: ``groups`` are item positions that load together cheaply
    (a latent shard), ``load`` returns the named items in memory, in that order."""

    ids: list[str]
    captions: list[str]
    empty_text: torch.Tensor
    empty_mask: torch.Tensor
    scaling_factor: float

    def __len__(self) -> int: ...

    @property
    def latent_shape(self) -> tuple[int, ...]: ...

    def groups(self) -> list[list[int]]: ...

    def item_bytes(self) -> int: ...

    def load(self, items: Sequence[int]) -> Pairs: ...


class CachedPairs:
    """The encode stage's stores seen as a :class:`PairSource` (keys checked once per load)."""

    def __init__(self, latents: TensorStore, texts: TensorStore, *, ids: Sequence[str],
                 captions: Sequence[str], latent_keys: Sequence[dict], text_keys: Sequence[dict],
                 empty_key: dict, scaling_factor: float) -> None:
        self.latents, self.texts = latents, texts
        self.ids, self.captions = list(ids), list(captions)
        self._lkeys, self._tkeys = list(latent_keys), list(text_keys)
        self.scaling_factor = scaling_factor
        missing, missing_text = latents.missing(self._lkeys), texts.missing(self._tkeys)
        if missing or missing_text:
            raise RuntimeError(f"{len(missing)} latents and {len(missing_text)} caption states are not cached "
                               "under the configured encoders: run the encode stage")
        try:
            (empty,) = texts.read_many([empty_key])
        except KeyError:
            raise RuntimeError("the empty prompt is not encoded: run the encode stage") from None
        self.empty_text, self.empty_mask = empty["last_hidden_state"].float(), empty["attention_mask"]
        (probe,) = latents.read_many(self._lkeys[:1]) if self._lkeys else [{}]
        self._flip = all(n in probe for n in FLIP_NAMES)
        self._probe = probe

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self._probe["mean"].shape)

    def groups(self) -> list[list[int]]:
        by_shard: dict[str, list[int]] = {}
        for i, key in enumerate(self._lkeys):
            by_shard.setdefault(self.latents.shard_of(key) or "", []).append(i)
        return list(by_shard.values())

    def item_bytes(self) -> int:
        lat = sum(v.numel() * 4 for k, v in self._probe.items() if k in (*LATENT_NAMES, *FLIP_NAMES))
        t, d = self.empty_text.shape
        return lat + t * d * 2 + t * 8

    def load(self, items: Sequence[int]) -> Pairs:
        items = list(items)
        names = [*LATENT_NAMES, *(FLIP_NAMES if self._flip else ())]
        lat = self.latents.read_many([self._lkeys[i] for i in items], names)
        txt = self.texts.read_many([self._tkeys[i] for i in items], ["last_hidden_state", "attention_mask"])

        def stack(rows: list[dict[str, torch.Tensor]], name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
            out = torch.stack([r[name] for r in rows]) if rows else torch.empty(0)
            return out if dtype is None else out.to(dtype)

        return Pairs(
            ids=[self.ids[i] for i in items], captions=[self.captions[i] for i in items],
            mean=stack(lat, "mean", torch.float32), std=stack(lat, "std", torch.float32),
            text=stack(txt, "last_hidden_state"), mask=stack(txt, "attention_mask"),
            mean_flip=stack(lat, "mean_flip", torch.float32) if self._flip else None,
            std_flip=stack(lat, "std_flip", torch.float32) if self._flip else None,
            empty_text=self.empty_text, empty_mask=self.empty_mask, scaling_factor=self.scaling_factor,
        )


def _unit_hash(item_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, id)."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


MAX_HELD_OUT_SHARE = 0.25  # ``min_items`` holds out only items whose hash is below this: training keeps ~3/4


def split_ids(ids: Sequence[str], val_fraction: float, seed: int = 42,
              min_items: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the (train, val) split, each item placed by a hash of ``(seed, id)`` in [0, 1).

    An item is held out when its hash is below ``val_fraction``, or (with ``val_fraction > 0``) when it is one
    of the ``min_items`` lowest hashes and below ``MAX_HELD_OUT_SHARE``: so at least ``min_items`` items are
    held out where the data set allows it, never much more than a quarter of it. The split never moves a
    trained item into the held-out side as the collection grows (adding items only raises an item's hash
    rank); an item held out only to reach ``min_items`` moves into training once enough lower hashes
    arrive, which keeps the evaluation honest (what is scored was never trained on). When the fraction
    rounds to no item at all, the lowest-hash item is held out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_items < 0:
        raise ValueError(f"min_items must be >= 0, got {min_items}")
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    keys = [_unit_hash(i, seed) for i in ids]
    held = {i for i, k in enumerate(keys) if k < val_fraction}
    if val_fraction > 0 and min_items > len(held):
        lowest = sorted(range(len(ids)), key=keys.__getitem__)[:min_items]
        held |= {i for i in lowest if keys[i] < MAX_HELD_OUT_SHARE}
    if val_fraction > 0 and not held and len(ids) >= 2:
        held = {min(range(len(ids)), key=keys.__getitem__)}
    return [i for i in range(len(ids)) if i not in held], sorted(held)


def split_marker(ids: Sequence[str], val_fraction: float, seed: int, min_items: int) -> dict[str, int]:
    """What a run key adds for the split: ``{}`` when ``min_items`` leaves the fraction's split as it is (so
    earlier run keys stay), else how many items it holds out (the held-out side is then that many
    lowest hashes, so this, the seed and the items fix the split)."""
    if val_fraction <= 0 or not min_items:
        return {}
    plain, held = split_ids(ids, val_fraction, seed)[1], split_ids(ids, val_fraction, seed, min_items)[1]
    return {} if held == plain else {"held_out_items": len(held)}
