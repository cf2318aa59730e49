"""Noise schedules and samplers are diffusers' own: the seed's betas, four samplers built from a model's own
scheduler config, and min-SNR weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from sd_core.diffusion.export import load_pipeline
from sd_core.diffusion.generate import generate, use_sampler
from sd_core.diffusion.schedulers import (SAMPLERS, ScheduleConfig, min_snr_weights, prediction_target, sampler,
                                         training_scheduler)


def test_training_schedule_is_the_seeds() -> None:
    s = training_scheduler(ScheduleConfig())
    assert isinstance(s, DDPMScheduler)
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.betas.double(), expected, rtol=1e-6, atol=1e-9)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0046600, rel=1e-4)  # the SD 1.x schedule's end
    linear = training_scheduler(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    with pytest.raises(ValueError, match="beta_end"):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)


def test_min_snr_weights_cap_the_easy_timesteps() -> None:
    s = training_scheduler(ScheduleConfig())
    t = torch.tensor([0, 50, 200, 999])
    w = min_snr_weights(s, t, 5.0)
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    assert (w <= 1).all() and torch.all((snr <= 5) == torch.isclose(w, torch.ones_like(w)))
    assert w[0] == pytest.approx(5.0 / snr[0].item(), rel=1e-4)


def test_zero_terminal_snr_ends_in_pure_noise_and_predicts_velocity() -> None:
    cfg = ScheduleConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    s = training_scheduler(cfg)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)  # the seed's schedule ends at 0.00466
    # the first timestep keeps the seed's noise level: only the end of the schedule is bent down to zero
    assert s.alphas_cumprod[0].item() == pytest.approx(training_scheduler(ScheduleConfig()).alphas_cumprod[0].item(),
                                                       rel=1e-3)
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    v = prediction_target(s, x0, noise, t)
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    torch.testing.assert_close(v[2], -x0[2])  # at t = T the velocity is the image itself, negated
    assert prediction_target(training_scheduler(ScheduleConfig()), x0, noise, t) is noise
    # min-SNR for v-prediction is min(snr, γ) / (snr + 1): finite at zero SNR, where it is 0
    w = min_snr_weights(s, t, 5.0)
    snr = ab.flatten() / (1 - ab.flatten())
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / (snr + 1))
    assert torch.isfinite(w).all() and w[2].item() == pytest.approx(0.0, abs=1e-6)
    # sampling starts from t = T, the pure noise the model was trained to start from, with every sampler
    for name in SAMPLERS:
        smp = sampler(name, cfg.scheduler_config())
        smp.set_timesteps(10)
        assert int(smp.timesteps[0]) == 999 and smp.config.prediction_type == "v_prediction", name
    with pytest.raises(ValueError, match="rescale_betas_zero_snr.*v_prediction"):
        ScheduleConfig(rescale_betas_zero_snr=True)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_keeps_the_models_betas(name: str) -> None:
    base = ScheduleConfig().scheduler_config()
    s = sampler(name, base)
    torch.testing.assert_close(s.betas, training_scheduler(ScheduleConfig()).betas)
    s.set_timesteps(20)
    assert len(s.timesteps) == 20 and int(s.timesteps.max()) <= 999
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler("plms", base)


def test_each_sampler_draws_through_the_pipeline(tiny_sd: Path) -> None:
    pipe = load_pipeline(tiny_sd)
    latents = {}
    for name in SAMPLERS:
        (image,), = generate(pipe, ["frog emoji"], [0], guidance_scale=5.0, steps=4, sampler_name=name)
        assert image.size == (64, 64) and type(pipe.scheduler).__name__ == type(sampler(name, {})).__name__
        latents[name] = pipe("frog emoji", num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                             generator=torch.Generator().manual_seed(0)).images
    names = list(latents)
    for i, a in enumerate(names):  # four different samplers, four different results from the same noise
        for b in names[i + 1:]:
            assert not torch.allclose(latents[a], latents[b]), (a, b)


def test_an_sd_folders_scheduler_config_is_honoured(tiny_sd: Path) -> None:
    """steps_offset=1 and set_alpha_to_one=False come from the folder: DDIM timesteps are SD's, and the image is
    the one StableDiffusionPipeline draws with the same scheduler."""
    own = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    pipe = use_sampler(load_pipeline(tiny_sd), "ddim")
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.set_alpha_to_one is False
    pipe.scheduler.set_timesteps(10)
    own.set_timesteps(10)
    assert pipe.scheduler.timesteps.tolist() == own.timesteps.tolist() == list(range(901, 0, -100))
    ours = generate(pipe, ["cat emoji"], [3], guidance_scale=4.0, steps=10, sampler_name="ddim")[0][0]
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    theirs = reference("cat emoji", guidance_scale=4.0, num_inference_steps=10,
                       generator=torch.Generator().manual_seed(3)).images[0]
    assert list(ours.getdata()) == list(theirs.getdata())


def test_ddim_loop_is_the_ddim_update_computed_here(tiny_sd: Path) -> None:
    """A full deterministic DDIM loop through our sampler on a fixed seed gives the latents of diffusers' own
    pipeline with the same seed, and of the DDIM update written out (η = 0) with the same UNet, text states
    and starting noise, all computed on this machine: no number measured on another CPU."""
    prompt, steps, guidance = "grinning face emoji", 5, 3.0
    pipe = use_sampler(load_pipeline(tiny_sd), "ddim")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)

    reference = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(latents, theirs, rtol=0, atol=0)

    # the same loop written out: x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    cfg = pipe.scheduler.config
    assert cfg.prediction_type == "epsilon" and not cfg.thresholding and not cfg.set_alpha_to_one
    alphas = pipe.scheduler.alphas_cumprod.double()
    ratio = cfg.num_train_timesteps // steps
    timesteps = [t + cfg.steps_offset for t in range(ratio * (steps - 1), -1, -ratio)]  # "leading" spacing
    assert pipe.scheduler.timesteps.tolist() == timesteps == [801, 601, 401, 201, 1]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        for t in timesteps:
            eps_uncond, eps_cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])
                                             ).sample.double().chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            a_t = alphas[t]
            a_prev = alphas[t - ratio] if t - ratio >= 0 else alphas[0]  # set_alpha_to_one = False
            x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            if cfg.clip_sample:  # DDIM from this folder's config clips x0 (the step keeps the model's eps)
                x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
            x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    torch.testing.assert_close(latents, x, rtol=1e-4, atol=1e-4)
