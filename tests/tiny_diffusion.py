"""Tiny from-scratch UNet configs, a learnable synthetic set of cached pairs, and training configs shared
by the training, checkpoint and sampling tests."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from sd_core.diffusion.models import ModelConfig
from sd_core.diffusion.unet import UNetConfig
from sd_core.encode.pairs import CachedPairs, Pairs
from sd_core.training.config import TrainConfig


def tiny_unet_config(context_dim: int = 16, **overrides: Any) -> UNetConfig:
    """h_dim 32, 8 groups, one layer per block, a 64-wide time MLP: about 0.4 M parameters."""
    return UNetConfig(**{
        "h_dim": 32, "n_heads": 4, "groups": 8, "context_dim": context_dim, "time_mlp_dim": 64,
        "layers_per_block": 1, **overrides,
    })


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """A short run on ``synthetic_pairs()`` (40 items, latents 4×8×8, text 8×16)."""
    base: dict[str, Any] = {
        "steps": 20, "batch_size": 8, "lr": 1e-3, "lr_min": 1e-4, "val_every": 1000, "save_every": 1000,
        "model": ModelConfig(unet=tiny_unet_config()),
    }
    return TrainConfig(**{**base, **overrides})


def synthetic_pairs(n: int = 40, *, latent_size: int = 8, tokens: int = 8, dim: int = 16, classes: int = 4,
                    seed: int = 0, flip: bool = False) -> Pairs:
    """A learnable toy data set: ``classes`` latent patterns, each with its own caption embedding.

    Item ``i`` belongs to class ``i % classes``; its latent mean is the class pattern plus a little noise,
    and its text is the class embedding over a per-item number of real tokens. With ``flip`` the mirrored
    latents are the patterns flipped left to right.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 4, latent_size, latent_size, generator=g) * 4.0  # (K, 4, h, w)
    words = torch.randn(classes, tokens, dim, generator=g)  # (K, T, D)
    cls = torch.arange(n) % classes
    mean = patterns[cls] + 0.1 * torch.randn(n, 4, latent_size, latent_size, generator=g)
    std = torch.full_like(mean, 0.05)
    lengths = torch.randint(2, tokens + 1, (n,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()  # (N, T)
    text = (words[cls] * mask[:, :, None]).half()
    empty_mask = torch.zeros(tokens, dtype=torch.long)
    empty_mask[0] = 1
    empty_text = torch.zeros(tokens, dim)
    empty_text[0] = torch.randn(dim, generator=g)
    return Pairs(
        ids=[hashlib.md5(f"{seed}-{i}".encode()).hexdigest() for i in range(n)],
        mean=mean, std=std, text=text, mask=mask, empty_text=empty_text, empty_mask=empty_mask,
        mean_flip=mean.flip(3) if flip else None, std_flip=std.flip(3) if flip else None,
        captions=[f"class {int(c)} emoji" for c in cls],
    )


def stored_pairs(root: Path, pairs: Pairs, *, shard_size: int) -> CachedPairs:
    """``pairs`` in the encode stage's own stores under ``root`` (written the first time, in shards of
    ``shard_size`` entries), read back as the train stage reads them: a source with one group per shard."""
    from sd_core.store.tensors import TensorStore

    latents = TensorStore(Path(root) / "latents", shard_size=shard_size)
    texts = TensorStore(Path(root) / "text", shard_size=shard_size)
    lkeys = [{"kind": "latent", "md5": i} for i in pairs.ids]
    tkeys = [{"kind": "text", "md5": i} for i in pairs.ids]
    empty = {"kind": "text", "md5": ""}
    if not len(latents):
        flips = ("mean_flip", "std_flip") if pairs.flipped else ()
        latents.put([(k, {n: getattr(pairs, n)[i] for n in ("mean", "std", *flips)}) for i, k in enumerate(lkeys)])
        texts.put([(k, {"last_hidden_state": pairs.text[i], "attention_mask": pairs.mask[i]})
                   for i, k in enumerate(tkeys)])
        texts.put([(empty, {"last_hidden_state": pairs.empty_text.half(), "attention_mask": pairs.empty_mask})])
    return CachedPairs(latents, texts, ids=pairs.ids, captions=pairs.captions, latent_keys=lkeys, text_keys=tkeys,
                       empty_key=empty, scaling_factor=pairs.scaling_factor)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: these models are too small to gain from two, and on a busy 2-core
    machine two spinning OpenMP threads made each step up to 80× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
