"""Sampling from a scratch export with a tiny VAE and a tiny CLIP text encoder loaded from folders."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from sd_core.encode import TextEncoderConfig, VAEConfig
from sd_core.sampling import SampleConfig, TextToImage, load_text_to_image, make_grid, sample_to_folder
from sd_core.train import EncoderRefs, TrainConfig, export_scratch
from sd_core.models import ModelConfig
from sd_core.unet import EmojiUNet
from tiny_diffusion import one_torch_thread, tiny_unet_config
from tiny_models import CLIP_HIDDEN, build_tiny_clip, build_tiny_vae

PROMPTS = ("grinning face emoji with a round head", "frog emoji with a wide head, sad expression")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch export whose config.json names a tiny CLIP and a tiny VAE (64 px images, 8×8 latents)."""
    root = tmp_path_factory.mktemp("models")
    clip, vae = build_tiny_clip(root / "clip"), build_tiny_vae(root / "vae", sample_size=64)
    unet_cfg = tiny_unet_config(context_dim=CLIP_HIDDEN, zero_init_out=False)  # random, prompt-dependent output
    torch.manual_seed(0)
    weights = EmojiUNet(unet_cfg).state_dict()
    export_scratch(
        root / "model",
        weights=weights,
        config=TrainConfig(model=ModelConfig(unet=unet_cfg)),
        encoders=EncoderRefs(text_encoder=TextEncoderConfig(model_id=str(clip)), vae=VAEConfig(model_id=str(vae))),
        scaling_factor=0.18215,
        latent_shape=(4, 8, 8),
        step=0,
    )
    return root / "model"


@pytest.fixture(scope="module")
def t2i(export: Path) -> TextToImage:
    return load_text_to_image(export)


def config(**kw: object) -> SampleConfig:
    base = dict(prompts=PROMPTS, steps=3, images_per_prompt=3, guidance_sweep=(0.0, 5.0), label_width=100)
    return SampleConfig(**{**base, **kw})


def as_array(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB")))  # (H, W, 3)


def test_sample_writes_images_grid_and_sweep(export: Path, tmp_path: Path) -> None:
    cfg = config()
    result = sample_to_folder(export, cfg, tmp_path)  # encoders loaded from the names in config.json
    assert len(result.images) == 2 and all(len(row) == 3 for row in result.images)
    assert all(img.size == (64, 64) and img.mode == "RGB" for row in result.images for img in row)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"p{p:02d}_seed{s}.png" for p in range(2) for s in range(3)
    ]
    with Image.open(result.grid) as grid:
        assert grid.size == (100 + 3 * 64, 18 + 2 * 64)
        cell = grid.crop((100 + 64, 18 + 64, 100 + 128, 18 + 128))
        assert as_array(cell).equal(as_array(result.images[1][1]))
    with Image.open(result.guidance_sweep) as sweep:
        assert sweep.size == (100 + 2 * 64, 18 + 2 * 64)
    assert (tmp_path / "samples.json").exists()


def test_same_seed_same_image_and_prompts_differ(t2i: TextToImage, tmp_path: Path) -> None:
    cfg = config(guidance_sweep=(), images_per_prompt=2)
    first = sample_to_folder(t2i, cfg, tmp_path / "a").images
    again = sample_to_folder(t2i, cfg.model_copy(update={"batch_size": 3}), tmp_path / "b").images
    for r in range(2):
        for c in range(2):
            # Another batch size changes the order of float sums, not the picture: a level or two in a few
            # channel values (seen here: ±1 in 1 of 12,288), never a different image.
            diff = (as_array(first[r][c]).int() - as_array(again[r][c]).int()).abs()
            assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01
    assert not as_array(first[0][0]).equal(as_array(first[1][0]))  # same seed, other prompt
    assert not as_array(first[0][0]).equal(as_array(first[0][1]))  # same prompt, other seed


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_both_schedulers_run(t2i: TextToImage, tmp_path: Path, scheduler: str) -> None:
    result = sample_to_folder(t2i, config(scheduler=scheduler, images_per_prompt=1, guidance_sweep=()), tmp_path)
    assert result.images[0][0].size == (64, 64)
    assert result.guidance_sweep is None


def test_guidance_changes_the_image(t2i: TextToImage, tmp_path: Path) -> None:
    result = sample_to_folder(t2i, config(images_per_prompt=1, guidance_sweep=(0.0, 1.0, 7.5)), tmp_path)
    with Image.open(result.guidance_sweep) as sweep:
        cells = [as_array(sweep.crop((100 + 64 * c, 18, 164 + 64 * c, 82))) for c in range(3)]
    assert not cells[0].equal(cells[1]) and not cells[1].equal(cells[2])
    assert cells[2].equal(as_array(result.images[0][0]))  # w = 7.5 is the grid's own guidance scale


def test_encoders_can_be_passed_as_objects(export: Path, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def text_encoder(prompts):  # (B, 5, 32), all tokens real
        calls.append(list(prompts))
        g = torch.Generator().manual_seed(len(prompts))
        return torch.randn(len(prompts), 5, CLIP_HIDDEN, generator=g), torch.ones(len(prompts), 5, dtype=torch.long)

    def decoder(latents):
        return [Image.new("RGB", (16, 16), (int(latents[i].abs().mean() * 50) % 256, 0, 0)) for i in range(len(latents))]

    result = sample_to_folder(export, config(guidance_sweep=()), tmp_path, text_encoder=text_encoder, decoder=decoder)
    assert calls == [[*PROMPTS, ""]]
    assert result.images[0][0].size == (16, 16)


def test_grid_layout_and_bad_input() -> None:
    imgs = [[Image.new("RGB", (10, 10), (r * 100, c * 100, 0)) for c in range(4)] for r in range(2)]
    grid = make_grid(imgs, ["a long prompt " * 10, "b"], ["1", "2", "3", "4"], cell_size=20, label_width=50, header_height=10)
    assert grid.size == (50 + 4 * 20, 10 + 2 * 20)
    assert grid.getpixel((50 + 2 * 20 + 5, 10 + 20 + 5)) == (100, 200, 0)
    with pytest.raises(ValueError, match="labels"):
        make_grid(imgs, ["only one"], ["1", "2", "3", "4"])


def test_unknown_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither"):
        load_text_to_image(tmp_path)


def test_trainer_draws_validation_grids_without_touching_its_randomness(export: Path, tmp_path: Path) -> None:
    from sd_core.pairs import synthetic_pairs
    from sd_core.sampling import validation_sampler
    from sd_core.train import Trainer, read_metrics
    from tiny_diffusion import tiny_train_config

    t2i = load_text_to_image(export)
    pairs = synthetic_pairs(40, tokens=77, dim=CLIP_HIDDEN)
    cfg = tiny_train_config(
        steps=4, sample_every=2, sample_prompts=PROMPTS, sample_seeds=(0, 1, 2),
        model=ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN)),
    )
    sampler = validation_sampler(t2i.text_encoder, t2i.decoder, cfg.schedule, (4, 8, 8), steps=2)
    with_grids = Trainer(cfg, pairs, tmp_path / "a", sampler=sampler, progress=False)
    with_grids.train()
    plain = Trainer(cfg, pairs, tmp_path / "b", progress=False)
    plain.train()

    grids = sorted((tmp_path / "a" / "samples").iterdir())
    assert [p.name for p in grids] == ["step-0000002.png", "step-0000004.png"]
    with Image.open(grids[-1]) as grid:
        assert grid.size == (220 + 3 * 64, 18 + 2 * 64)
    losses = lambda d: [r["train_loss"] for r in read_metrics(d / "metrics.csv")]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
