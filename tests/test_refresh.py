"""Refresh cycles through the real pipeline on a tiny local site: when training continues, retrains, extends
or is reused, what a killed continuation resumes to, and how many run folders stay on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import by_stage, config
from tiny_diffusion import one_torch_thread

from sd_core.demo.emoji_art import build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog
from sd_core.store.records import load_stage
from sd_core.training import checkpoint as ckpt
from sd_core.training.metrics import read_metrics

SETTINGS = ["train.steps=8", "train.continue_steps=4", "train.save_every=2", "train.val_every=4",
            "train.sample_every=null", "sample.guidance_sweep=[]", "sample.images_per_prompt=1"]


@pytest.fixture(autouse=True)
def _threads():
    with one_torch_thread():
        yield


def runs(cat: Catalog) -> list[str]:
    return sorted(p.name for p in cat.train_dir.glob("run-*"))


def steps_trained(run: Path) -> int:
    return int(read_metrics(run / "metrics.csv")[-1]["step"])


def test_refresh_cycles(tmp_path, prefect_harness):
    from flows.pipeline import pipeline
    from sd_core.diffusion.champion import champion_run

    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(30, seed=3), per_page=12) as site:
        def run(*sets: str, **kw):
            return by_stage(pipeline(config(site, tmp_path, *SETTINGS, *sets), progress=False, **kw))

        first = run()
        assert first["train"].summary["steps"] == 8 and first["train"].summary["continued_from"] is None
        run1 = cat.latest_run()

        # a logging or checkpoint knob is not part of the run: nothing is retrained
        knobs = run("train.val_every=2", "train.save_every=4", "train.log_every=2", start="train")
        assert knobs["train"].status == "reused" and runs(cat) == [run1.name]

        # more steps: the run goes on from its last checkpoint to the new total, in a new folder: run 1's export
        # (the champion) stays exactly what was evaluated, and the longer run is scored and gated like any refresh
        exported = (run1 / "model" / "emoji_sd_model.json").read_text()
        longer = run("train.steps=12", start="train")
        run12 = cat.run_dir(f"{run1.name}-s12")
        assert longer["train"].status == "ran" and longer["train"].summary["run"] == run12.name
        assert longer["train"].summary["resumed"] and steps_trained(run12) == 12 and steps_trained(run1) == 8
        assert [int(r["step"]) for r in read_metrics(run12 / "metrics.csv")] == list(range(1, 13))
        assert (run1 / "model" / "emoji_sd_model.json").read_text() == exported
        assert longer["eval"].summary["run"] == run12.name and longer["eval"].summary["decision"] != "champion"
        champion = champion_run(cat)

        # a new emoji: a new run continues from the champion for continue_steps, its EMA's decay adapted to them
        site.prepend(build_growth_items(1, seed=3, after=30))
        grown = run("train.steps=12")
        t = grown["train"].summary
        assert t["continued_from"] == champion.name and t["steps"] == 4
        assert grown["encode"].summary["images_encoded"] == 1
        run2 = cat.latest_run()
        state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run2 / "checkpoints")).trainer_state
        assert state["ema_updates"] == steps_trained(champion) + 4  # adapted, not re-warmed: its count goes on

        # a wider UNet: trained from scratch, and the record says why
        wider = run("train.steps=12", "train.model.unet.h_dim=64", start="train")
        w = wider["train"].summary
        assert w["continued_from"] is None and w["steps"] == 12
        assert "settings that shape the model changed: model.unet.h_dim" in w["plan"]
        # keep_runs = 2: of the four runs, two stay (the latest and the champion when it trained are kept)
        assert len(runs(cat)) == 2 and {cat.latest_run().name, champion_run(cat).name} <= set(runs(cat))
        assert cat.latest_run().is_dir() and (cat.latest_run() / "model").is_dir()


KILLER = """
import sys
from flows.cli import main
sys.exit(main(["train", "--data-dir", sys.argv[1], "--preset", "demo", "--no-progress", *sys.argv[2:]]))
"""


def test_killed_continuation_resumes_to_its_own_length(tmp_path, prefect_harness):
    from test_pipeline import FAST

    from flows.pipeline import pipeline

    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(30, seed=4), per_page=12) as site:
        pipeline(config(site, tmp_path, *SETTINGS), progress=False)
        site.prepend(build_growth_items(2, seed=4, after=30))
        pipeline(config(site, tmp_path, *SETTINGS), until="encode", progress=False)
    before = set(runs(cat))
    sets = [a for s in [*FAST, *SETTINGS, "train.continue_steps=40", "train.save_every=2"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path), *sets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            new = set(runs(cat)) - before
            if new and ckpt.list_checkpoints(cat.run_dir(new.pop()) / "checkpoints"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the continuation never saved a checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (run2,) = set(runs(cat)) - before
    plan = json.loads((cat.run_dir(run2) / "plan.json").read_text())
    assert plan["kind"] == "continue" and plan["steps"] == 40
    killed_at = ckpt.load_step(ckpt.latest_checkpoint(cat.run_dir(run2) / "checkpoints"))
    assert 0 < killed_at < 40

    # the rerun asks for other lengths; the killed continuation still finishes its own plan
    other = [a for s in [*FAST, *SETTINGS, "train.continue_steps=7", "train.steps=99"] for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path), *other], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cat.latest_run().name == run2 and steps_trained(cat.run_dir(run2)) == 40
    rows = read_metrics(cat.run_dir(run2) / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 41))


def test_forced_retrain_killed_midway_keeps_the_old_model(tmp_path, prefect_harness):
    from test_pipeline import FAST

    from flows.pipeline import pipeline
    from sd_core.diffusion.champion import served_model
    from sd_core.diffusion.export import load_pipeline
    from sd_core.status import stage_status

    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(30, seed=6), per_page=12) as site:
        cfg = config(site, tmp_path, *SETTINGS, "train.steps=40")
        pipeline(cfg, progress=False)
    run = cat.latest_run()
    before = (run / "model" / "emoji_sd_model.json").read_text()
    sets = [a for s in [*FAST, *SETTINGS, "train.steps=40"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert {r.stage: r.state for r in stage_status(cfg)}["train"] == "cached"
    # --force retrains the run from scratch beside the old one
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path), "--force", *sets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    staged = run.with_name(run.name + ".forced")
    try:
        deadline = time.monotonic() + 180
        while not ckpt.list_checkpoints(staged / "checkpoints"):
            assert time.monotonic() < deadline, "the forced rerun never saved a checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the old model is untouched and loads; status does not call the train stage cached
    assert (run / "model" / "emoji_sd_model.json").read_text() == before
    load_pipeline(served_model(cat))
    train = next(r for r in stage_status(cfg) if r.stage == "train")
    assert train.state == "stale" and "interrupted" in train.detail

    # the next run finishes the forced rerun, then swaps it in
    done = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path), *sets], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finishing an interrupted forced rerun" in load_stage(cat, "train").summary["plan"]
    assert not staged.exists() and cat.latest_run() == run and steps_trained(run) == 40
    assert [int(r["step"]) for r in read_metrics(run / "metrics.csv")] == list(range(1, 41))
    # retraining from scratch with the same seed and data reproduces the model file for file
    assert (run / "model" / "emoji_sd_model.json").read_text() == before


def test_new_training_options_name_a_new_run_only_when_set(tmp_path) -> None:
    """Runs trained before a setting existed keep their keys (its default adds nothing); choosing another density
    is a change that shapes the model, so the plan retrains and says which setting changed."""
    from tiny_models import build_tiny_clip, build_tiny_vae

    from sd_core.encode.stage import EncodeStageConfig
    from sd_core.training.config import TrainStageConfig
    from sd_core.training.plan import SHAPING_FIELDS, _changed, shaping

    enc = EncodeStageConfig.model_validate({"vae": {"model_id": str(build_tiny_vae(tmp_path / "vae"))},
                                            "text": {"model_id": str(build_tiny_clip(tmp_path / "clip"))}})
    uniform = shaping(TrainStageConfig(), enc)
    assert "timesteps" not in uniform and set(SHAPING_FIELDS) <= set(uniform)
    biased = shaping(TrainStageConfig(timestep_sampling="logit_normal", timestep_logit_mean=0.5), enc)
    assert biased["timesteps"] == {"timestep_sampling": "logit_normal", "timestep_logit_mean": 0.5,
                                   "timestep_logit_std": 1.0}
    assert _changed(uniform, biased) == ["timesteps"]
    # the same for the zero-terminal-SNR schedule: the default's key is what it was before the option existed
    assert set(uniform["schedule"]) == {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                        "prediction_type"}
    zero_snr = shaping(TrainStageConfig(schedule={"prediction_type": "v_prediction",
                                                  "rescale_betas_zero_snr": True}), enc)
    assert _changed(uniform, zero_snr) == ["schedule.prediction_type", "schedule.rescale_betas_zero_snr"]
