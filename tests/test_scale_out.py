"""Scale-out: the caption and encode stages fanned out to an existing Dask cluster (two worker processes,
reached by its address as `--dask-address` does) write the same caches as a sequential run: the same
captions in metadata.csv, the caption log and the sidecars, and the same latent and text-state tensors,
entry for entry and bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors import safe_open
from test_pipeline import config, rows
from tiny_diffusion import one_torch_thread

from sd_core.demo.emoji_art import build_demo_items
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog
from sd_core.store.tensors import TensorStore, entry_id


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    with one_torch_thread():  # the Dask workers run torch on one thread each (Dask's nanny sets OMP_NUM_THREADS=1)
        yield


def shard_keys(root: Path) -> dict[str, list[dict]]:
    """Each shard file's entries, by the keys its header names."""
    out = {}
    for shard in sorted((root / "shards").glob("shard-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            meta = f.metadata()
        out[shard.name] = [json.loads(k) for eid, k in meta.items() if eid not in ("format", "checksums")]
    return out


def store_entries(root: Path) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """Every entry of the store as a reader opening it sees it: entry id → (key, tensors). (Concurrent writers
    each write the index as they saw it; the next open adopts the shards it does not name.)"""
    store = TensorStore(root, sweep=False)
    keys = {entry_id(k): k for ks in shard_keys(root).values() for k in ks}
    return {eid: (key, store.get(key)) for eid, key in keys.items()}


def caption_records(cat: Catalog) -> dict[str, list[str]]:
    """Each caption log's lines, sorted (workers append their batches in the order they finish)."""
    return {p.name: sorted(p.read_text().splitlines()) for p in sorted(cat.captions_dir.glob("*.jsonl"))}


@pytest.mark.slow
def test_dask_and_sequential_runs_cache_the_same_captions_and_tensors(tmp_path, prefect_harness):
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import pipeline

    seq_dir, dask_dir = tmp_path / "seq", tmp_path / "dask"
    # jobs of 8: several caption batches and encode shards, so both workers get some
    sets = ["encode.shard_size=8", "caption.batch_size=4", "encode.vae.batch_size=4", "encode.text.batch_size=4"]
    with DemoSite(build_demo_items(30, seed=11), per_page=12) as site:
        seq = config(site, seq_dir, *sets)
        pipeline(seq, until="convert", progress=False)
    pipeline(seq, only="vae", progress=False)  # one trained VAE for both runs
    shutil.copytree(seq_dir, dask_dir)
    dsk = seq.model_copy(update={"data_dir": dask_dir})

    done = {r.stage: r.status for r in pipeline(seq, start="caption", until="encode", progress=False)}
    assert (done["caption"], done["vae"], done["encode"]) == ("ran", "reused", "ran")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        done = {r.stage: r.status for r in
                pipeline.with_options(task_runner=runner)(dsk, start="caption", until="encode", progress=False)}
        # the jobs ran in the workers: each worker process holds the encoders it loaded for them
        held = client.run(lambda: sorted(__import__("sd_core.encode.encoders", fromlist=["_SHARED"])._SHARED))
    assert (done["caption"], done["vae"], done["encode"]) == ("ran", "reused", "ran")
    assert len(held) == 2 and all(models for models in held.values()), held

    a, b = Catalog(seq_dir), Catalog(dask_dir)
    ra, rb = rows(a), rows(b)
    assert len(ra) >= 25 and all(r["prompt"] for r in ra)
    assert ra == rb  # every column of metadata.csv, captions included, in the same order
    assert caption_records(a) == caption_records(b)
    assert all(a.caption_sidecar(r["file_name"]).read_text() == b.caption_sidecar(r["file_name"]).read_text()
               for r in ra)
    for store in ("latent_store", "text_store"):
        ea, eb = store_entries(getattr(a, store)), store_entries(getattr(b, store))
        assert ea.keys() == eb.keys() and len(ea) >= 25, store
        sizes = [sorted(len(k) for k in shard_keys(getattr(c, store)).values()) for c in (a, b)]
        assert sizes[0] == sizes[1], store  # one full shard a job, however the jobs were spread
        for eid, (key, tensors) in ea.items():
            assert tensors is not None and eb[eid][1] is not None, (store, key)  # read back intact in both
            assert tensors.keys() == eb[eid][1].keys(), (store, key)
            different = [n for n, t in tensors.items() if not torch.equal(t, eb[eid][1][n])]
            assert not different, (store, key, different)
    names = set(next(iter(store_entries(a.latent_store).values()))[1])
    assert names == {"mean", "std", "mean_flip", "std_flip"}  # the demo caches mirrored latents too
