"""Training outside Prefect (`emoji-sd train`) and in two processes: launched by the train stage through
`accelerate launch` (gloo on the CPU here), it trains what one process trains at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import FAST, config

from sd_core.demo.emoji_art import build_demo_items
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog
from sd_core.store.records import load_stage
from sd_core.training.metrics import read_metrics

TRAIN = [*FAST, "train.steps=6", "train.save_every=3", "train.val_every=3", "train.sample_every=null",
         "train.caption_dropout=0.3", "train.on_new_data=retrain"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, prefect_harness) -> Path:
    """A data dir whose stages ran up to encode (24 demo emoji)."""
    from flows.pipeline import pipeline

    data = tmp_path_factory.mktemp("encoded") / "data"
    with DemoSite(build_demo_items(24, seed=5), per_page=12) as site:
        pipeline(config(site, data), until="encode", progress=False)
    return data


def train_cli(data: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "flows.cli", "train", "--data-dir", str(data), "--preset", "demo", "--no-progress"]
    for s in [*TRAIN, *sets]:
        args += [s] if s.startswith("--") else ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def losses(run: Path) -> list[float]:
    return [float(r["train_loss"]) for r in read_metrics(run / "metrics.csv")]


def test_two_processes_train_what_one_process_trains(encoded: Path) -> None:
    cat = Catalog(encoded)
    single = train_cli(encoded, "train.batch_size=8")
    assert single.returncode == 0, single.stderr[-3000:]
    assert single.stdout.strip().splitlines()[-1].startswith("train: ran")
    one = losses(cat.latest_run())

    # 2 processes × batch 4 is the same run as 1 × 8 (same global batch): reused, unless forced
    same = train_cli(encoded, "train.batch_size=4", "train.processes=2")
    assert same.returncode == 0 and "train: reused" in same.stdout
    double = train_cli(encoded, "train.batch_size=4", "train.processes=2", "--force")  # launches 2 processes
    assert double.returncode == 0, double.stderr[-3000:]
    run = cat.latest_run()

    record = load_stage(cat, "train")
    assert record is not None and record.status == "ran" and record.summary["processes"] == 2
    assert record.summary["steps"] == 6 and record.summary["run"] == run.name
    two = losses(run)
    assert len(one) == len(two) == 6
    # same items, same random draws, gradients averaged over the two halves: equal up to summation order
    for x, y in zip(one, two):
        assert abs(x - y) <= 1e-4 * abs(x), (one, two)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-0000003", "checkpoint-0000006",
                                                                        "latest"]
    ckpt = run / "checkpoints" / "checkpoint-0000006"
    assert sorted(p.name for p in ckpt.glob("rng-rank*.safetensors")) == ["rng-rank0.safetensors",
                                                                          "rng-rank1.safetensors"]
    assert (run / "model" / "model_index.json").exists()  # exported once, by the main process
