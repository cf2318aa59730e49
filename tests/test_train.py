"""The trainer on a tiny synthetic data set: learning, held-out loss, caption dropout, EMA, loss options."""

from __future__ import annotations

import math
import re
from typing import Iterator

import pytest
import torch
from pydantic import ValidationError
from tiny_diffusion import one_torch_thread, synthetic_pairs, tiny_train_config

from sd_core.diffusion.config import ScheduleConfig
from sd_core.encode.pairs import Pairs, split_ids
from sd_core.training.config import TrainConfig
from sd_core.training.ema import EMA
from sd_core.training.lr import CosineLR
from sd_core.training.metrics import read_metrics, read_progress
from sd_core.training.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def pairs() -> Pairs:
    return synthetic_pairs(40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, pairs: Pairs) -> tuple[Trainer, object]:
    out = tmp_path_factory.mktemp("train")
    cfg = tiny_train_config(steps=60, caption_dropout=0.1, val_every=20, save_every=30)
    trainer = Trainer(cfg, pairs, out, progress=False)
    return trainer, trainer.train()


def test_loss_decreases_and_held_out_loss_is_logged(trained: tuple[Trainer, object]) -> None:
    trainer, result = trained
    rows = read_metrics(trainer.metrics_csv)
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    train = [float(r["train_loss"]) for r in rows]
    first, last = sum(train[:10]) / 10, sum(train[-10:]) / 10
    print(f"train loss: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last < 0.7 * first

    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    ema_val = {int(r["step"]): float(r["ema_val_loss"]) for r in rows if r["ema_val_loss"]}
    assert sorted(val) == sorted(ema_val) == [20, 40, 60]
    assert all(math.isfinite(v) for v in [*val.values(), *ema_val.values()])
    assert val[60] < val[20]
    assert result.val_loss == pytest.approx(val[60])
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[-1]["lr"]) < 1.1e-4
    assert float(rows[-1]["seconds"]) > 0


def test_run_writes_metrics_curve_and_checkpoints_and_no_export(trained: tuple[Trainer, object]) -> None:
    from sd_core.training.stage import export_model

    trainer, result = trained
    out = trainer.out_dir
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "metrics.csv").read_text().splitlines()[0] == "step,train_loss,val_loss,ema_val_loss,lr,seconds"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000030", "checkpoint-0000060", "latest"]
    assert result.checkpoint == out / "checkpoints" / "checkpoint-0000060"
    assert not (out / "model").exists()  # the trainer only trains: the train stage exports
    # a from-scratch export bundles the VAE and text encoder; without them (synthetic pairs) none is written
    assert export_model(result.checkpoint, out / "model", items=40) is None and not (out / "model").exists()


def test_held_out_loss_is_fixed_noise_and_timesteps(trained: tuple[Trainer, object]) -> None:
    trainer, _ = trained
    before = trainer.generator.get_state()
    assert trainer.evaluate() == trainer.evaluate()
    assert torch.equal(trainer.generator.get_state(), before)
    assert trainer._val.t.unique().numel() == trainer.config.val_repeats


def _count_empty_captions(trainer: Trainer) -> list[tuple[int, int]]:
    """(rows, rows with the empty caption) of each training forward."""
    seen: list[tuple[int, int]] = []
    empty = trainer.empty_text

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            ctx = kwargs["encoder_hidden_states"]
            is_empty = (ctx == empty).flatten(1).all(dim=1)
            seen.append((ctx.shape[0], int(is_empty.sum())))

    trainer.net.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_caption_dropout_uses_empty_embedding_at_rate(tmp_path, pairs: Pairs, p: float) -> None:
    steps = 40 if p == 0.5 else 3
    trainer = Trainer(tiny_train_config(steps=steps, caption_dropout=p), pairs, tmp_path, progress=False)
    seen = _count_empty_captions(trainer)
    trainer.train()
    rows, dropped = sum(r for r, _ in seen), sum(d for _, d in seen)
    assert rows == steps * 8
    print(f"caption dropout {p}: {dropped}/{rows} empty")
    if p == 0.5:
        assert 0.4 < dropped / rows < 0.6  # 320 draws: ±0.1 is > 3.5 standard deviations
    else:
        assert dropped == round(p * rows)


def test_mirrored_latents_are_drawn_for_half_the_training_items(tmp_path) -> None:
    """Originals are > 0 and mirrors < 0 (as the encode stage caches them with ``encode.vae.flip``), so the sign
    of each noised latent says which one a step drew."""
    base = synthetic_pairs(40, flip=True)
    pairs = Pairs(**{**base.__dict__, "mean": base.mean.abs() + 1.0, "mean_flip": -(base.mean.abs() + 1.0)})
    trainer = Trainer(tiny_train_config(steps=40, val_every=20), pairs, tmp_path, progress=False)
    seen: list[tuple[bool, torch.Tensor]] = []
    add_noise = trainer.noise.add_noise

    def recording(x0, noise, t):  # type: ignore[no-untyped-def]
        mirrored = (x0 < 0).flatten(1).all(1)
        assert ((x0 > 0).flatten(1).all(1) | mirrored).all()  # whole items, never mixed
        seen.append((trainer.net.training, mirrored))
        return add_noise(x0, noise, t)

    trainer.noise.add_noise = recording
    trainer.train()
    train = torch.cat([m for training, m in seen if training])
    held_out = torch.cat([m for training, m in seen if not training])
    assert len(train) == 40 * 8 and len(held_out) > 0
    assert 0.4 < train.float().mean() < 0.6  # 320 draws: ±0.1 is > 3.5 standard deviations
    assert not held_out.any()  # the held-out loss is measured on the images as they are


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_training_timesteps_follow_the_configured_density(tmp_path, pairs: Pairs, sampling: str) -> None:
    """Uniform timesteps cover the schedule evenly; logit-normal with mean 1 puts about 84 % of steps in the
    noisier half (P(N(1, 1) > 0))."""
    cfg = tiny_train_config(steps=40, val_fraction=0.0, timestep_sampling=sampling, timestep_logit_mean=1.0)
    trainer = Trainer(cfg, pairs, tmp_path, progress=False)
    drawn: list[torch.Tensor] = []
    add_noise = trainer.noise.add_noise

    def recording(x0, noise, t):  # type: ignore[no-untyped-def]
        drawn.append(t.clone())
        return add_noise(x0, noise, t)

    trainer.noise.add_noise = recording
    trainer.train()
    t = torch.cat(drawn)
    assert len(t) == 40 * 8 and t.dtype == torch.long and 0 <= t.min() and t.max() < 1000
    noisier = (t >= 500).float().mean().item()
    print(f"{sampling}: {noisier:.2f} of {len(t)} timesteps >= 500")
    if sampling == "uniform":
        assert 0.4 < noisier < 0.6  # 320 draws: ±0.1 is > 3.5 standard deviations
    else:
        assert 0.75 < noisier < 0.93


def test_ema_differs_from_raw_weights_and_tracks_them(tmp_path, pairs: Pairs) -> None:
    trainer = Trainer(tiny_train_config(steps=30, ema_decay=0.9), pairs, tmp_path, progress=False)
    init = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
    trainer.train()
    raw = {n: p.detach() for n, p in trainer.net.named_parameters()}
    ema = trainer.ema.shadow_state()
    dist = lambda a, b: sum(float((a[n] - b[n]).pow(2).sum()) for n in raw) ** 0.5  # noqa: E731
    assert trainer.ema.optimization_step == 30
    assert dist(ema, raw) > 0
    assert dist(ema, raw) < 0.5 * dist(init, raw)


def test_ema_update_rule() -> None:
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, decay=0.9, warmup=False)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.step()
    torch.testing.assert_close(ema.shadow_state()["weight"], 0.9 * start + 0.1 * lin.weight.detach())
    assert ema.get_decay(1) == ema.get_decay(500) == 0.9


def test_ema_follows_diffusers_ema_model_and_swaps_its_weights_in() -> None:
    """The warm-up EMA is diffusers' ``EMAModel`` (same decay at every update, same averages up to rounding),
    and ``swapped_in`` puts the averages in the model for a block and the trained weights back after it."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # only what trains is averaged
    ours = EMA(model, decay=0.99)
    trained = [p for p in model.parameters() if p.requires_grad]
    theirs = EMAModel(trained, decay=0.99)
    for _ in range(40):
        with torch.no_grad():
            for p in trained:
                p.add_(torch.randn_like(p) * 0.1)
        ours.step()
        theirs.step(trained)
        assert ours.cur_decay_value == theirs.cur_decay_value
    assert ours.cur_decay_value == pytest.approx(min(0.99, 40 / 49))  # (1 + n) / (10 + n), n = 39
    assert sorted(ours.shadow_state()) == ["0.weight", "1.bias", "1.weight"]
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    raw = [p.detach().clone() for p in model.parameters()]
    with ours.swapped_in():
        for p, shadow in zip(trained, ours.shadow_params):
            assert torch.equal(p, shadow)
        assert torch.equal(model[0].bias, raw[1])  # a frozen parameter is left alone
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, pairs: Pairs) -> Trainer:
    trainer = Trainer(tiny_train_config(steps=100, ema_decay=0.9, save_every=100), pairs,
                      tmp_path_factory.mktemp("first"), progress=False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode, updates, decay", [("keep", 100, 0.9), ("rewarm", 0, 0.9), ("adapt", 100, 0.5)])
def test_a_continuation_keeps_rewarms_or_adapts_the_ema(tmp_path, pairs: Pairs, finished_run: Trainer, mode: str,
                                                        updates: int, decay: float) -> None:
    from sd_core.training import checkpoint as ckpt

    old = finished_run.ema.shadow_state()
    nxt = Trainer(tiny_train_config(steps=6, ema_decay=0.9), pairs, tmp_path, progress=False)
    nxt.init_from(ckpt.latest_checkpoint(finished_run.checkpoint_root), ema=mode)
    assert nxt.ema.optimization_step == updates and nxt.ema.decay == pytest.approx(decay)  # adapt: 1 - 3/6
    nxt.train()
    raw = {n: p.detach() for n, p in nxt.net.named_parameters()}
    share_old = sum(float((nxt.ema.shadow_state()[n] - raw[n]).norm()) for n in raw) / sum(
        float((old[n] - raw[n]).norm()) for n in raw)
    # keep: 0.9^6 = 53 % of the average is still the old EMA; rewarm and adapt follow the new weights
    assert (share_old > 0.4) if mode == "keep" else (share_old < 0.15)


def test_min_snr_weights_lower_the_loss_and_noise_offset_runs(tmp_path, pairs: Pairs) -> None:
    def first_loss(**kw: object) -> list[float]:
        out = tmp_path / "_".join(f"{k}{v}" for k, v in kw.items())
        t = Trainer(tiny_train_config(steps=3, **kw), pairs, out, progress=False)
        t.train()
        return [float(r["train_loss"]) for r in read_metrics(t.metrics_csv)]

    plain, snr = first_loss(), first_loss(min_snr_gamma=5.0)
    offset = first_loss(noise_offset=0.1, min_snr_gamma=1.0)
    assert all(math.isfinite(v) for v in plain + snr + offset)
    assert snr[0] < plain[0]  # same model and draws, weights min(snr, γ)/snr ≤ 1


def test_v_prediction_with_zero_terminal_snr_learns(tmp_path, pairs: Pairs) -> None:
    schedule = ScheduleConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    trainer = Trainer(tiny_train_config(steps=60, val_every=30, schedule=schedule), pairs, tmp_path, progress=False)
    assert trainer.noise.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    trainer.train()
    rows = read_metrics(trainer.metrics_csv)
    train = [float(r["train_loss"]) for r in rows]
    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}  # held-out v-MSE
    print(f"v-MSE: train first 10 steps {sum(train[:10]) / 10:.3f}, last 10 {sum(train[-10:]) / 10:.3f}; "
          f"held-out {val}")
    assert sum(train[-10:]) < 0.9 * sum(train[:10])  # the velocity carries the image, so it falls slower than ε
    assert sorted(val) == [30, 60] and val[60] < val[30]


def test_cosine_lr() -> None:
    lr = CosineLR(1e-4, 1e-5, total=100, warmup=10)
    assert lr(0) == pytest.approx(1e-5)
    assert lr(9) == pytest.approx(1e-4)
    assert lr(10) == pytest.approx(1e-4)
    assert lr(55) == pytest.approx(5.5e-5)
    assert lr(100) == pytest.approx(1e-5)


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="exactly one of steps and epochs"):
        TrainConfig(steps=10, epochs=2)
    with pytest.raises(ValidationError, match="Extra inputs"):
        TrainConfig(stepz=10)
    with pytest.raises(ValidationError):
        TrainConfig(mixed_precision="fp8")
    assert TrainConfig(mixed_precision="fp16").mixed_precision == "fp16"  # with a gradient scaler on CUDA
    assert TrainConfig(epochs=3).steps is None
    with pytest.raises(ValidationError, match="schedule: only for model.kind = 'scratch'"):
        TrainConfig(model={"kind": "pretrained_attn2"}, schedule={"prediction_type": "v_prediction"})


def test_epochs_set_the_length(tmp_path, pairs: Pairs) -> None:
    cfg = tiny_train_config(steps=None, epochs=2)
    trainer = Trainer(cfg, pairs, tmp_path, progress=False)
    assert trainer.total_steps == 2 * (len(trainer.train_items) // 8)
    first = trainer.data.order(0)
    assert sorted(first) == sorted(trainer.train_items) and first != trainer.data.order(1)


def test_batch_larger_than_the_train_split_is_refused(tmp_path, pairs: Pairs) -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(tiny_train_config(batch_size=64), pairs, tmp_path, progress=False)


def test_split_is_stable_disjoint_and_survives_growth() -> None:
    ids = [f"{i:032x}" for i in range(1000)]
    train, val = split_ids(ids, 0.1, seed=42)
    assert not set(train) & set(val) and len(train) + len(val) == 1000
    assert 70 < len(val) < 130
    grown_train, grown_val = split_ids(ids + [f"new{i}" for i in range(200)], 0.1, seed=42)
    assert {ids[i] for i in val} <= {(ids + [f"new{i}" for i in range(200)])[i] for i in grown_val}
    assert split_ids(ids, 0.1, seed=42) == (train, val)
    assert split_ids(ids, 0.1, seed=7) != (train, val)
    assert len(split_ids(ids[:5], 0.1)[1]) == 1


def test_tensorboard_tracker_gets_loss_lr_held_out_loss_and_images(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sd_core.common.images import save_png

    def sampler(unet, prompts, seeds, out_path):  # a stand-in grid: the tracker must pick up whatever is drawn
        from PIL import Image

        save_png(Image.new("RGB", (32, 16), (200, 10, 10)), out_path)

    cfg = tiny_train_config(steps=6, val_every=3, sample_every=3, trackers=("tensorboard",))
    Trainer(cfg, synthetic_pairs(40), tmp_path, sampler=sampler, progress=False).train()
    logs = list((tmp_path / "emoji-sd").rglob("events.out.tfevents.*"))
    assert logs, sorted(p.name for p in tmp_path.rglob("*"))
    events = EventAccumulator(str(logs[0].parent), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/loss", "val/ema_loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6]
    assert tags["images"] and [e.step for e in events.Images(tags["images"][0])] == [3, 6]


def test_gradient_accumulation_consumes_the_global_batch(tmp_path, pairs: Pairs) -> None:
    cfg = tiny_train_config(steps=None, epochs=2, batch_size=4, gradient_accumulation_steps=2, val_every=1000)
    trainer = Trainer(cfg, pairs, tmp_path, progress=False)
    n_train = len(trainer.train_items)
    assert trainer.steps_per_epoch == n_train // 8 and trainer.total_steps == 2 * (n_train // 8)
    result = trainer.train()
    assert result.step == trainer.total_steps and trainer.epoch == 2 and trainer.position == 0
    rows = read_metrics(trainer.metrics_csv)
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(tmp_path) -> None:
    from sd_core.training import checkpoint as ckpt
    from sd_core.training.trainer import NonFiniteError

    base = synthetic_pairs(40)
    cfg = tiny_train_config(steps=30, save_every=2, val_every=1000)
    trained = split_ids(base.ids, cfg.val_fraction, cfg.split_seed, cfg.val_min_items)[0][0]
    mean = base.mean.clone()
    mean[trained] = float("nan")  # one cached latent read back as NaN (bit rot the cache did not catch)
    pairs = Pairs(**{**base.__dict__, "mean": mean})
    trainer = Trainer(cfg, pairs, tmp_path, progress=False)
    with pytest.raises(NonFiniteError, match=r"the training loss is nan at step (\d+); the run stopped") as err:
        trainer.train()
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    saved = [ckpt.load_step(p) for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert saved and max(saved) < bad_step  # nothing after the NaN step was written
    assert all(math.isfinite(v) for v in ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "checkpoints")[-1])
               .model["conv_out.bias"].tolist())
    rows = read_metrics(tmp_path / "metrics.csv")
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert not (tmp_path / "model").exists()


def test_losses_are_read_once_a_log_interval_and_every_step_keeps_its_row(tmp_path, pairs: Pairs) -> None:
    """With log_every=5 the losses stay on the device between reads (steps 5, 7 (a save), 10 and 12 (the last)),
    each read is one report of their mean, and every step still gets its row; seconds are on the read rows."""
    from sd_core.training.metrics import Progress

    reports: list[Progress] = []
    cfg = tiny_train_config(steps=12, log_every=5, save_every=7)
    trainer = Trainer(cfg, pairs, tmp_path, callbacks=[reports.append], progress=False)
    reads: list[list[int]] = []
    read = trainer.read
    trainer.read = lambda steps: reads.append([s.step for s in steps]) or read(steps)  # type: ignore[method-assign]
    trainer.train()
    assert reads == [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11, 12]]
    rows = read_metrics(trainer.metrics_csv)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [int(r["step"]) for r in rows if r["seconds"]] == [p.step for p in reports] == [5, 7, 10, 12]
    loss = {int(r["step"]): float(r["train_loss"]) for r in rows}
    assert reports[0].loss == pytest.approx(sum(loss[s] for s in range(1, 6)) / 5)
    assert reports[-1].loss == pytest.approx((loss[11] + loss[12]) / 2)
    assert float(rows[-1]["seconds"]) >= float(rows[4]["seconds"]) > 0
    assert read_progress(tmp_path / "progress.json") == reports[-1]


def test_a_non_finite_loss_between_logs_is_caught_before_the_next_checkpoint(tmp_path) -> None:
    """The NaN guard reads the steps since the last read before every checkpoint, so a NaN between logs is named
    with its step and nothing after it is saved."""
    from sd_core.training import checkpoint as ckpt
    from sd_core.training.trainer import NonFiniteError

    base = synthetic_pairs(40)
    cfg = tiny_train_config(steps=30, save_every=3, log_every=1000)
    # an item of the first epoch's last batch (step 4 of 32 train items in batches of 8): after the save at step 3
    data = Trainer(cfg, base, tmp_path / "order", progress=False).data
    late = data.order(0)[-1]
    mean = base.mean.clone()
    mean[late] = float("nan")  # a cached latent read back as NaN
    trainer = Trainer(cfg, Pairs(**{**base.__dict__, "mean": mean}), tmp_path / "run", progress=False)
    with pytest.raises(NonFiniteError, match=r"the training loss is nan at step (\d+)") as err:
        trainer.train()
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    assert bad_step == len(data.order(0)) // 8 == 4
    saved = [ckpt.load_step(p) for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert saved and max(saved) < bad_step <= trainer.step < bad_step + 3  # caught at the next save at the latest
