"""Work per run follows change (issue 18): a rerun with nothing new rewrites none of the dataset's files, a
refresh writes only what is new, and the checks that decide it read no more than they must (a stat per
file or shard, not its bytes) while still catching a file that changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from polling import wait_for
from test_caption_stage import make_dataset
from test_pipeline import by_stage, config
from tiny_diffusion import one_torch_thread

from sd_core.caption.config import CaptionConfig
from sd_core.caption.stage import caption_dataset
from sd_core.demo.emoji_art import build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite
from sd_core.ingest.crawl import Listing
from sd_core.store.catalog import Catalog
from sd_core.store.files import read_json
from sd_core.store.metadata import read_metadata
from sd_core.store.tensors import TensorStore


@pytest.fixture(autouse=True)
def _threads():
    with one_torch_thread():
        yield


def last_seen(cat: Catalog) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(cat.ledger_db) as db:
        return dict(db.execute("SELECT url, last_seen FROM urls"))


def overwrite_keeping_size_and_mtime(path: Path, offset: int, data: bytes) -> None:
    """Rewrite part of ``path`` in place and put its mtime back, as a tool that preserves times would: only the
    ctime tells. Written again until the ctime has moved (file times tick coarsely on some kernels)."""
    st = os.stat(path)

    def write() -> bool:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return os.stat(path).st_ctime_ns != st.st_ctime_ns

    wait_for(write, timeout=5, what=f"the ctime of {path} to move", interval=0.01)


def versions(cat: Catalog) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file a data run writes per item or per dataset: an atomic rewrite gets a new
    inode even when its bytes are the same, so an unchanged pair means the file was not written."""
    paths = [cat.metadata_csv, cat.duplicates_csv, cat.quarantine_csv, cat.dataset_card, cat.convert_state,
             cat.sidecar_record, *cat.captions_dir.glob("*.key.json"), *cat.images_dir.iterdir(),
             *(cat.latent_store / "shards").iterdir(), *(cat.text_store / "shards").iterdir(),
             cat.latent_store / "index.json", cat.text_store / "index.json"]
    out = {}
    for p in paths:
        st = os.stat(p)
        out[str(p.relative_to(cat.root))] = (st.st_ino, st.st_mtime_ns)
    return out


def test_a_rerun_writes_nothing_per_item_and_a_refresh_only_what_is_new(tmp_path, prefect_harness):
    from flows.pipeline import pipeline

    cat = Catalog(tmp_path)
    with DemoSite(build_demo_items(40, seed=5), per_page=12) as site:
        cfg = config(site, tmp_path)
        first = by_stage(pipeline(cfg, until="encode", progress=False))
        assert first["encode"].summary["images_encoded"] > 0
        before = versions(cat)
        assert any(name.endswith(".txt") for name in before), "sidecars are written"
        seen_before = last_seen(cat)

        again = by_stage(pipeline(cfg, until="encode", progress=False))
        assert again["crawl"].summary["pages"] == 2
        unread = [u for u, _, _ in Listing.load(cat.listing_json).items[24:]]  # not on the 2 pages the walk read
        assert len(unread) == 16 and all(last_seen(cat)[u] == seen_before[u] for u in unread)
        assert {s: again[s].status for s in ("crawl", "convert", "caption", "encode")} == dict.fromkeys(
            ("crawl", "convert", "caption", "encode"), "reused")
        assert again["caption"].summary["sidecars_written"] == 0
        assert versions(cat) == before, "a rerun with nothing new rewrote files"

        site.prepend(build_growth_items(2, seed=5, after=40))
        grown = by_stage(pipeline(cfg, until="encode", progress=False))
        assert grown["convert"].summary["converted"] == 2 and grown["caption"].summary["sidecars_written"] == 2
        after = versions(cat)
        rewritten = {name for name in before if after[name] != before[name]}
        # the tables and indexes that list every item change; no image, sidecar or shard that was there does
        assert not {n for n in rewritten if n.startswith("images/") or "/shards/" in n}, rewritten
        new = set(after) - set(before)
        assert len([n for n in new if n.endswith(".jpg")]) == 2 and len([n for n in new if n.endswith(".txt")]) == 2
        assert "metadata.csv" in rewritten and "README.md" in rewritten


def test_a_changed_or_copied_jpeg_is_checked_by_its_bytes(tmp_path, prefect_harness):
    from flows.pipeline import pipeline

    cat = Catalog(tmp_path / "a")
    with DemoSite(build_demo_items(12, seed=2), per_page=12) as site:
        cfg = config(site, cat.root)
        pipeline(cfg, until="convert", progress=False)
        rows = read_metadata(cat)
        victim = cat.image_path(rows[0]["file_name"])
        good = victim.read_bytes()
        overwrite_keeping_size_and_mtime(victim, len(good) // 2, b"\0" * 64)
        again = by_stage(pipeline(cfg, until="convert", progress=False))
        assert again["convert"].summary["converted"] == 1 and victim.read_bytes() == good

        copy = Catalog(tmp_path / "b")
        shutil.copytree(cat.root, copy.root)  # new inodes: every JPEG is read once and found intact
        moved = by_stage(pipeline(config(site, copy.root), until="convert", progress=False))
        assert moved["convert"].summary["converted"] == 0
        items = [it for it in read_json(copy.convert_state)["items"].values() if "file_name" in it]
        assert len(items) == len(rows)
        assert all(it["jpeg_stat"][3] == os.stat(copy.image_path(it["file_name"])).st_ino for it in items), \
            "the copies' stats are recorded: the next run reads none of them"


def test_sidecars_missing_or_of_a_changed_caption_are_written_again(tmp_path):
    cat = make_dataset(tmp_path, 4)
    assert caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False).sidecars_written == 4
    rows = read_metadata(cat)
    gone, kept = cat.caption_sidecar(rows[0]["file_name"]), cat.caption_sidecar(rows[1]["file_name"])
    gone.unlink()
    kept_version = os.stat(kept).st_ino
    assert caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False).sidecars_written == 1
    assert gone.read_text("utf-8") == rows[0]["prompt"] and os.stat(kept).st_ino == kept_version

    log = cat.caption_log(CaptionConfig(captioner="offline").cache_digest())  # as a recaption would change it
    lines = log.read_text("utf-8").splitlines(keepends=True)
    record = json.loads(lines[2])
    lines.append(json.dumps({**record, "text": "a recaptioned emoji"}) + "\n")  # a later line wins
    log.write_text("".join(lines), "utf-8")
    other = caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False)
    assert other.sidecars_written == 1
    (row,) = [r for r in read_metadata(cat) if r["md5"] == record["md5"]]
    assert row["prompt"] == "a recaptioned emoji"
    assert cat.caption_sidecar(row["file_name"]).read_text("utf-8") == "a recaptioned emoji"

    cat.sidecar_record.unlink()  # no index (an older data dir): each sidecar is read and compared
    assert caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False).sidecars_written == 0
    assert cat.sidecar_record.exists()


def test_read_metadata_sees_a_same_size_edit(tmp_path):
    cat = make_dataset(tmp_path, 3)
    assert read_metadata(cat)[0]["image_title"] == "Blob Wave"
    text = cat.metadata_csv.read_text("utf-8")
    cat.metadata_csv.write_text(text.replace("Blob Wave", "Blob Wavy", 1), "utf-8")  # in place, same size
    rows = read_metadata(cat)
    assert rows[0]["image_title"] == "Blob Wavy"
    rows[0]["image_title"] = "changed by a caller"
    assert read_metadata(cat)[0]["image_title"] == "Blob Wavy", "each call returns its own rows"


def _store(tmp_path: Path) -> tuple[TensorStore, list[dict]]:
    import torch

    store = TensorStore(tmp_path, shard_size=4)
    keys = [{"kind": "t", "i": i} for i in range(8)]
    store.put([(k, {"x": torch.full((32, 32), float(k["i"]))}) for k in keys])
    return store, keys


def test_shards_verified_once_are_trusted_by_stat_until_touched(tmp_path, monkeypatch):
    _store(tmp_path)
    keys = [{"kind": "t", "i": i} for i in range(8)]
    verified: list[str] = []
    real = TensorStore._verify

    def counting(self, name):
        verified.append(name)
        return real(self, name)

    monkeypatch.setattr(TensorStore, "_verify", counting)
    assert TensorStore(tmp_path).missing(keys, by_stat=True) == []
    assert verified == [], "shards written by put are recorded: a look-up reads no data"
    assert TensorStore(tmp_path).missing(keys) == [] and len(verified) == 2, "a plain look-up checks the data"

    # an index written before stats were recorded: the first look-up verifies and records, the next trusts
    index = json.loads((tmp_path / "index.json").read_text())
    del index["verified"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    verified.clear()
    assert TensorStore(tmp_path).missing(keys, by_stat=True) == [] and len(verified) == 2
    assert TensorStore(tmp_path).missing(keys, by_stat=True) == [] and len(verified) == 2

    # a same-size overwrite with its mtime put back still moves the ctime: verified, found damaged, moved aside
    shard = sorted((tmp_path / "shards").iterdir())[0]
    overwrite_keeping_size_and_mtime(shard, shard.stat().st_size - 512, b"\xff" * 512)
    assert TensorStore(tmp_path, repair=False).missing(keys, by_stat=True) == [0, 1, 2, 3]
    assert shard.exists(), "a read-only look-up (status) leaves the shard where it is"
    assert TensorStore(tmp_path).missing(keys, by_stat=True) == [0, 1, 2, 3]
    assert (tmp_path / "damaged" / shard.name).exists()


def test_a_partial_walk_updates_the_ledger_rows_it_read_only(tmp_path):
    import sqlite3

    from sd_core.ingest.ledger import Ledger

    path = tmp_path / "ledger.sqlite"
    old = [(f"http://x/{i}.png", f"t{i}", 1 + i // 2) for i in range(4)]
    with Ledger(path) as ledger:
        ledger.note_listed(old, "Blobs")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE urls SET last_seen = 'before'")
    # a partial walk read one new item and one known one (now on page 2); the rest, and an item the ledger lost,
    # come from the previous listing
    listing = [("http://x/new.png", "new", 1), (old[0][0], "t0", 2), *old[1:], ("http://x/lost.png", "lost", 3)]
    with Ledger(path) as ledger:
        ledger.note_listed(listing, "Blobs", seen=2)
    with sqlite3.connect(path) as db:
        rows = {u: (page, seen) for u, page, seen in db.execute("SELECT url, page, last_seen FROM urls")}
    assert rows[old[0][0]][0] == 2 and rows[old[0][0]][1] != "before"
    assert all(rows[u] == (p, "before") for u, _, p in old[1:]), "rows the walk did not read are not written"
    assert rows["http://x/new.png"][0] == 1 and rows["http://x/lost.png"][0] == 3, "missing URLs are added"


def test_a_rerun_reads_no_sidecar_and_still_sees_one_edited_by_hand(tmp_path, monkeypatch):
    from sd_core.caption import stage

    cat = make_dataset(tmp_path, 4)
    cfg = CaptionConfig(captioner="offline")
    assert caption_dataset(cfg, cat, progress=False).sidecars_written == 4
    read: list[str] = []
    real = stage._sidecar_bytes

    def counting(catalog, file_name, contents=None):
        read.append(file_name)
        return real(catalog, file_name, contents)

    monkeypatch.setattr(stage, "_sidecar_bytes", counting)
    again = caption_dataset(cfg, cat, progress=False)
    assert again.sidecars_written == 0 and read == [], "untouched sidecars are told by their stat, not read"

    row = read_metadata(cat)[1]
    cat.caption_sidecar(row["file_name"]).write_text("my own words", "utf-8")  # in place: same inode
    edited = caption_dataset(cfg, cat, progress=False)
    assert read == [row["file_name"]] and edited.sidecars_edited == 1
    assert {r["md5"]: r["prompt"] for r in read_metadata(cat)}[row["md5"]] == "my own words"
