"""A small data directory with a champion, as the pipeline leaves it, for the card, push and app tests.

Real demo emoji (Noto glyphs converted to JPEG) captioned by the offline captioner, a from-scratch export of a
tiny random UNet with a tiny CLIP and VAE (64 px images) written by the exporter, the run's plan, and a real
eval stage run (offline captioner, no FID/CLIP weights) that scores it, makes it the champion, writes
``models/evaluations.csv`` and the model card.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from tiny_diffusion import tiny_train_config, tiny_unet_config
from tiny_models import CLIP_HIDDEN, build_tiny_clip, build_tiny_vae

from sd_core.caption.config import CaptionConfig
from sd_core.caption.offline import OfflineCaptioner
from sd_core.demo.emoji_art import build_demo_items
from sd_core.diffusion.export import write_scratch_export
from sd_core.diffusion.models import ModelConfig, build_unet
from sd_core.diffusion.schedulers import ScheduleConfig
from sd_core.encode.encoders import TextEncoderConfig, VAEConfig
from sd_core.eval.config import EvalConfig
from sd_core.eval.stage import run_eval
from sd_core.ingest.convert import ConvertConfig, to_rgb_jpeg
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, md5_bytes, sha256_text
from sd_core.store.metadata import update_metadata, write_metadata

VAL_FRACTION = 0.25
RUN = "run-tiny"


def tiny_served_data_dir(root: Path) -> Catalog:
    """:func:`build_served_data_dir` at ``root / "data"``, with a tiny CLIP text encoder and a tiny VAE (64 px)
    built under ``root``."""
    text = TextEncoderConfig(model_id=str(build_tiny_clip(root / "clip")))
    vae = VAEConfig(model_id=str(build_tiny_vae(root / "vae", sample_size=64)))
    return build_served_data_dir(root / "data", text, vae)


def build_served_data_dir(root: Path, text: TextEncoderConfig, vae: VAEConfig, *, n: int = 16) -> Catalog:
    catalog = Catalog(root)
    catalog.images_dir.mkdir(parents=True, exist_ok=True)
    unique = {md5_bytes(item.body): item for item in reversed(build_demo_items(n + 8, seed=5))}  # re-uploads out
    items = list(reversed(unique.values()))[:n]
    images, rows = [], []
    for i, item in enumerate(items):
        jpeg = to_rgb_jpeg(item.body, ConvertConfig()).jpeg
        name = f"Blobs_{i + 1:07d}.jpg"
        (catalog.images_dir / name).write_bytes(jpeg)
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        images.append(image)
        rows.append({"file_name": catalog.image_file_name(name), "image_url": f"http://127.0.0.1:8765{item.path}",
                     "image_title": item.title, "tag": "Blobs", "md5": md5_bytes(item.body), "width": image.width,
                     "height": image.height, "source_format": "PNG", "animated": False})
    write_metadata(catalog, rows)
    captions = OfflineCaptioner().caption(images, [r["image_title"] for r in rows])
    for row, caption in zip(rows, captions):
        row["prompt"] = caption
        catalog.caption_sidecar(row["file_name"]).write_text(caption, "utf-8")
    update_metadata(catalog, {r["md5"]: {"prompt": r["prompt"], "captioner": "offline", "caption_flagged": False}
                              for r in rows})

    run = catalog.run_dir(RUN)
    unet = build_unet(ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN, zero_init_out=False)), sample_size=8)
    train_cfg = tiny_train_config(steps=3, val_fraction=VAL_FRACTION,
                                  model=ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN)))
    write_scratch_export(run / "model", unet=unet, vae_cfg=vae, text_cfg=text, schedule=ScheduleConfig(),
                         manifest={"step": 3, "train_config": train_cfg.model_dump(mode="json"), "items": n,
                                   "latent_shape": [4, 8, 8], "scaling_factor": 0.18215})
    atomic_write_json(run / "plan.json", {"key": "tiny", "kind": "fresh", "steps": 3,
                                          "items": [[r["md5"], sha256_text(r["prompt"])[:16]] for r in rows]})
    atomic_write_json(catalog.latest_run_json, {"run": RUN, "key": "tiny"})
    run_eval(EvalConfig(items=4, seeds_per_item=1, steps=2, batch_size=8, loss_timesteps=2, grid_items=2,
                        features=None, clip_model=None),
             CaptionConfig(captioner="offline"), catalog, val_fraction=VAL_FRACTION, split_seed=train_cfg.split_seed)
    return catalog
