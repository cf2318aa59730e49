from __future__ import annotations

import json

import pytest
import torch
from imagegen import emoji
from PIL import Image

from sd_core.encode.encoders import VAEConfig, encode_images, latent_key, load_vae, vae_info
from sd_core.store.tensors import TensorStore
from sd_core.vae.train import LOSS_PNG, METRICS_JSON, RECONSTRUCTIONS_PNG, VAETrainConfig, train_vae

TINY = VAETrainConfig(
    steps=30, batch_size=8, lr=3e-3, warmup_steps=3, block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
    resolution=32, holdout=0.125, grid_images=4,
)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_images")
    colors = [(250, 200, 40), (90, 160, 250), (240, 120, 160), (120, 220, 150)]
    paths = []
    for i in range(16):
        img = emoji(colors[i % 4], size=48, shape="circle" if i % 2 else "square", mark=i)
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.split()[3])
        path = root / f"{i:02d}.jpg"
        canvas.save(path, quality=95)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def trained(image_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_out") / "vae"
    return out, train_vae(TINY, image_paths, out, progress=False)


def test_tiny_run_saves_a_loadable_vae(trained, image_paths, tmp_path):
    from diffusers import AutoencoderKL

    out, metrics = trained
    vae = AutoencoderKL.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(metrics["scaling_factor"])
    assert config["scaling_factor"] != pytest.approx(0.18215)
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["latent_shape"] == [4, 4, 4]
    assert (metrics["train_images"], metrics["heldout_images"]) == (14, 2)
    assert metrics["heldout_psnr_db"] is not None and metrics["train_psnr_db"] > 8
    for name in (RECONSTRUCTIONS_PNG, LOSS_PNG, METRICS_JSON):
        assert (out / name).stat().st_size > 0
    with Image.open(out / RECONSTRUCTIONS_PNG) as grid:
        assert grid.width == 2 * grid.height, "4 originals above their 4 reconstructions"
    assert not list(out.parent.glob(".vae.*")), "no partial folder left"

    store = TensorStore(tmp_path / "cache")
    cfg = VAEConfig(model_id=str(out), resolution=32)
    summary = encode_images(cfg, [(f"{i:032x}", p) for i, p in enumerate(image_paths[:3])], store, progress=False)
    assert summary.encoded == 3
    key = latent_key(cfg, f"{0:032x}")
    assert key["scaling_factor"] == pytest.approx(metrics["scaling_factor"]) == vae_info(cfg).scaling_factor
    assert store.get(key)["mean"].shape == (4, 4, 4)
    assert load_vae(cfg).config.scaling_factor == pytest.approx(metrics["scaling_factor"])


def test_scaled_latents_have_unit_std(trained, image_paths):
    from sd_core.vae.train import _load_uint8, _to_float

    out, metrics = trained
    vae = load_vae(VAEConfig(model_id=str(out), resolution=32))
    x = _to_float(_load_uint8(image_paths, 32))
    with torch.inference_mode():
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    assert 0.7 < float(z.std()) < 1.3


def test_deterministic_for_a_seed(trained, image_paths, tmp_path):
    out, metrics = trained
    cfg = TINY.model_copy(update={"steps": 4, "warmup_steps": 1})
    a = train_vae(cfg, image_paths, tmp_path / "a", progress=False)
    b = train_vae(cfg, image_paths, tmp_path / "b", progress=False)
    assert a["loss_last"] == b["loss_last"] and a["scaling_factor"] == b["scaling_factor"]
    assert (tmp_path / "a" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tmp_path / "b" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    c = train_vae(cfg.model_copy(update={"seed": 1}), image_paths, tmp_path / "a", progress=False)
    assert c["loss_last"] != a["loss_last"], "retraining replaces the folder"
    assert json.loads((tmp_path / "a" / METRICS_JSON).read_text())["config"]["seed"] == 1


def test_config_checks():
    with pytest.raises(ValueError):
        VAETrainConfig(stepz=3)
    from sd_core.vae.train import build_vae

    with pytest.raises(ValueError):
        build_vae(VAETrainConfig(block_out_channels=(8, 12), norm_num_groups=8))
    with pytest.raises(ValueError):
        build_vae(VAETrainConfig(resolution=36))
