"""The convert stage left running unattended: image bombs, a time limit per image, JPEGs checked before
reuse, and tables a user opens in a spreadsheet."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from imagegen import emoji, encode, gif_frame_bomb, slow_qoi
from PIL import Image

from sd_core.demo.emoji_art import SiteItem
from sd_core.demo.site import DemoSite
from sd_core.ingest.crawl import Listing, download_new
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog

COLOURS = ((220, 30, 30), (30, 60, 220), (30, 180, 60), (240, 200, 20), (140, 40, 200))


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def png(i: int) -> bytes:
    return encode(emoji(COLOURS[i % 5], mark=i % 30, shape="square" if i % 2 else "circle"), "PNG")


# -- convert ---------------------------------------------------------------------------------------------


def test_gif_frame_bomb_converts_its_first_frame_quickly():
    from sd_core.ingest.convert import ConvertConfig, QuarantineError, to_rgb_jpeg

    bomb = gif_frame_bomb(4000, 300)
    assert len(bomb) < 10_000 and Image.open(io.BytesIO(bomb)).n_frames == 300
    start = time.monotonic()
    out = to_rgb_jpeg(bomb, ConvertConfig())
    took = time.monotonic() - start
    assert took < 3.0, f"{took:.1f}s (every frame decoded took 12s here, 69s elsewhere)"
    assert (out.width, out.height, out.source_format, out.animated) == (4000, 4000, "GIF", True)
    with pytest.raises(QuarantineError, match=r"too many frames: more than 100 \(convert.max_frames\)"):
        to_rgb_jpeg(bomb, ConvertConfig(max_frames=100))


def make_catalog(root: Path, entries: list[tuple[str, bytes]]) -> Catalog:
    """A data dir as the crawl leaves it for (title, bytes) entries, crawled from a local site: numbered
    in the order given (the site lists them newest first)."""
    items = [SiteItem(f"/emoji/{i:07d}.img", title, data, "image/png") for i, (title, data) in enumerate(entries)]
    with DemoSite(items[::-1]) as site:
        listing = Listing(site.tag, 1, tuple((site.image_url(it), it.title, 1) for it in site.items))
        cfg = CrawlConfig(base_url=site.base_url, max_requests_per_second=0)
        download_new(cfg, Catalog(root), listing, progress=False)
    return Catalog(root)


def test_convert_time_limit_stops_a_pathological_image(tmp_path):
    from sd_core.ingest.convert import ConvertConfig, ConvertWorker, QuarantineError, convert_dataset

    slow = slow_qoi(3000, 3000)  # about 5s of decoding here
    cfg = ConvertConfig(max_seconds_per_image=1.0)
    with ConvertWorker(cfg) as worker:
        worker.convert(png(1))  # the worker is up
        pid = worker._worker._proc.pid
        start = time.monotonic()
        with pytest.raises(QuarantineError, match=r"^timeout: decoding took longer than 1s"):
            worker.convert(slow)
        assert time.monotonic() - start < 1.0 + 1.0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the work was stopped: its process is gone

    cat = make_catalog(tmp_path, [("Good", png(1)), ("Stalls", slow), ("Also good", png(2))])
    summary = convert_dataset(cfg, cat, progress=False)  # the image after it gets a new worker
    assert summary.converted == 2 and summary.quarantine_reasons == {"timeout": 1}
    assert (cat.quarantine_dir / md5(slow)).exists()


def test_a_changed_jpeg_is_converted_again(tmp_path):
    from sd_core.ingest.convert import ConvertConfig, convert_dataset

    cat = make_catalog(tmp_path, [(f"Blob {i}", png(i)) for i in range(3)])
    convert_dataset(ConvertConfig(), cat, progress=False)
    jpegs = sorted(cat.images_dir.iterdir())
    original = jpegs[1].read_bytes()
    jpegs[1].write_bytes(original[: len(original) // 2])  # damaged (a disk, a sync tool, a user)
    again = convert_dataset(ConvertConfig(), cat, progress=False)
    assert (again.converted, again.reused) == (1, 2)
    assert jpegs[1].read_bytes() == original
    assert convert_dataset(ConvertConfig(), cat, progress=False).reused == 3


HOSTILE = ["=HYPERLINK(\"http://evil.example\",\"click\")", "+1+1", "-2-2", "@SUM(A1:A9)", "'quoted", "\tTabbed",
           "Plain Blob"]


def test_titles_are_spreadsheet_safe_and_never_empty(tmp_path):
    from sd_core.ingest.convert import ConvertConfig, convert_dataset
    from sd_core.store.metadata import read_csv_table, read_metadata, update_metadata

    entries = [(t, png(i)) for i, t in enumerate(HOSTILE)] + [("", png(20)), ("   ", png(21))]
    # A broken PNG is quarantined (a body that is no image at all never gets past the download).
    entries += [("=cmd|' /C calc'!A0", png(22)[: len(png(22)) // 2]), ("@dup", png(0))]
    cat = make_catalog(tmp_path, entries)
    convert_dataset(ConvertConfig(), cat, progress=False)

    with open(cat.metadata_csv, newline="", encoding="utf-8") as f:
        raw_titles = [r["image_title"] for r in csv.DictReader(f)]
    assert raw_titles[:7] == ["'" + t if t[0] in "=+-@'\t" else t for t in HOSTILE]
    assert not any(t.startswith(("=", "+", "-", "@", "\t")) for t in raw_titles)
    assert [r["image_title"] for r in read_metadata(cat)] == [*HOSTILE, "untitled", "untitled"]

    # What the caption stage does: add a column, then read the titles back.
    rows = read_metadata(cat)
    update_metadata(cat, {r["md5"]: {"prompt": "-" + r["image_title"]} for r in rows})
    again = read_metadata(cat)
    assert [r["image_title"] for r in again] == [*HOSTILE, "untitled", "untitled"]
    assert [r["prompt"] for r in again] == ["-" + t for t in [*HOSTILE, "untitled", "untitled"]]
    with open(cat.metadata_csv, newline="", encoding="utf-8") as f:
        assert all(r["prompt"].startswith("'-") for r in csv.DictReader(f))

    for table, column, expected in ((cat.quarantine_csv, "image_title", "=cmd|' /C calc'!A0"),
                                    (cat.duplicates_csv, "image_title", "@dup")):
        with open(table, newline="", encoding="utf-8") as f:
            assert [r[column] for r in csv.DictReader(f)] == ["'" + expected]
        assert [r[column] for r in read_csv_table(table)] == [expected]


def test_written_files_get_normal_permissions(tmp_path):
    from sd_core.ingest.convert import ConvertConfig, convert_dataset
    from sd_core.store.files import atomic_write_bytes

    previous = os.umask(0o022)
    try:
        cat = make_catalog(tmp_path, [("Blob", png(1))])
        convert_dataset(ConvertConfig(), cat, progress=False)
        for path in [*cat.images_dir.iterdir(), cat.metadata_csv, cat.convert_state]:
            assert path.stat().st_mode & 0o777 == 0o644, path
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private", b"x")
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)
