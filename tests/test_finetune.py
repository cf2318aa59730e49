"""Cross-attention fine-tune of a (tiny) Stable Diffusion UNet, exported as a loadable pipeline folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from sd_core.models import ModelConfig, build_denoiser, freeze_all_but_attn2
from sd_core.pairs import synthetic_pairs
from sd_core.sampling import SampleConfig, sample_to_folder
from sd_core.train import Trainer
from sd_core.unet import count_parameters
from tiny_diffusion import one_torch_thread, tiny_train_config
from tiny_models import CLIP_HIDDEN, CLIP_MAX_LENGTH, build_tiny_sd


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")  # 64 px images, 8×8 latents


@pytest.fixture(scope="module")
def finetuned(sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    pairs = synthetic_pairs(24, latent_size=8, tokens=CLIP_MAX_LENGTH, dim=CLIP_HIDDEN)
    cfg = tiny_train_config(
        steps=4, batch_size=4, save_every=2, val_every=2,
        model=ModelConfig(kind="pretrained_attn2", pretrained_model_id=str(sd)),
    )
    trainer = Trainer(cfg, pairs, tmp_path_factory.mktemp("finetune"), progress=False)
    trainer.train()
    return trainer


def original_unet(sd: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(sd, subfolder="unet").state_dict()


def test_freeze_rule_leaves_only_attn2_trainable(sd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build_denoiser(ModelConfig(kind="pretrained_attn2", pretrained_model_id=str(sd)), report=print)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all("attn2" in n for n in trainable) and not any("attn2" in n for n in frozen)
    n = count_parameters(model, trainable_only=True)
    out = capsys.readouterr().out
    assert f"{n:,} trainable of {count_parameters(model):,}" in out
    print(out.strip())
    assert freeze_all_but_attn2(model.unet) == n


def test_pretrained_kind_takes_no_unet_shape() -> None:
    with pytest.raises(ValueError, match="only for kind='scratch'"):
        ModelConfig(kind="pretrained_attn2", unet={"h_dim": 32})


def test_only_attn2_parameters_change(finetuned: Trainer, sd: Path) -> None:
    before = original_unet(sd)
    after = {n.removeprefix("unet."): p.detach() for n, p in finetuned.net.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    attn2 = {n for n in before if "attn2" in n}
    assert changed == attn2


def test_checkpoints_hold_only_the_trainable_weights(finetuned: Trainer) -> None:
    from safetensors.torch import load_file

    folder = finetuned.checkpoint_root / "checkpoint-0000004"
    names = load_file(str(folder / "model.safetensors")).keys()
    assert names and all("attn2" in n for n in names)
    resumed = Trainer(finetuned.config, finetuned.pairs, finetuned.out_dir, progress=False)
    assert resumed.resume_latest() and resumed.step == 4
    for (n, a), (_, b) in zip(resumed.net.named_parameters(), finetuned.net.named_parameters()):
        assert torch.equal(a, b), n


def test_export_is_a_pipeline_that_generates(finetuned: Trainer, sd: Path, tmp_path: Path) -> None:
    export = finetuned.export_dir
    assert (export / "model_index.json").exists()
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pkl"))
    pipe = StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)
    exported = pipe.unet.state_dict()
    before = original_unet(sd)
    for n, v in exported.items():
        if "attn2" in n:
            torch.testing.assert_close(v, finetuned.ema.shadow[f"unet.{n}"])
        else:
            assert torch.equal(v, before[n]), n
    image = pipe("frog emoji with a wide head", num_inference_steps=2, output_type="pil",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    result = sample_to_folder(export, SampleConfig(prompts=("cat emoji",), steps=2, images_per_prompt=2,
                                                   guidance_sweep=(0.0, 5.0)), tmp_path)
    assert [img.size for img in result.images[0]] == [(64, 64), (64, 64)]
    assert result.guidance_sweep is not None and result.guidance_sweep.exists()
