"""Fine-tunes of a (tiny) Stable Diffusion: all attn2 weights, or LoRA on the attn2 projections. Each exports
only what changed, and loads back as a StableDiffusionPipeline built on the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from tiny_diffusion import one_torch_thread, synthetic_pairs, tiny_train_config
from tiny_models import CLIP_HIDDEN, CLIP_MAX_LENGTH

from sd_core.diffusion.export import ATTN2_WEIGHTS, LORA_WEIGHTS, MANIFEST, MERGED, load_pipeline, verify_export
from sd_core.diffusion.models import ModelConfig
from sd_core.sample.config import SampleConfig
from sd_core.sample.stage import sample_to_folder
from sd_core.training.stage import export_model
from sd_core.training.trainer import Trainer

PIPE_ARGS = dict(safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def finetune(sd: Path, out: Path, kind: str, **model: object) -> Trainer:
    pairs = synthetic_pairs(24, latent_size=8, tokens=CLIP_MAX_LENGTH, dim=CLIP_HIDDEN)
    cfg = tiny_train_config(steps=4, batch_size=4, save_every=2, val_every=2, lr=1e-2, ema_decay=0.5,
                            model=ModelConfig(kind=kind, pretrained_model_id=str(sd), **model))
    trainer = Trainer(cfg, pairs, out, progress=False)
    export_model(trainer.train().checkpoint, out / "model", items=len(pairs))  # as the train stage exports
    return trainer


@pytest.fixture(scope="module")
def attn2(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    return finetune(tiny_sd, tmp_path_factory.mktemp("attn2"), "pretrained_attn2")


@pytest.fixture(scope="module")
def lora(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    out = tmp_path_factory.mktemp("lora")
    pairs = synthetic_pairs(24, latent_size=8, tokens=CLIP_MAX_LENGTH, dim=CLIP_HIDDEN)
    cfg = tiny_train_config(steps=4, batch_size=4, save_every=2, val_every=2, lr=1e-2, ema_decay=0.5,
                            export_merged=True,
                            model=ModelConfig(kind="pretrained_attn2_lora", pretrained_model_id=str(tiny_sd),
                                              lora={"rank": 4, "alpha": 4}))
    trainer = Trainer(cfg, pairs, out, progress=False)
    export_model(trainer.train().checkpoint, out / "model", items=len(pairs))  # as the train stage exports
    return trainer


def base_unet(sd: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(sd, subfolder="unet").state_dict()


def latents(pipe: StableDiffusionPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("frog emoji with a wide head", num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_only_attn2_parameters_change(attn2: Trainer, tiny_sd: Path) -> None:
    before = base_unet(tiny_sd)
    after = dict(attn2.net.named_parameters())
    changed = {n for n in before if n in after and not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if "attn2" in n}


def test_checkpoints_hold_only_the_trainable_weights(attn2: Trainer) -> None:
    names = load_file(str(attn2.checkpoint_root / "checkpoint-0000004" / "model.safetensors")).keys()
    assert names and all("attn2" in n for n in names)
    resumed = Trainer(attn2.config, attn2.pairs, attn2.out_dir, progress=False)
    assert resumed.resume_latest() and resumed.step == 4
    for (n, a), (_, b) in zip(resumed.net.named_parameters(), attn2.net.named_parameters()):
        assert torch.equal(a, b), n


def test_attn2_export_holds_only_what_changed(attn2: Trainer, tiny_sd: Path, tmp_path: Path) -> None:
    export = attn2.out_dir / "model"
    assert sorted(p.name for p in export.iterdir()) == [ATTN2_WEIGHTS, MANIFEST]
    manifest = verify_export(export)
    assert manifest["kind"] == "pretrained_attn2" and manifest["base_model"] == str(tiny_sd)
    weights = load_file(str(export / ATTN2_WEIGHTS))
    before = base_unet(tiny_sd)
    assert set(weights) == {n for n in before if "attn2" in n}
    pipe = load_pipeline(export)
    for n, v in pipe.unet.state_dict().items():
        if "attn2" in n:
            torch.testing.assert_close(v, attn2.ema.shadow_state()[n].cpu())
        else:
            assert torch.equal(v, before[n]), n
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, **PIPE_ARGS)
    assert not torch.allclose(latents(pipe), latents(base))
    result = sample_to_folder(export, SampleConfig(prompts=("cat emoji",), steps=2, images_per_prompt=2,
                                                   guidance_sweep=(0.0, 5.0)), tmp_path)
    assert [img.size for img in result.images[0]] == [(64, 64), (64, 64)]


def test_lora_export_is_read_by_load_lora_weights(lora: Trainer, tiny_sd: Path) -> None:
    export = lora.out_dir / "model"
    assert sorted(p.name for p in export.iterdir()) == [MANIFEST, MERGED, LORA_WEIGHTS]
    saved = load_file(str(export / LORA_WEIGHTS))
    assert saved and all("attn2" in k and "lora" in k for k in saved)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, **PIPE_ARGS)
    before = latents(base)
    base.load_lora_weights(str(export))  # diffusers' own loader, no emoji-sd code involved
    adapted = latents(base)
    assert not torch.allclose(before, adapted)  # the adapter changes what the model draws
    ours = latents(load_pipeline(export))
    torch.testing.assert_close(ours, adapted)
    merged = StableDiffusionPipeline.from_pretrained(export / MERGED, **PIPE_ARGS)
    torch.testing.assert_close(latents(merged), adapted, rtol=1e-4, atol=1e-4)
    unchanged = base_unet(tiny_sd)
    for n, v in merged.unet.state_dict().items():
        if "attn2" not in n:
            assert torch.equal(v, unchanged[n]), n


def test_export_sizes(attn2: Trainer, lora: Trainer) -> None:
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    a, l_ = size(attn2.out_dir / "model"), (lora.out_dir / "model" / LORA_WEIGHTS).stat().st_size
    merged = size(lora.out_dir / "model" / MERGED)
    print(f"tiny SD exports: attn2 {a:,} B, LoRA rank 4 {l_:,} B, merged pipeline {merged:,} B")
    assert 0 < l_ < a < merged
