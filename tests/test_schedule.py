"""Noise-schedule math checked against diffusers' DDPM / DDIM schedulers and fixed numbers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from pydantic import ValidationError

from sd_core.schedule import NoiseSchedule, ScheduleConfig, sample

SEED_KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig())


def ddim_reference(steps: int) -> DDIMScheduler:
    # set_alpha_to_one=True and steps_offset=0 match NoiseSchedule's "ᾱ_prev = 1 past the end"
    # and plain "leading" grid; clip_sample=False because latents are not clipped.
    d = DDIMScheduler(**SEED_KW, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    d.set_timesteps(steps)
    return d


def ddpm_reference(steps: int | None = None) -> DDPMScheduler:
    d = DDPMScheduler(**SEED_KW, clip_sample=False, variance_type="fixed_small")
    if steps is not None:
        d.set_timesteps(steps)
    return d


def test_betas_match_diffusers(sched: NoiseSchedule) -> None:
    ref = ddpm_reference()
    torch.testing.assert_close(sched.betas.float(), ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=0)


def test_known_alphas_cumprod(sched: NoiseSchedule) -> None:
    ac = sched.alphas_cumprod
    assert float(ac[0]) == pytest.approx(0.99915, abs=1e-12)
    assert float(ac[499]) == pytest.approx(0.27766965045646763, abs=1e-12)
    assert float(ac[999]) == pytest.approx(0.004660098513077238, abs=1e-12)
    assert bool((ac[1:] < ac[:-1]).all())


def test_linear_schedule() -> None:
    s = NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    ref = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    torch.testing.assert_close(s.betas.float(), ref.betas, atol=1e-6, rtol=0)


def test_config_refuses_unknown_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="beta_shedule"):
        ScheduleConfig(beta_shedule="linear")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        ScheduleConfig(beta_schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="beta_end"):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)
    cfg = ScheduleConfig(num_train_timesteps=500)
    assert ScheduleConfig.from_dict(cfg.to_dict()) == cfg


def test_add_noise_matches_diffusers(sched: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 499, 999])
    ref = ddpm_reference().add_noise(x0, noise, t)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ref, atol=1e-5, rtol=1e-5)


def test_timesteps_match_diffusers(sched: NoiseSchedule) -> None:
    assert sched.timesteps(50, "ddim") == ddim_reference(50).timesteps.tolist()
    assert sched.timesteps(50, "ddpm") == ddpm_reference(50).timesteps.tolist()
    assert sched.timesteps(1000, "ddpm") == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        sched.timesteps(0)
    with pytest.raises(ValueError):
        sched.timesteps(10, "euler")  # type: ignore[arg-type]


@pytest.mark.parametrize("t", [980, 500, 20, 0])
def test_ddim_step_matches_diffusers(sched: NoiseSchedule, t: int) -> None:
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = ddim_reference(50).step(eps, t, x_t, eta=0.0).prev_sample
    ours = sched.ddim_step(eps, t, t - 20, x_t, eta=0.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_ddim_step_with_eta_matches_diffusers(sched: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = ddim_reference(50).step(
        eps, 500, x_t, eta=0.7, generator=torch.Generator().manual_seed(5)
    ).prev_sample
    ours = sched.ddim_step(eps, 500, 480, x_t, eta=0.7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("t", "steps"), [(999, None), (500, None), (1, None), (0, None), (980, 50), (20, 50)])
def test_ddpm_step_matches_diffusers(sched: NoiseSchedule, t: int, steps: int | None) -> None:
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t_prev = None if steps is None else t - 1000 // steps
    ref = ddpm_reference(steps).step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    ours = sched.ddpm_step(eps, t, x_t, generator=torch.Generator().manual_seed(7), t_prev=t_prev)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_ddpm_posterior_mean_is_noise_free_step(sched: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = 300
    x_t = sched.add_noise(x0, noise, t)
    mean, var = sched.ddpm_posterior(noise, t, x_t)  # exact ε → mean of q(x_{t-1} | x_t, x0)
    a_t, a_p = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t - 1])
    beta = float(sched.betas[t])
    expected = (a_p**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_p) / (1 - a_t)) * x_t
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
    assert var == pytest.approx((1 - a_p) / (1 - a_t) * beta, rel=1e-9)


def test_min_snr_weights(sched: NoiseSchedule) -> None:
    t = torch.arange(0, 1000)
    w = sched.min_snr_weights(t, gamma=5.0)
    assert w.dtype == torch.float32
    assert bool((w <= 1.0).all()) and bool((w > 0).all())
    assert bool((w[1:] >= w[:-1]).all())  # SNR falls with t, so min(snr, γ)/snr rises
    assert float(w[0]) == pytest.approx(5.0 / 1175.47058823527, rel=1e-6)
    assert float(w[100]) == pytest.approx(0.5914434194564819, rel=1e-6)
    assert float(w[999]) == 1.0
    assert float(sched.snr(499)) == pytest.approx(0.3844081182964796, rel=1e-9)


def toy_model(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A fixed, cheap ε-predictor that depends on x, t and the context."""
    c = ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return 0.3 * x + 0.2 * torch.tanh(c) + 0.001 * t.view(-1, 1, 1, 1).float() / 1000


def test_ddim_loop_fixed_sum(sched: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(1234)
    ctx = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)) + 1.0
    uncond = torch.zeros(1, 5, 16)
    out = sample(
        toy_model, (2, 4, 8, 8), ctx, uncond,
        schedule=sched, steps=10, guidance_scale=3.0, kind="ddim", generator=g,
    )
    assert out.shape == (2, 4, 8, 8)
    assert float(out.sum()) == pytest.approx(-1357.1422119140625, rel=1e-5)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sample_loop_matches_diffusers(sched: NoiseSchedule, kind: str) -> None:
    ctx = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros(2, 5, 16)
    ours = sample(
        toy_model, (2, 4, 8, 8), ctx, uncond, schedule=sched, steps=10,
        guidance_scale=2.5, kind=kind, generator=torch.Generator().manual_seed(9),  # type: ignore[arg-type]
    )
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ref = ddim_reference(10) if kind == "ddim" else ddpm_reference(10)
    for t in ref.timesteps:
        t_in = torch.full((4,), int(t))
        e_c, e_u = toy_model(torch.cat([x, x]), t_in, torch.cat([ctx, uncond]), None).chunk(2)
        eps = e_u + 2.5 * (e_c - e_u)
        x = ref.step(eps, t, x, generator=g).prev_sample if kind == "ddpm" else ref.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_sample_batches_cfg_in_one_call(sched: NoiseSchedule) -> None:
    calls: list[tuple[int, int, bool]] = []

    def spy(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.shape[0], ctx.shape[1], mask is not None))
        if mask is not None:
            assert mask.shape == ctx.shape[:2]
            assert bool((mask[2:, 3:] == 0).all())  # uncond padded from 3 to 6 tokens
        return toy_model(x, t, ctx, mask)

    ctx = torch.randn(2, 6, 8)
    sample(spy, (2, 4, 4, 4), ctx, torch.zeros(1, 3, 8), schedule=sched, steps=4,
           guidance_scale=5.0, kind="ddim", generator=torch.Generator().manual_seed(0))
    assert calls == [(4, 6, True)] * 4

    calls.clear()
    a = sample(spy, (2, 4, 4, 4), ctx, torch.zeros(2, 6, 8), schedule=sched, steps=3,
               guidance_scale=1.0, kind="ddim", generator=torch.Generator().manual_seed(0))
    b = sample(spy, (2, 4, 4, 4), ctx, None, schedule=sched, steps=3,
               guidance_scale=7.0, kind="ddim", generator=torch.Generator().manual_seed(0))
    assert calls == [(2, 6, False)] * 6
    torch.testing.assert_close(a, b)
