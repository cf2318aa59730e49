"""The windowed training reader (pairs larger than ``train.data_memory_gb``): several windows of shards per
epoch, each read once; a run killed with SIGKILL mid-window and resumed in a new process ends with the
uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Iterator

import pytest
import torch
from polling import wait_for
from safetensors.torch import load_file
from tiny_diffusion import one_torch_thread, stored_pairs, synthetic_pairs, tiny_train_config

from sd_core.encode.pairs import CachedPairs
from sd_core.training import checkpoint as ckpt
from sd_core.training.config import TrainConfig
from sd_core.training.data import BatchSource
from sd_core.training.metrics import read_metrics
from sd_core.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SHARD = 5  # entries per shard: 40 items are 8 shards
WINDOW_ITEMS = 12  # the budget holds 12 items: two shards a window, 4 windows an epoch


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    stored_pairs(root, synthetic_pairs(40, flip=True), shard_size=SHARD)
    return root


def open_pairs(store: Path) -> CachedPairs:
    return stored_pairs(store, synthetic_pairs(40, flip=True), shard_size=SHARD)


def windowed_config(pairs: CachedPairs) -> TrainConfig:
    # caption dropout, mirrored latents, noise offset and held-out evaluations all draw between the saves; losses
    # are read from the device every 4 steps and at saves and evaluations (4, 5, 7, 8, 10, 12, 14, ...)
    return tiny_train_config(steps=24, save_every=5, keep_last=2, val_every=7, caption_dropout=0.5,
                             noise_offset=0.05, log_every=4, data_memory_gb=WINDOW_ITEMS * pairs.item_bytes() / 1e9)


# --- the reader alone ---------------------------------------------------------------------------------


def test_an_epoch_is_several_windows_of_whole_shards_within_the_budget(store: Path) -> None:
    pairs = open_pairs(store)
    items = list(range(3, 40))  # a train split: not every item, so shards are partly wanted
    data = BatchSource(pairs, items, batch_size=8, seed=5, memory_bytes=WINDOW_ITEMS * pairs.item_bytes())
    assert not data.resident and not data.threaded  # on the CPU: batches in the training thread, windows read ahead
    shard_of = {i: pairs.latents.shard_of(pairs._lkeys[i]) for i in items}
    orders = []
    for epoch in range(3):
        windows = data.windows(epoch)
        assert len(windows) >= 3
        assert all(len(w) * pairs.item_bytes() <= data.memory_bytes for w in windows)
        # a shard's wanted items are all in one window
        assert all(len({k for k, w in enumerate(windows) if any(shard_of[i] == s for i in w)}) == 1
                   for s in set(shard_of.values()))
        order = data.order(epoch)
        assert sorted(order) == items  # every item once an epoch
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]


def test_the_next_window_is_read_ahead_and_at_most_two_are_in_memory(store: Path) -> None:
    pairs = open_pairs(store)
    data = BatchSource(pairs, list(range(40)), batch_size=4, seed=5, memory_bytes=WINDOW_ITEMS * pairs.item_bytes())
    read = data._read
    alive: list[weakref.ref] = []

    def tracked(items: list[int]):
        window = read(items)
        alive.append(weakref.ref(window))
        return window

    data._read = tracked  # type: ignore[method-assign]
    stream = data.batches()
    next(stream)
    # the first batch came from window 0; window 1 is read in the background meanwhile, unasked
    wait_for(lambda: data.windows_loaded == 2 and all(r() is not None for r in alive), 30, "window 1 read ahead")
    most = 0
    for _ in range(3 * len(data.windows(0)) * 3):
        next(stream)
        most = max(most, sum(r() is not None for r in alive))
    stream.close()
    assert most == 2


@pytest.mark.parametrize("world,rank,accumulation", [(1, 0, 1), (2, 1, 1), (1, 0, 2)])
def test_each_window_is_read_once_an_epoch_and_a_restart_at_any_step_repeats_the_stream(
        store: Path, world: int, rank: int, accumulation: int) -> None:
    pairs = open_pairs(store)
    items = list(range(40))
    budget = WINDOW_ITEMS * pairs.item_bytes()

    def source(prefetch: int) -> BatchSource:
        return BatchSource(pairs, items, batch_size=4, world=world, rank=rank, accumulation=accumulation, seed=5,
                           memory_bytes=budget, prefetch=prefetch)

    data = source(prefetch=0)
    micro_per_epoch = len(items) // 4 // world // accumulation * accumulation  # whole optimizer steps an epoch
    epochs = 3
    stream = data.batches()
    full = [next(stream) for _ in range(epochs * micro_per_epoch)]
    stream.close()
    # each window read once an epoch (and the next epoch's first, read ahead before the stream was closed)
    assert data.windows_loaded - sum(len(data.windows(e)) for e in range(epochs)) in (0, 1)
    assert full[micro_per_epoch - 1].epoch == 1 and full[micro_per_epoch - 1].position == 0  # the epoch's last step
    assert [(b.epoch, b.position) for b in full[:2]] == [(0, 4 * world), (0, 8 * world)]
    for k in range(accumulation, len(full), accumulation):  # a checkpoint after a step holds where its last batch left
        again = source(prefetch=2).batches(full[k - 1].epoch, full[k - 1].position)  # with the prefetch thread
        for want in full[k : k + 3]:
            got = next(again)
            assert (got.epoch, got.position) == (want.epoch, want.position)
            for name, t in want.tensors.items():
                assert torch.equal(got.tensors[name], t), (k, name)
        again.close()


# --- SIGKILL and resume -------------------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch
torch.set_num_threads(1)
from tiny_diffusion import stored_pairs, synthetic_pairs
from sd_core.training.config import TrainConfig
from sd_core.training.trainer import Trainer

store, out, config, pause_at = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
pairs = stored_pairs(store, synthetic_pairs(40, flip=True), shard_size=5)

def pause(progress):
    if progress.step == pause_at:  # wait here, mid-window, for the test's SIGKILL
        print("paused", progress.step, flush=True)
        sys.stdin.readline()

cfg = TrainConfig.model_validate_json(config.read_text())
trainer = Trainer(cfg, pairs, out, callbacks=[pause], progress=False)
trainer.train(resume=any(out.glob("checkpoints/checkpoint-*")))
print("done", trainer.step, trainer.data.windows_loaded, flush=True)
"""


def child(store: Path, out: Path, config: Path, pause_at: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(out), str(config), str(pause_at)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(folder / f"{name}.safetensors")) for name in ("model", "ema", "optimizer")}


@pytest.fixture(scope="module")
def killed_and_resumed(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    pairs = open_pairs(store)
    cfg = windowed_config(pairs)
    whole_dir, killed_dir = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("killed")
    config = killed_dir.parent / "config.json"
    config.write_text(cfg.model_dump_json())

    proc = child(store, killed_dir, config, pause_at=12)
    try:
        whole = Trainer(cfg, pairs, whole_dir, progress=False)  # the uninterrupted run, meanwhile
        whole.train()
        lines = iter(proc.stdout.readline, "")  # blocks until the child prints (or ends)
        paused = next((line for line in lines if line.startswith("paused")), None)
        assert paused == "paused 12\n", proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after_kill = {"checkpoints": [p.name for p in ckpt.list_checkpoints(killed_dir / "checkpoints")],
                  "state": ckpt.load_checkpoint(ckpt.latest_checkpoint(killed_dir / "checkpoints")).trainer_state}

    resumed = child(store, killed_dir, config)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    return {"whole": whole, "whole_dir": whole_dir, "killed_dir": killed_dir, "after_kill": after_kill,
            "resumed_out": out, "pairs": pairs}


@pytest.mark.slow
def test_the_kill_lands_mid_window_after_a_checkpoint(killed_and_resumed: dict) -> None:
    after = killed_and_resumed["after_kill"]
    assert after["checkpoints"] == ["checkpoint-0000005", "checkpoint-0000010"]
    whole: Trainer = killed_and_resumed["whole"]
    epoch, position = after["state"]["epoch"], after["state"]["position"]
    windows = whole.data.windows(epoch)
    assert not whole.data.resident and len(windows) >= 3
    starts = [sum(len(w) for w in windows[:k]) for k in range(len(windows) + 1)]
    assert 0 < position < starts[-1] and position not in starts  # the resume starts inside a window


@pytest.mark.slow
def test_the_resumed_run_ends_with_the_uninterrupted_runs_weights_bit_for_bit(killed_and_resumed: dict) -> None:
    whole_dir, killed_dir = killed_and_resumed["whole_dir"], killed_and_resumed["killed_dir"]
    assert killed_and_resumed["resumed_out"].splitlines()[-1].startswith("done 24 ")
    last = "checkpoint-0000024"
    a, b = tensors(whole_dir / "checkpoints" / last), tensors(killed_dir / "checkpoints" / last)
    for part in a:
        assert a[part].keys() == b[part].keys()
        different = [n for n in a[part] if not torch.equal(a[part][n], b[part][n])]
        assert not different, f"{part}: {different[:5]}"
    for name in ("trainer_state.json", "scheduler.json"):
        state_a = ckpt._read_json(whole_dir / "checkpoints" / last / name)
        state_b = ckpt._read_json(killed_dir / "checkpoints" / last / name)
        state_a.pop("elapsed_s", None), state_b.pop("elapsed_s", None)
        assert state_a == state_b
    # every logged loss after the kill, as written, and the held-out losses
    rows_a = {r["step"]: r for r in read_metrics(whole_dir / "metrics.csv")}
    rows_b = {r["step"]: r for r in read_metrics(killed_dir / "metrics.csv")}
    assert sorted(rows_b, key=int) == [str(s) for s in range(1, 25)]
    for step, row in rows_a.items():
        for column in ("train_loss", "val_loss", "ema_val_loss", "lr"):
            assert rows_b[step][column] == row[column], (step, column)
