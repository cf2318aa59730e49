"""The model factory: the seed's UNet as a diffusers UNet2DConditionModel, its sizes, and the kinds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from pydantic import ValidationError
from tiny_diffusion import tiny_unet_config

from sd_core.config import preset
from sd_core.diffusion.models import ModelConfig, build_unet, count_parameters
from sd_core.diffusion.unet import SEED_PARAMETERS, UNetConfig

SEED_SIZE = 72_911_620  # the seed's 72,993,540 less 81,920: a 256- instead of 320-wide sinusoid into a 1280 Linear
DEMO_PLAIN_SIZE = 7_572_036  # h_dim 64, 4 heads, MiniLM context 384; the old private UNet: 7,899,716 (320-wide sinusoid)
DEMO_SIZE = 8_512_068  # the demo preset: the same with the pooled prompt in the timestep embedding


def test_parameter_counts_at_the_seed_and_demo_sizes() -> None:
    seed = build_unet(ModelConfig(), sample_size=8)
    demo_cfg = ModelConfig.model_validate(preset("demo")["train"]["model"])
    demo = build_unet(demo_cfg, sample_size=8)
    print(f"seed size: {count_parameters(seed):,} (seed project: {SEED_PARAMETERS:,}); demo: {count_parameters(demo):,}")
    assert isinstance(seed, UNet2DConditionModel)
    assert count_parameters(seed) == SEED_SIZE
    assert SEED_PARAMETERS - count_parameters(seed) == (320 - 256) * 1280  # only the sinusoid's width differs
    assert seed.time_embedding.linear_1.in_features == 256 and seed.time_embedding.linear_2.out_features == 1280
    assert count_parameters(demo) == DEMO_SIZE
    plain_cfg = demo_cfg.model_copy(update={"unet": demo_cfg.unet.model_copy(update={"text_time_embedding": False})})
    assert count_parameters(build_unet(plain_cfg, sample_size=8)) == DEMO_PLAIN_SIZE
    assert count_parameters(seed, trainable_only=True) == SEED_SIZE


def test_design_is_the_seeds() -> None:
    cfg = UNetConfig()
    unet = build_unet(ModelConfig(unet=cfg), sample_size=8)
    c = unet.config
    assert c.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")
    assert c.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D")
    assert c.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert tuple(c.block_out_channels) == (256, 512) and c.cross_attention_dim == 512
    assert c.flip_sin_to_cos and c.freq_shift == 0
    heads = {m.heads for n, m in unet.named_modules() if n.endswith("attn2")}
    assert heads == {8}


def test_output_shape_zero_init_and_text_dependence() -> None:
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 6, 16, generator=g)
    zero = build_unet(ModelConfig(unet=tiny_unet_config()), sample_size=8)
    with torch.no_grad():
        assert torch.count_nonzero(zero(x, t, encoder_hidden_states=ctx).sample) == 0
    unet = build_unet(ModelConfig(unet=tiny_unet_config(zero_init_out=False)), sample_size=8)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=ctx).sample
        other = unet(x, t, encoder_hidden_states=ctx.flip(0)).sample
    assert out.shape == (2, 4, 8, 8)
    assert not torch.allclose(out, other)


def test_same_seed_same_weights() -> None:
    a = build_unet(ModelConfig(unet=tiny_unet_config()), sample_size=8, seed=3)
    b = build_unet(ModelConfig(unet=tiny_unet_config()), sample_size=8, seed=3)
    c = build_unet(ModelConfig(unet=tiny_unet_config()), sample_size=8, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_text_time_embedding_pools_the_text_into_the_timestep() -> None:
    plain = build_unet(ModelConfig(unet=tiny_unet_config()), sample_size=8)
    pooled = build_unet(ModelConfig(unet=tiny_unet_config(text_time_embedding=True, zero_init_out=False)),
                        sample_size=8)
    assert pooled.config.addition_embed_type == "text"
    assert count_parameters(pooled) > count_parameters(plain)
    assert pooled.config.cross_attention_dim == 16 and pooled.config.encoder_hid_dim is None
    # the pooled text reaches the output even with every cross-attention layer switched off
    for name, module in pooled.named_modules():
        if name.endswith("attn2"):
            module.to_out[0].weight.data.zero_()
            module.to_out[0].bias.data.zero_()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 16, generator=g)
    with torch.no_grad():
        a = pooled(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        b = pooled(x, torch.tensor([500]), encoder_hidden_states=-ctx).sample
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("kw", "names"),
    [(dict(h_dim=36, n_heads=8, groups=4), ("h_dim", "n_heads")), (dict(h_dim=48, n_heads=4, groups=32), ("h_dim", "groups"))],
)
def test_bad_config_names_fields(kw: dict[str, int], names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as err:
        tiny_unet_config(**kw)
    for name in names:
        assert name in str(err.value)


def test_unknown_and_misplaced_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="n_head\\b"):
        UNetConfig(n_head=8)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="time_embed_dim"):  # the old sinusoid width is not a knob any more
        UNetConfig(time_embed_dim=320)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="only for kind='scratch'"):
        ModelConfig(kind="pretrained_attn2", unet={"h_dim": 32})
    with pytest.raises(ValueError, match="only for kind='pretrained_attn2_lora'"):
        ModelConfig(kind="pretrained_attn2", lora={"rank": 4})
    assert ModelConfig(kind="pretrained_attn2_lora").lora.rank == 8


def test_pretrained_kinds_train_only_cross_attention(tiny_sd: Path) -> None:
    full = build_unet(ModelConfig(kind="pretrained_attn2", pretrained_model_id=str(tiny_sd)), sample_size=8)
    trainable = [n for n, p in full.named_parameters() if p.requires_grad]
    assert trainable and all("attn2" in n for n in trainable)
    assert not any("attn2" in n for n, p in full.named_parameters() if not p.requires_grad)
    lora = build_unet(ModelConfig(kind="pretrained_attn2_lora", pretrained_model_id=str(tiny_sd),
                                  lora={"rank": 2, "alpha": 4}), sample_size=8)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("attn2" in n and "lora_" in n for n in names)
    targets = {n.split(".lora_")[0].rsplit("attn2.", 1)[1] for n in names}
    assert targets == {"to_q", "to_k", "to_v", "to_out.0"}
    assert count_parameters(lora, trainable_only=True) < count_parameters(full, trainable_only=True)
    # LoRA starts as the identity: the adapted UNet computes what the base computes
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(lora(x, 10, encoder_hidden_states=ctx).sample,
                                   base(x, 10, encoder_hidden_states=ctx).sample)


def test_latent_channels_follow_the_vae_unless_set() -> None:
    unet = build_unet(ModelConfig(unet=tiny_unet_config()), sample_size=8, latent_channels=16)
    assert unet.config.in_channels == unet.config.out_channels == 16
    with pytest.raises(ValueError, match=r"train.model.unet.in_channels = 4, but the VAE's latents have 16 channels"):
        build_unet(ModelConfig(unet=tiny_unet_config(in_channels=4)), sample_size=8, latent_channels=16)
