"""Checkpoints: a run killed mid-training and resumed repeats the uninterrupted run exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file
from tiny_diffusion import one_torch_thread, synthetic_pairs, tiny_train_config

from sd_core.training import checkpoint as ckpt
from sd_core.training.metrics import Progress, read_metrics
from sd_core.training.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


class Crash(RuntimeError):
    pass


def crash_after(step: int):
    def callback(progress: Progress) -> None:
        if progress.step == step:
            raise Crash(f"killed after step {step}")

    return callback


def run_config():
    # caption dropout, noise offset and held-out evaluations all draw or run between the saves; the losses are read
    # from the device every 3 steps and at the saves and evaluations (steps 3, 5, 6, 7, 9, 10, 12, ...)
    return tiny_train_config(steps=20, save_every=5, keep_last=2, val_every=7, caption_dropout=0.5, noise_offset=0.05,
                             log_every=3)


def losses(out: Path) -> dict[int, tuple[str, str, str]]:
    return {int(r["step"]): (r["train_loss"], r["val_loss"], r["ema_val_loss"]) for r in read_metrics(out / "metrics.csv")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    pairs = synthetic_pairs(40)
    a_dir, b_dir = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    a = Trainer(run_config(), pairs, a_dir, progress=False)
    a.train()

    b1 = Trainer(run_config(), pairs, b_dir, callbacks=[crash_after(12)], progress=False)
    with pytest.raises(Crash):
        b1.train()
    after_crash = {
        "latest": (b_dir / "checkpoints" / "latest").read_text().strip(),
        "folders": [p.name for p in ckpt.list_checkpoints(b_dir / "checkpoints")],
        "rows": sorted(losses(b_dir)),
    }
    b2 = Trainer(run_config(), pairs, b_dir, progress=False)
    b2.train(resume=True)
    return {"pairs": pairs, "a": a, "b": b2, "a_dir": a_dir, "b_dir": b_dir, "after_crash": after_crash}


def test_crash_leaves_checkpoint_10_as_latest(runs: dict) -> None:
    crash = runs["after_crash"]
    assert crash["latest"] == "checkpoint-0000010"
    assert crash["folders"] == ["checkpoint-0000005", "checkpoint-0000010"]
    assert crash["rows"] == list(range(1, 13))  # steps 11 and 12 ran, then were lost


def test_resumed_run_repeats_the_uninterrupted_losses(runs: dict) -> None:
    a, b = losses(runs["a_dir"]), losses(runs["b_dir"])
    assert sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        a_train, a_val, a_ema = a[step]
        b_train, b_val, b_ema = b[step]
        assert float(b_train) == pytest.approx(float(a_train), abs=1e-6), step
        assert (b_val == "") == (a_val == "") and (b_ema == "") == (a_ema == "")
        if a_val:
            assert float(b_val) == pytest.approx(float(a_val), abs=1e-6)
            assert float(b_ema) == pytest.approx(float(a_ema), abs=1e-6)


def test_resumed_run_ends_with_the_same_weights_ema_and_optimizer(runs: dict) -> None:
    a, b = runs["a"], runs["b"]
    for (name, pa), (_, pb) in zip(a.net.named_parameters(), b.net.named_parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=0, msg=name)
    ema_a, ema_b = a.ema.shadow_state(), b.ema.shadow_state()
    for name in ema_a:
        torch.testing.assert_close(ema_b[name], ema_a[name], atol=1e-6, rtol=0)
    assert (a.step, a.epoch, a.position) == (b.step, b.epoch, b.position)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"][0]["lr"] == sb["param_groups"][0]["lr"]
    for pid in sa["state"]:
        torch.testing.assert_close(sb["state"][pid]["exp_avg_sq"], sa["state"][pid]["exp_avg_sq"], atol=1e-9, rtol=0)


def test_keep_last_and_latest_pointer(runs: dict) -> None:
    root = runs["b_dir"] / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-0000015", "checkpoint-0000020"]
    assert ckpt.latest_checkpoint(root) == root / "checkpoint-0000020"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-0000015", "checkpoint-0000020", "latest"]


def test_checkpoint_holds_only_safetensors_and_json(runs: dict) -> None:
    folder = runs["b_dir"] / "checkpoints" / "checkpoint-0000020"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "checksums.json", "config.json", "ema.safetensors", "model.safetensors", "optimizer.json",
        "optimizer.safetensors", "rng-rank0.safetensors", "scheduler.json", "trainer_state.json",
    ]
    sums = json.loads((folder / "checksums.json").read_text())
    assert sorted(sums) == [n for n in names if n != "checksums.json"]
    rng = load_file(str(folder / "rng-rank0.safetensors"))
    assert all(v.dtype == torch.uint8 for v in rng.values())


def test_checkpoint_loads_from_its_folder_alone(runs: dict) -> None:
    """The folder says what model it holds: the config rebuilds the UNet, the weights fill it."""
    from sd_core.diffusion.models import ModelConfig, build_unet, load_trainable_state

    b = runs["b"]
    folder = runs["b_dir"] / "checkpoints" / "checkpoint-0000020"
    loaded = ckpt.load_checkpoint(folder)
    assert loaded.config["steps"] == 20 and loaded.config["model"]["kind"] == "scratch"
    side = loaded.trainer_state["latent_shape"][-1]
    model = build_unet(ModelConfig.model_validate(loaded.config["model"]), sample_size=side)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 16, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        load_trainable_state(model, loaded.ema)
        with b.ema.swapped_in():
            expected = b.net.eval()(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(model.eval()(x, t, encoder_hidden_states=ctx).sample, expected)
        load_trainable_state(model, loaded.model)
        torch.testing.assert_close(model(x, t, encoder_hidden_states=ctx).sample,
                                   b.net(x, t, encoder_hidden_states=ctx).sample)

    assert loaded.step == 20 and loaded.trainer_state["epoch"] * 4 + loaded.trainer_state["position"] // 8 == 20
    assert loaded.scheduler["total"] == 20


def test_resume_after_the_end_is_a_no_op(runs: dict) -> None:
    b_dir = runs["b_dir"]
    before = losses(b_dir)
    again = Trainer(run_config(), runs["pairs"], b_dir, progress=False)
    result = again.train(resume=True)
    assert result.step == 20 and losses(b_dir) == before
    assert result.checkpoint == b_dir / "checkpoints" / "checkpoint-0000020"


def test_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    pairs = synthetic_pairs(40)
    t = Trainer(tiny_train_config(steps=4, save_every=2), pairs, tmp_path, progress=False)
    t.train(until_step=2)
    root = tmp_path / "checkpoints"
    stale = ckpt.begin_checkpoint(root, 4)
    (stale / "model.safetensors").write_bytes(b"partial")
    resumed = Trainer(tiny_train_config(steps=4, save_every=2), pairs, tmp_path, progress=False)
    assert resumed.resume_latest() and resumed.step == 2
    resumed.train(resume=True)
    assert not stale.exists()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-0000002", "checkpoint-0000004"]


def test_optimizer_state_round_trip() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.8, 0.99))
    p.grad = torch.ones(3)
    opt.step()
    tensors, meta = ckpt.optimizer_state_to_files(opt.state_dict())
    back = ckpt.optimizer_state_from_files(tensors, meta)
    assert back["param_groups"][0]["betas"] == (0.8, 0.99)
    torch.testing.assert_close(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    opt2.load_state_dict(back)
    assert opt2.param_groups[0]["lr"] == 1e-3


def test_resume_with_a_different_data_set_is_refused(runs: dict, tmp_path: Path) -> None:
    fewer = synthetic_pairs(24)
    t = Trainer(run_config(), fewer, tmp_path, progress=False)
    with pytest.raises(ValueError, match="data set changed"):
        t.load(runs["b_dir"] / "checkpoints" / "checkpoint-0000020")


def test_resume_into_another_model_shape_is_refused(runs: dict, tmp_path: Path) -> None:
    from tiny_diffusion import tiny_unet_config

    from sd_core.diffusion.models import ModelConfig

    other = run_config().model_copy(update={"model": ModelConfig(unet=tiny_unet_config(h_dim=16))})
    t = Trainer(other, runs["pairs"], tmp_path, progress=False)
    with pytest.raises(ValueError, match="another model config"):
        t.load(runs["b_dir"] / "checkpoints" / "checkpoint-0000020")


def test_fresh_run_into_a_used_out_dir_is_refused(runs: dict) -> None:
    t = Trainer(run_config(), runs["pairs"], runs["b_dir"], progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        t.train()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(runs: dict, tmp_path: Path, caplog) -> None:
    import shutil

    b_dir = tmp_path / "b"
    shutil.copytree(runs["b_dir"], b_dir)
    newest = b_dir / "checkpoints" / "checkpoint-0000020"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    trainer = Trainer(run_config(), runs["pairs"], b_dir, progress=False)
    with caplog.at_level("WARNING"):
        assert trainer.resume_latest() and trainer.step == 15
    assert any("checkpoint-0000020 is not usable" in r.message and "model.safetensors is damaged" in r.message
               for r in caplog.records)
    assert (b_dir / "checkpoints" / ".damaged-checkpoint-0000020").is_dir() and not newest.exists()
    trainer.train(resume=True)  # and the run finishes from there, as the uninterrupted one did
    a = losses(runs["a_dir"])
    assert losses(b_dir) == a


def test_damaged_checkpoint_is_named_when_loaded(runs: dict, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "c"
    shutil.copytree(runs["b_dir"] / "checkpoints" / "checkpoint-0000020", folder)
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json is damaged"):
        ckpt.load_checkpoint(folder)
