"""Shape, masking, gradient and config checks for the from-scratch conditional UNet."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from sd_core.unet import EmojiUNet, UNetConfig, count_parameters, timestep_embedding

SEED_PARAMS = 72_993_540  # UNetConfig.seed() (context 512); the seed project reported the same
SMALL_PARAMS = 8_014_404  # UNetConfig.small() (context 512)


def tiny_config(**kw: object) -> UNetConfig:
    base = dict(h_dim=32, n_heads=4, groups=8, context_dim=384, time_mlp_dim=64, zero_init_out=False)
    return UNetConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model() -> EmojiUNet:
    torch.manual_seed(0)
    return EmojiUNet(tiny_config()).eval()


def inputs(b: int = 2, t_len: int = 7, hw: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, hw, hw, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    ctx = torch.randn(b, t_len, 384, generator=g)
    return x, t, ctx


def test_output_shape(model: EmojiUNet) -> None:
    x, t, ctx = inputs()
    with torch.no_grad():
        out = model(x, t, ctx)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        assert model(x, t.float() + 0.5, ctx).shape == x.shape  # float timesteps
        torch.testing.assert_close(model(x, 250, ctx), model(x, torch.tensor([250, 250]), ctx))
        assert model(torch.randn(1, 4, 6, 10), torch.tensor([3]), ctx[:1]).shape == (1, 4, 6, 10)


def test_timestep_embedding() -> None:
    emb = timestep_embedding(torch.tensor([0, 10, 999]), 320)
    assert emb.shape == (3, 320)
    torch.testing.assert_close(emb[0, :160], torch.ones(160))
    torch.testing.assert_close(emb[0, 160:], torch.zeros(160))


def test_masked_tokens_do_not_matter(model: EmojiUNet) -> None:
    x, t, ctx = inputs()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 2:] = 0
    changed = ctx.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), 384) * 10
    with torch.no_grad():
        a = model(x, t, ctx, mask)
        b = model(x, t, changed, mask)
        unmasked = model(x, t, changed)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, unmasked, atol=1e-4)


def test_all_masked_row_is_finite(model: EmojiUNet) -> None:
    x, t, ctx = inputs()
    mask = torch.ones(2, 7)
    mask[1] = 0
    with torch.no_grad():
        out = model(x, t, ctx, mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[1:], model(x[1:], t[1:], ctx[1:]), atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_gradient() -> None:
    torch.manual_seed(0)
    net = EmojiUNet(tiny_config())
    x, t, ctx = inputs()
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    net(x, t, ctx, mask).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []


def test_zero_init_output() -> None:
    net = EmojiUNet(tiny_config(zero_init_out=True))
    x, t, ctx = inputs()
    with torch.no_grad():
        assert bool((net(x, t, ctx) == 0).all())


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        (dict(h_dim=36, n_heads=8, groups=4), ("h_dim", "n_heads")),
        (dict(h_dim=48, n_heads=4, groups=32), ("h_dim", "groups")),
    ],
)
def test_bad_config_names_fields(kw: dict[str, int], names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as err:
        tiny_config(**kw)
    for name in names:
        assert name in str(err.value)


def test_unknown_field_refused() -> None:
    with pytest.raises(ValidationError, match="n_head\\b"):
        UNetConfig(n_head=8)  # type: ignore[call-arg]


def test_bad_inputs_raise(model: EmojiUNet) -> None:
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 4, 7, 8), t, ctx)
    with pytest.raises(ValueError, match="context"):
        model(x, t, torch.randn(2, 7, 512))
    with pytest.raises(ValueError, match="context_mask"):
        model(x, t, ctx, torch.ones(2, 6))


def test_config_round_trip(model: EmojiUNet) -> None:
    data = json.loads(json.dumps(model.to_dict()))
    assert UNetConfig.from_dict(data) == model.config
    clone = EmojiUNet.from_dict(data)
    clone.load_state_dict(model.state_dict(), strict=True)
    x, t, ctx = inputs()
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x, t, ctx), model(x, t, ctx))
    with pytest.raises(ValidationError, match="bogus"):
        UNetConfig.from_dict({**data, "bogus": 1})


def test_preset_parameter_counts() -> None:
    seed_count = count_parameters(EmojiUNet(UNetConfig.seed()))
    small_count = count_parameters(EmojiUNet(UNetConfig.small()))
    print(f"seed preset: {seed_count:,} parameters; small preset: {small_count:,}")
    assert seed_count == SEED_PARAMS
    assert small_count == SMALL_PARAMS
