"""Prompts a model's own data can express: captions of the held-out side of its training split.

Where no prompt is given, ``emoji-sd sample``, the sample stage and the trainer's validation grids draw these
instead of fixed example prompts, so that a demo shows prompts in the words its captions use. The split is
the trainer's (:func:`~sd_core.encode.pairs.split_ids` over the items' md5 with ``val_fraction`` and
``split_seed`` and its ``min_items``), so these are prompts the model never trained on; the pick among them is fixed by ``seed``
in the eval stage's way (a hash of ``(md5, seed)``), so it stays the same as the collection grows.
"""

from __future__ import annotations

from typing import Sequence

from sd_core.encode.pairs import split_ids
from sd_core.store.catalog import Catalog
from sd_core.store.files import stable_hash
from sd_core.store.metadata import read_metadata


def pick_held_out(ids: Sequence[str], captions: Sequence[str], *, val_fraction: float, split_seed: int, n: int,
                  seed: int = 0, min_items: int = 0) -> list[str]:
    """Up to ``n`` distinct captions of the held-out items, in dataset order (empty without a held-out split)."""
    if n <= 0 or not ids:
        return []
    _, held = split_ids(list(ids), val_fraction, split_seed, min_items)
    ranked = sorted(held, key=lambda i: stable_hash({"md5": ids[i], "seed": seed}))
    chosen: list[int] = []
    seen: set[str] = set()
    for i in ranked:
        text = captions[i].strip()
        if text and text not in seen:
            seen.add(text)
            chosen.append(i)
        if len(chosen) == n:
            break
    return [captions[i].strip() for i in sorted(chosen)]


def held_out_prompts(catalog: Catalog, *, val_fraction: float, split_seed: int, n: int,
                     seed: int = 0, min_items: int = 0) -> list[str]:
    """:func:`pick_held_out` over the data directory's metadata.csv (``prompt`` is the caption)."""
    rows = read_metadata(catalog) if catalog.metadata_csv.exists() else []
    return pick_held_out([r["md5"] for r in rows], [r.get("prompt", "") for r in rows], val_fraction=val_fraction,
                         split_seed=split_seed, n=n, seed=seed, min_items=min_items)
