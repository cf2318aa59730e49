"""`emoji-sd gc` removes what no current key refers to, and only with --yes; `emoji-sd status` shows the
size of each stage's artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import main
from sd_core.config import load_config
from sd_core.encode.encoders import EMPTY_PROMPT, latent_key_base, text_key_base
from sd_core.encode.stage import resolve
from sd_core.ingest.ledger import Ledger
from sd_core.store.catalog import Catalog
from sd_core.diffusion.export import FORMAT, MANIFEST
from sd_core.store.files import file_checksum, md5_bytes, sha256_text
from sd_core.store.tensors import TensorStore

ROWS = [("a.jpg", md5_bytes(b"a"), "Frog emoji"), ("b.jpg", md5_bytes(b"b"), "Cat emoji")]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from tiny_models import build_tiny_clip, build_tiny_vae

    root = tmp_path_factory.mktemp("encoders")
    return build_tiny_vae(root / "vae"), build_tiny_clip(root / "clip")


def t(x: float) -> dict[str, torch.Tensor]:
    return {"mean": torch.full((4, 2, 2), x)}


@pytest.fixture()
def data_dir(tmp_path, encoders):
    """A data dir with live and dead entries of every kind gc knows."""
    vae, clip = encoders
    d = tmp_path / "data"
    sets = [f"encode.vae.model_id={vae}", f"encode.text.model_id={clip}", "caption.captioner=offline"]
    cfg = load_config(sets=sets, overrides={"data_dir": str(d)})
    cat = Catalog(d)
    cat.images_dir.mkdir(parents=True)
    cat.metadata_csv.write_text("file_name,md5,prompt\n" + "".join(f"{f},{m},{p}\n" for f, m, p in ROWS))
    enc = resolve(cfg.encode, cat)
    lbase, tbase = latent_key_base(enc.vae), text_key_base(enc.text)
    live_a, live_b = ({**lbase, "md5": m} for _, m, _ in ROWS)
    latents = TensorStore(cat.latent_store)
    latents.put([(live_a, t(1)), ({**lbase, "md5": md5_bytes(b"gone")}, t(2))])  # shard 1: mixed
    latents.put([({**lbase, "resolution": 32, "md5": ROWS[0][1]}, t(3))])        # shard 2: other VAE settings
    latents.put([(live_b, t(4))])                                                  # shard 3: live
    texts = TensorStore(cat.text_store)
    live_text = [{**tbase, "caption_sha256": sha256_text(c)} for c in (*(p for *_, p in ROWS), EMPTY_PROMPT)]
    texts.put([(k, t(5)) for k in live_text])
    texts.put([({**tbase, "caption_sha256": sha256_text("an old caption")}, t(6))])
    digest = cfg.caption.cache_digest()
    for name in (f"{digest}.jsonl", f"{digest}.key.json", "0123456789abcdef.jsonl", "0123456789abcdef.key.json"):
        (cat.captions_dir).mkdir(exist_ok=True)
        (cat.captions_dir / name).write_text("{}\n")
    cat.state_dir.mkdir()
    with Ledger(cat.ledger_db) as ledger:
        for i, (_, m, p) in enumerate(ROWS):
            url = f"http://x/{i}.png"
            ledger.note_listed([(url, p, 1)], "Blobs")
            ledger.record_fetch(url, "ok", attempts=1, md5=m, size=1, content_type="image/png")
    for m in (ROWS[0][1], ROWS[1][1], md5_bytes(b"stray")):
        cat.raw_path(m).parent.mkdir(parents=True, exist_ok=True)
        cat.raw_path(m).write_bytes(b"x" * 100)
    (cat.run_dir("run-latest") / ".tmp-model-1234abcd").mkdir(parents=True)
    for i, run in enumerate(("run-old", "run-newer", "run-latest")):
        (cat.run_dir(run) / "model").mkdir(parents=True)
        (cat.run_dir(run) / "model" / "w.safetensors").write_bytes(b"w" * 1000)
        (cat.run_dir(run) / "model" / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": {
            "w.safetensors": file_checksum(cat.run_dir(run) / "model" / "w.safetensors")}}))  # a complete export
        os.utime(cat.run_dir(run), (1_700_000_000 + i, 1_700_000_000 + i))
    cat.latest_run_json.write_text(json.dumps({"run": "run-latest", "key": "k"}))
    (cat.latent_store / "shards" / ".shard.0123456789ab.tmp").write_bytes(b"partial")
    (cat.latent_store / "damaged").mkdir()  # moved aside by a failed checksum, its entries since recomputed
    (cat.latent_store / "damaged" / "shard-000009.safetensors").write_bytes(b"rot")
    (d / "models" / ".vae.partial-1234abcd").mkdir()
    (d / ".metadata.csv.x1y2.tmp").write_text("half")
    return d, sets, {"latents": (live_a, live_b), "texts": live_text}


def tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.name != ".emoji-sd.lock"}


def test_gc_lists_then_removes_what_no_key_refers_to(data_dir, capsys):
    d, sets, live = data_dir
    before = tree(d)
    assert main(["gc", "--data-dir", str(d), *(f"--set={s}" for s in sets)]) == 0
    out = capsys.readouterr().out
    assert tree(d) == before  # a dry run
    expected = [
        "cache/latents/shards/shard-000002.safetensors", "cache/latents/shards/shard-000001.safetensors",
        "cache/text/shards/shard-000002.safetensors", "captions/0123456789abcdef.jsonl",
        "captions/0123456789abcdef.key.json", f"raw/{md5_bytes(b'stray')[:2]}/{md5_bytes(b'stray')}",
        "models/unet/run-old", "models/unet/run-newer", "models/unet/run-latest/.tmp-model-1234abcd",
        "models/.vae.partial-1234abcd", "cache/latents/shards/.shard.0123456789ab.tmp", ".metadata.csv.x1y2.tmp",
        "cache/latents/damaged/shard-000009.safetensors",
    ]
    for path in expected:
        assert f"  {path}  (" in out, path
    assert "rewritten with its 1 live of 2 entries" in out and "pass --yes to delete" in out
    assert "run-latest  (named by latest.json)" in out

    assert main(["gc", "--data-dir", str(d), "--keep-runs", "2", "--yes", *(f"--set={s}" for s in sets)]) == 0
    out = capsys.readouterr().out
    assert "freed" in out
    gone = before - tree(d)
    assert "models/unet/run-newer" not in gone and "models/unet/run-old" in gone  # --keep-runs 2: the 2 newest
    assert "models/unet/run-latest/model/w.safetensors" not in gone
    for path in expected[2:]:
        if "run-newer" not in path:
            assert path in gone, path
    assert f"captions/{'0123456789abcdef'}.jsonl" in gone and not any(p.startswith("captions/") and "0123" not in p
                                                                       for p in gone)
    assert not any(p.startswith("raw/") and md5_bytes(b"stray") not in p for p in gone)

    # every live entry still reads, with its tensors; the dead ones are gone
    latents, texts = TensorStore(Catalog(d).latent_store), TensorStore(Catalog(d).text_store)
    assert len(latents) == 2 and len(texts) == 3
    assert torch.equal(latents.get(live["latents"][0])["mean"], t(1)["mean"])
    assert torch.equal(latents.get(live["latents"][1])["mean"], t(4)["mean"])
    assert all(texts.get(k) is not None for k in live["texts"])
    assert latents.stats()["shards"] == 2  # the rewritten one and the live one

    assert main(["gc", "--data-dir", str(d), "--keep-runs", "2", *(f"--set={s}" for s in sets)]) == 0
    assert "would free 0 B" in capsys.readouterr().out


def test_gc_leaves_caches_alone_without_a_dataset(data_dir, capsys):
    d, sets, _ = data_dir
    Catalog(d).metadata_csv.unlink()
    assert main(["gc", "--data-dir", str(d), "--yes", *(f"--set={s}" for s in sets)]) == 0
    assert "no dataset" in capsys.readouterr().out
    assert (Catalog(d).latent_store / "shards" / "shard-000002.safetensors").exists()
    assert not (Catalog(d).latent_store / "shards" / ".shard.0123456789ab.tmp").exists()


def test_gc_takes_the_data_dir_lock(data_dir, capsys):
    d, sets, _ = data_dir
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sd_core.store.lock import data_dir_lock\n"
         "with data_dir_lock(sys.argv[1]):\n    print('holding', flush=True); sys.stdin.readline()", str(d)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert main(["gc", "--data-dir", str(d), "--yes", *(f"--set={s}" for s in sets)]) == 3
        assert "in use by another emoji-sd run" in capsys.readouterr().err
        assert (d / "models" / "unet" / "run-old").exists()
    finally:
        holder.kill()
        holder.wait()


def test_status_shows_each_stages_size_on_disk(data_dir, capsys):
    from sd_core.status import stage_status

    d, sets, _ = data_dir
    cfg = load_config(sets=sets, overrides={"data_dir": str(d)})
    sizes = {r.stage: r.bytes for r in stage_status(cfg)}
    cat = Catalog(d)
    assert sizes["train"] >= 3000 and sizes["sample"] == 0 and sizes["vae"] == 0
    assert sizes["encode"] == sum(p.stat().st_size for p in (cat.root / "cache").rglob("*") if p.is_file())
    assert sizes["crawl"] >= 300 + cat.ledger_db.stat().st_size
    assert main(["status", "--data-dir", str(d), *(f"--set={s}" for s in sets)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "0 B" in lines["sample"] and "KB" in lines["train"]


def test_gc_keeps_every_run_a_pointer_names(data_dir, capsys):
    d, sets, _ = data_dir
    (d / "models" / "current.json").write_text(json.dumps({"run": "run-old"}))  # e.g. a champion pointer
    assert main(["gc", "--data-dir", str(d), "--keep-runs", "0", "--yes", *(f"--set={s}" for s in sets)]) == 0
    assert "run-old  (named by current.json)" in capsys.readouterr().out
    assert (d / "models" / "unet" / "run-old").exists() and (d / "models" / "unet" / "run-latest").exists()
    assert not (d / "models" / "unet" / "run-newer").exists()
