"""Sampling from a from-scratch export: a StableDiffusionPipeline folder bundling a tiny CLIP and a tiny VAE.

`emoji-sd sample` and `StableDiffusionPipeline.from_pretrained(export)` draw the same image; a damaged or
foreign folder is refused with its name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tiny_diffusion import one_torch_thread, tiny_unet_config
from tiny_models import CLIP_HIDDEN, build_tiny_clip, build_tiny_vae

from sd_core.common.images import make_grid
from sd_core.diffusion.export import (MANIFEST, ModelFolderError, load_pipeline, model_digest, verify_export,
                                      write_scratch_export)
from sd_core.diffusion.generate import generate
from sd_core.diffusion.models import ModelConfig, build_unet
from sd_core.diffusion.schedulers import ScheduleConfig
from sd_core.encode.encoders import TextEncoderConfig, VAEConfig
from sd_core.sample.config import SampleConfig
from sd_core.sample.stage import sample_to_folder

PROMPTS = ("grinning face emoji with a round head", "frog emoji with a wide head, sad expression")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextEncoderConfig, VAEConfig]:
    root = tmp_path_factory.mktemp("encoders")
    return (TextEncoderConfig(model_id=str(build_tiny_clip(root / "clip"))),
            VAEConfig(model_id=str(build_tiny_vae(root / "vae", sample_size=64))))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, encoders) -> Path:
    """A from-scratch export with random, prompt-dependent weights (64 px images, 8×8 latents)."""
    unet = build_unet(ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN, zero_init_out=False)), sample_size=8)
    text, vae = encoders
    return write_scratch_export(tmp_path_factory.mktemp("models") / "model", unet=unet, vae_cfg=vae, text_cfg=text,
                                schedule=ScheduleConfig(), manifest={"step": 0})


def config(**kw: object) -> SampleConfig:
    base = dict(prompts=PROMPTS, steps=3, images_per_prompt=3, guidance_sweep=(0.0, 5.0), label_width=100)
    return SampleConfig(**{**base, **kw})


def as_array(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB")))  # (H, W, 3)


def same_picture(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to the level or two that another batch composition changes in a few channel values."""
    diff = (as_array(a).int() - as_array(b).int()).abs()
    return bool(diff.max() <= 2 and (diff > 0).float().mean() < 0.01)


def test_export_is_a_complete_pipeline_folder(export: Path) -> None:
    names = sorted(p.name for p in export.iterdir())
    assert names == [MANIFEST, "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pkl"))
    manifest = verify_export(export)
    assert manifest["kind"] == "scratch" and "unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    pipe = StableDiffusionPipeline.from_pretrained(export)
    assert pipe.safety_checker is None and pipe.tokenizer.model_max_length == 77
    image = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_a_zero_terminal_snr_export_samples_from_pure_noise(encoders, tmp_path: Path) -> None:
    """The export carries its schedule: v-prediction, the rescaled betas, and trailing spacing, so that
    StableDiffusionPipeline's first step is t = T with no sampler settings of the user's."""
    unet = build_unet(ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN, zero_init_out=False)), sample_size=8)
    text, vae = encoders
    schedule = ScheduleConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    folder = write_scratch_export(tmp_path / "model", unet=unet, vae_cfg=vae, text_cfg=text,
                                  schedule=schedule, manifest={"step": 0})
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    sched = pipe.scheduler.config
    assert (sched.prediction_type, sched.rescale_betas_zero_snr, sched.timestep_spacing) == (
        "v_prediction", True, "trailing")
    pipe.scheduler.set_timesteps(5)
    assert pipe.scheduler.timesteps.tolist()[0] == 999
    (a, b), = generate(load_pipeline(folder), [PROMPTS[0]], [0, 1], guidance_scale=5.0, steps=3)
    assert a.size == (64, 64) and not same_picture(a, b)


def test_sample_command_draws_what_the_diffusers_pipeline_draws(export: Path, tmp_path: Path) -> None:
    from flows.cli import main

    for sampler in ("ddim", "dpm++"):
        out = tmp_path / f"grid-{sampler}.png"
        assert main(["sample", "--model", str(export), "--prompt", PROMPTS[1], "--n", "1", "--seed", "5",
                     "--steps", "6", "--guidance", "4", "--scheduler", sampler, "--out", str(out)]) == 0
        ours = Image.open(out.with_suffix("") / "images" / "p00_seed5.png")
        pipe = StableDiffusionPipeline.from_pretrained(export)
        if sampler == "dpm++":
            from diffusers import DPMSolverMultistepScheduler

            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
        theirs = pipe(PROMPTS[1], num_inference_steps=6, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(5)).images[0]
        assert as_array(ours).equal(as_array(theirs)), sampler


def test_sample_writes_images_grid_and_sweep(export: Path, tmp_path: Path) -> None:
    result = sample_to_folder(export, config(), tmp_path)
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


def test_same_seed_same_image_whatever_the_batch(export: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(export)
    cfg = config(guidance_sweep=(), images_per_prompt=2)
    first = sample_to_folder(pipe, cfg, tmp_path / "a").images
    again = sample_to_folder(pipe, cfg.model_copy(update={"batch_size": 3}), tmp_path / "b").images
    for r in range(2):
        for c in range(2):
            # another batch size changes the order of float sums, not the picture
            assert same_picture(first[r][c], again[r][c])
    assert not as_array(first[0][0]).equal(as_array(first[1][0]))  # same seed, other prompt
    assert not as_array(first[0][0]).equal(as_array(first[0][1]))  # same prompt, other seed


def test_seed_stride_gives_every_image_its_own_noise(export: Path) -> None:
    """The eval stage draws image j of item i from seed + i·k + j: its unguided images then differ from item to
    item, where shared seeds draw one text-free image per seed for every prompt."""
    pipe = load_pipeline(export)
    kw = dict(guidance_scale=0.0, steps=3)
    shared = generate(pipe, PROMPTS, [0, 1], **kw)
    own = generate(pipe, PROMPTS, [0, 1], seed_stride=2, **kw)
    assert same_picture(shared[0][0], shared[1][0])  # w = 0, shared seeds: both prompts draw the same image
    assert same_picture(own[0][0], shared[0][0])  # item 0 keeps seeds 0 and 1
    assert not same_picture(own[1][0], own[0][0])
    alone = generate(pipe, PROMPTS[1:], [2, 3], **kw)  # item 1 draws from seeds 2 and 3
    assert same_picture(own[1][0], alone[0][0]) and same_picture(own[1][1], alone[0][1])


def test_guidance_zero_ignores_the_text(export: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(export)
    result = sample_to_folder(pipe, config(images_per_prompt=1, guidance_sweep=(0.0, 1.0, 7.5)), tmp_path)
    with Image.open(result.guidance_sweep) as sweep:
        cells = [[as_array(sweep.crop((100 + 64 * c, 18 + 64 * r, 164 + 64 * c, 82 + 64 * r))) for c in range(3)]
                 for r in range(2)]
    assert cells[0][0].equal(cells[1][0])  # w = 0: both prompts draw the same (text-free) image
    assert not cells[0][1].equal(cells[1][1]) and not cells[0][1].equal(cells[0][2])
    assert cells[0][2].equal(as_array(result.images[0][0]))  # w = 7.5 is the grid's own guidance scale
    with pytest.raises(ValueError, match="guidance"):
        SampleConfig(guidance_scale=0.5)


def test_grid_layout_and_bad_input() -> None:
    imgs = [[Image.new("RGB", (10, 10), (r * 100, c * 100, 0)) for c in range(4)] for r in range(2)]
    grid = make_grid(imgs, ["a long prompt " * 10, "b"], ["1", "2", "3", "4"], cell_size=20, label_width=50,
                     header_height=10)
    assert grid.size == (50 + 4 * 20, 10 + 2 * 20)
    assert grid.getpixel((50 + 2 * 20 + 5, 10 + 20 + 5)) == (100, 200, 0)
    with pytest.raises(ValueError, match="labels"):
        make_grid(imgs, ["only one"], ["1", "2", "3", "4"])


def test_foreign_old_and_damaged_folders_are_named(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="neither"):
        load_pipeline(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text('{"format": "emoji-sd-scratch/1"}')
    (old / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="emoji-sd-scratch/1.*--force train"):
        load_pipeline(old)
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(export, damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFolderError, match="diffusion_pytorch_model.safetensors is damaged"):
        load_pipeline(damaged)


def test_trainer_draws_validation_grids_without_touching_its_randomness(encoders, tmp_path: Path) -> None:
    from tiny_diffusion import synthetic_pairs, tiny_train_config

    from sd_core.encode.stage import EncodeStageConfig
    from sd_core.training.metrics import read_metrics
    from sd_core.training.stage import export_model, validation_sampler
    from sd_core.training.trainer import EncoderRefs, Trainer

    text, vae = encoders
    pairs = synthetic_pairs(40, tokens=77, dim=CLIP_HIDDEN)
    cfg = tiny_train_config(steps=4, sample_every=2, sample_prompts=PROMPTS, sample_seeds=(0, 1, 2),
                            model=ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN)))
    sampler = validation_sampler(EncodeStageConfig(vae=vae, text=text), ScheduleConfig().scheduler_config(), steps=2)
    refs = EncoderRefs(text_encoder=text, vae=vae)
    with_grids = Trainer(cfg, pairs, tmp_path / "a", sampler=sampler, encoders=refs, progress=False)
    final = with_grids.train().checkpoint
    plain = Trainer(cfg, pairs, tmp_path / "b", progress=False)
    plain.train()

    grids = sorted((tmp_path / "a" / "samples").iterdir())
    assert [p.name for p in grids] == ["step-0000002.png", "step-0000004.png"]
    with Image.open(grids[-1]) as grid:
        assert grid.size == (220 + 3 * 64, 18 + 2 * 64)
    losses = lambda d: [r["train_loss"] for r in read_metrics(d / "metrics.csv")]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # the final checkpoint names the encoders: the train stage's export is a pipeline the sample stage draws from
    assert not (tmp_path / "a" / "model").exists()
    assert export_model(final, tmp_path / "a" / "model", items=len(pairs)) == tmp_path / "a" / "model"
    assert verify_export(tmp_path / "a" / "model")["step"] == 4


def test_sample_flags_and_config_fields_share_their_names() -> None:
    from flows.cli import build_parser

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    dests = {a.dest for a in sample._actions} - {"help", "debug"}
    not_settings = {"config", "sets", "preset", "data_dir", "model", "prompts_file", "out"}
    assert dests - not_settings == set(SampleConfig.model_fields)
    flags = {o for a in sample._actions for o in a.option_strings}
    for field in SampleConfig.model_fields:
        assert f"--{field.replace('_', '-')}" in flags, field
    assert {"--n", "--guidance", "--sweep", "--prompt"} <= flags  # the old names still work


def test_negative_prompt_size_prompts_file_and_samples_json(export: Path, tmp_path: Path) -> None:
    from flows.cli import main

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"# two prompts\n{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(export), "--prompts-file", str(prompts_file), "--negative-prompt",
                 "sad expression", "--width", "80", "--height", "48", "--images-per-prompt", "2", "--seed", "3",
                 "--steps", "3", "--guidance-scale", "5", "--batch-size", "3", "--device", "cpu",
                 "--out", str(out)]) == 0
    record = json.loads((tmp_path / "grid" / "samples.json").read_text())
    images = record["images"]
    assert [(i["prompt"], i["seed"]) for i in images] == [(p, s) for p in PROMPTS for s in (3, 4)]
    first = images[0]
    assert {k: first[k] for k in ("negative_prompt", "guidance_scale", "steps", "scheduler", "width", "height")} == {
        "negative_prompt": "sad expression", "guidance_scale": 5.0, "steps": 3, "scheduler": "ddim", "width": 80,
        "height": 48}
    assert first["model_digest"] == record["model_digest"] == model_digest(export)
    assert "--negative-prompt 'sad expression'" in first["command"] and "--width 80" in first["command"]
    drawn = Image.open(tmp_path / "grid" / images[3]["file"])
    assert drawn.size == (80, 48)
    # the recorded settings draw the image again; without the negative prompt it is another image
    last = images[3]
    pipe = load_pipeline(export)
    again = generate(pipe, [last["prompt"]], [last["seed"]], guidance_scale=last["guidance_scale"], steps=last["steps"],
                     sampler_name=last["scheduler"], negative_prompt=last["negative_prompt"], width=last["width"],
                     height=last["height"])[0][0]
    assert same_picture(drawn, again)
    plain = generate(pipe, [last["prompt"]], [last["seed"]], guidance_scale=5.0, steps=3, sampler_name="ddim",
                     width=80, height=48)[0][0]
    assert not same_picture(drawn, plain)


@pytest.mark.parametrize("args, says", [
    (["--width", "100"], "sample.width (--width) = 100 is not a positive multiple of the VAE's factor 8"),
    (["--height", "4"], "sample.height: Input should be greater than or equal to 8"),
    (["--steps", "0"], "sample.steps: Input should be greater than or equal to 1"),
    (["--device", "gpu"], "sample.device: String should match pattern"),
    (["--prompts-file", "MISSING"], "--prompts-file MISSING: no such file"),
])
def test_bad_sample_flags_are_one_line_naming_the_flag(export: Path, tmp_path: Path, args: list[str], says: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    missing = str(tmp_path / "none.txt")
    args = [missing if a == "MISSING" else a for a in args]
    rc = main(["sample", "--model", str(export), "--steps", "2", "--n", "1", *args, "--out", str(tmp_path / "g.png")]
              if "--steps" not in args else ["sample", "--model", str(export), *args, "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert says.replace("MISSING", missing) in err


def test_without_prompts_the_held_out_captions_are_drawn(export: Path, tmp_path: Path) -> None:
    from sd_core.caption.template import DEFAULT_PROMPTS
    from sd_core.eval.config import EvalConfig
    from sd_core.eval.stage import eval_set
    from sd_core.sample.stage import resolve_prompts
    from sd_core.store.catalog import Catalog
    from sd_core.store.metadata import update_metadata, write_metadata

    catalog = Catalog(tmp_path / "data")
    rows = [{"file_name": f"images/e{i}.jpg", "image_url": "", "image_title": f"e{i}", "tag": "t",
             "md5": f"{i:032x}", "width": 64, "height": 64, "source_format": "PNG", "animated": False}
            for i in range(60)]
    write_metadata(catalog, rows)
    update_metadata(catalog, {r["md5"]: {"prompt": f"Emoji number {i} with a round head"} for i, r in enumerate(rows)})
    cfg = SampleConfig(held_out_prompts=4)
    # the model's own split (its manifest names none: the trainer's defaults), picked as the eval stage picks
    held = resolve_prompts(cfg, catalog, export)
    assert held == tuple(eval_set(catalog, EvalConfig(items=4), 0.1, 42).prompts)
    assert resolve_prompts(cfg, None, export) == DEFAULT_PROMPTS  # a model without a data directory
    assert resolve_prompts(cfg.model_copy(update={"prompts": ("x",)}), catalog, export) == ("x",)
    out = sample_to_folder(export, config(prompts=(), images_per_prompt=1, guidance_sweep=()), tmp_path / "s",
                           catalog=catalog)
    assert out.prompts == held and len(out.images) == len(held) >= 3


def test_validation_grids_draw_held_out_captions_when_no_prompt_is_set(encoders, tmp_path: Path) -> None:
    from sd_core.encode.stage import EncodeStageConfig
    from sd_core.training.stage import validation_sampler

    text, vae = encoders
    unet = build_unet(ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN, zero_init_out=False)), sample_size=8)
    sampler = validation_sampler(EncodeStageConfig(vae=vae, text=text), ScheduleConfig().scheduler_config(), steps=1,
                                 held_out=PROMPTS[:1])
    sampler(unet, (), [0, 1], tmp_path / "held.png")  # the trainer passes its (empty) sample_prompts
    sampler(unet, PROMPTS, [0, 1], tmp_path / "given.png")
    assert Image.open(tmp_path / "held.png").size == (220 + 2 * 64, 18 + 64)  # one row: the held-out caption
    assert Image.open(tmp_path / "given.png").size == (220 + 2 * 64, 18 + 2 * 64)
