"""The whole pipeline on the demo site, as users operate it: first run, rerun, stage reruns,
refresh after the site grew, and the Dask task runner against the sequential one."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tiny_diffusion import one_torch_thread

from sd_core.config import STAGES, load_config, preset
from sd_core.demo.emoji_art import build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog

FAST = [
    "vae.steps=25", "vae.batch_size=8", "vae.block_out_channels=[8, 16, 16, 16]", "vae.norm_num_groups=8",
    "train.steps=12", "train.batch_size=8", "train.val_every=6", "train.save_every=6", "train.sample_every=12",
    "train.continue_steps=6",
    "train.model.unet.h_dim=32", "train.model.unet.groups=8", "train.model.unet.n_heads=4",
    "sample.steps=3", "sample.images_per_prompt=2", "sample.guidance_sweep=[0.0, 4.0]",
    "encode.text.max_length=32",
    "eval.items=8", "eval.steps=2", "eval.grid_items=4", "eval.features=null", "eval.clip_model=null",
]


def config(site: DemoSite, data_dir: Path, *sets: str):
    return load_config(base=preset("demo"), sets=[*FAST, *sets],
                       overrides={"data_dir": str(data_dir), "crawl.base_url": site.base_url})


def by_stage(results):
    return {r.stage: r for r in results}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(cat: Catalog) -> list[dict[str, str]]:
    with open(cat.metadata_csv, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _threads():
    with one_torch_thread():
        yield


def test_run_rerun_stage_rerun_and_refresh(tmp_path, prefect_harness):
    from flows.pipeline import pipeline

    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(40, seed=7), per_page=12) as site:
        cfg = config(site, tmp_path)
        state = pipeline(cfg, progress=False, return_state=True)
        first = by_stage(state.result())
        assert [first[s].status for s in STAGES] == ["ran"] * len(STAGES)

        # training is visible where a scheduled run's user looks: a progress artifact that reached 100% and
        # log lines with the step and the loss in the flow run's log
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            FlowRunFilter,
            FlowRunFilterId,
            LogFilter,
            LogFilterFlowRunId,
        )

        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
                "emoji-sd-train-progress"])), flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            logs = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)]
        assert len(arts) == 1 and arts[0].type == "progress" and float(arts[0].data) == 100.0
        assert any(m.startswith("train step 12/12: loss ") for m in logs), logs
        assert first["encode"].summary["images_encoded"] == len(rows(cat))
        assert (cat.samples_dir / "grid.png").exists() and cat.report_html.exists()
        report = cat.report_html.read_text()
        assert "loss_curve.png" in report and "grid.png" in report and "reconstructions.png" in report

        # the from-scratch model is a folder diffusers itself loads and runs: its UNet, the data dir's own
        # VAE, the MiniLM text encoder with its tokenizer, and the scheduler
        import torch
        from diffusers import StableDiffusionPipeline

        from sd_core.diffusion.champion import served_model

        pipe = StableDiffusionPipeline.from_pretrained(served_model(cat))
        assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.tokenizer.model_max_length == 32
        drawn = pipe("Frog emoji with a round head", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        assert drawn.images[0].size == (64, 64)

        # the CLI draws from the trained model, and status sees every stage cached
        from flows.cli import main
        from sd_core.status import stage_status

        out = tmp_path / "cli" / "grid.png"
        assert main(["sample", "--data-dir", str(tmp_path), "--prompt", "Frog emoji", "--prompt", "Cat emoji",
                     "--steps", "2", "--n", "2", "--out", str(out)]) == 0
        from PIL import Image

        assert out.exists() and len(list((tmp_path / "cli" / "grid" / "images").glob("*.png"))) == 4
        assert Image.open(out).size[1] > 2 * 64
        assert {r.stage: r.state for r in stage_status(cfg)} == {s: "cached" for s in STAGES}
        v2_status = {r.stage: r.state for r in stage_status(config(site, tmp_path, "caption.prompt_version=\"v2\""))}
        assert v2_status["caption"] == "stale" and v2_status["convert"] == "cached"

        # nothing changed: every stage reused, no image fetched, no model called
        site.reset_counts()
        latents = files(cat.latent_store)
        again = by_stage(pipeline(cfg, progress=False))
        assert {s: again[s].status for s in STAGES} == {s: "reused" for s in STAGES}
        assert site.total_image_gets() == 0
        assert again["encode"].summary["vae_calls"] == 0

        # a new caption prompt version: caption reruns, upstream untouched, latents byte-identical
        site.reset_counts()
        images = files(cat.images_dir)
        v2 = config(site, tmp_path, "caption.prompt_version=\"v2\"")
        rerun = by_stage(pipeline(v2, start="caption", progress=False))
        assert (rerun["crawl"].status, rerun["convert"].status, rerun["caption"].status) == ("skipped", "skipped", "ran")
        assert rerun["caption"].summary["captioned"] == len(rows(cat))
        assert site.total_image_gets() == 0 and site.page_gets == 0
        assert files(cat.images_dir) == images and files(cat.latent_store) == latents

        # the site gained 5 emoji at the top: only they are fetched, captioned and encoded
        site.reset_counts()
        n_before = len(rows(cat))
        site.prepend(build_growth_items(5, seed=7, after=40))
        grown = by_stage(pipeline(v2, progress=False))
        assert site.total_image_gets() == 5
        assert grown["crawl"].summary["new_images"] == 5
        assert grown["convert"].summary["converted"] == 5
        assert grown["caption"].summary["captioned"] == 5
        assert grown["encode"].summary["images_encoded"] == 5
        assert grown["vae"].status == "reused"
        assert grown["train"].summary["continued_from"] == first["train"].summary["run"]
        assert len(rows(cat)) == n_before + 5
        old = files(cat.latent_store)
        assert all(old[k] == v for k, v in latents.items() if k.startswith("shards/"))


def test_dask_task_runner_matches_sequential(tmp_path, prefect_harness):
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import pipeline
    from sd_core.encode.stage import cached_pairs, resolve

    with DemoSite(build_demo_items(24, seed=11), per_page=12) as site:
        seq = config(site, tmp_path / "seq", "encode.vae.flip=true")
        pipeline(seq, until="encode", progress=False)
        dsk = config(site, tmp_path / "dask", "encode.vae.flip=true", "caption.batch_size=4",
                     "encode.vae.batch_size=4", "encode.text.batch_size=8")
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
        pipeline.with_options(task_runner=runner)(dsk, until="encode", progress=False)

    a, b = Catalog(tmp_path / "seq"), Catalog(tmp_path / "dask")
    ra, rb = {r["md5"]: r for r in rows(a)}, {r["md5"]: r for r in rows(b)}
    assert ra.keys() == rb.keys() and len(ra) >= 20
    assert all(ra[m]["prompt"] == rb[m]["prompt"] for m in ra)
    pa, pb = cached_pairs(resolve(seq.encode, a), a), cached_pairs(resolve(dsk.encode, b), b)
    # the VAE is trained in each data dir with the same seed, so latents agree to float tolerance
    for m in ra:
        xa, xb = pa.load([pa.ids.index(m)]).tensors(), pb.load([pb.ids.index(m)]).tensors()
        for k in ("mean", "std", "mean_flip", "std_flip", "text"):
            assert xa[k].shape == xb[k].shape
            assert (xa[k] - xb[k]).abs().max() < 1e-4, (m, k)
