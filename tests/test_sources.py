"""Sources other than the site (a folder, a `datasets` imagefolder or parquet, a list of image URLs) through
the same ledger, dedup, convert and caption rules; de-listing (an item its source no longer lists leaves the
dataset, for a site only after a full walk); bad sources in one line; and how a non-square image is made square."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from imagegen import emoji, encode
from PIL import Image

from sd_core.caption.config import CaptionConfig
from sd_core.caption.stage import caption_dataset
from sd_core.demo.emoji_art import SiteItem, build_demo_items
from sd_core.demo.site import DemoSite
from sd_core.ingest.convert import ConvertConfig, convert_dataset
from sd_core.ingest.crawl import download_new, refresh_listing
from sd_core.ingest.settings import CrawlConfig
from sd_core.ingest.source import ingest_source
from sd_core.ingest.source_config import SourceConfig, SourceError
from sd_core.store.catalog import Catalog
from sd_core.store.metadata import read_metadata

RED, GREEN, BLUE, YELLOW, PURPLE = (220, 30, 30), (30, 180, 60), (30, 60, 220), (240, 200, 20), (140, 40, 200)
T0 = datetime(2025, 1, 1, 3, 0, tzinfo=timezone.utc)


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def png(color, **kw) -> bytes:
    return encode(emoji(color, **kw), "PNG")


def wide(color, size=(96, 48)) -> Image.Image:
    """A non-square emoji: a coloured bar on a transparent background."""
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (size[0] - 16, size[1] - 16), (*color, 255)), (8, 8))
    return img


def crawl_cfg(**kw) -> CrawlConfig:
    return CrawlConfig(max_requests_per_second=0, backoff_s=0.05, empty_page_settle_s=1.0, **kw)


def by_title(cat: Catalog) -> dict[str, dict[str, str]]:
    return {r["image_title"]: r for r in read_metadata(cat)}


def ingest(cfg: SourceConfig, cat: Catalog, **kw):
    listing, summary = ingest_source(cfg, crawl_cfg(**kw), cat, progress=False)
    return listing, summary


def make_folder(root: Path) -> Path:
    """A folder as a user has one: images in subfolders, a caption beside one, a metadata.csv naming another
    (file_name relative to it, a prompt and a title), a wide image, and files that are no images."""
    src = root / "my emoji"
    (src / "cats").mkdir(parents=True)
    (src / "red.png").write_bytes(png(RED))
    (src / "cats" / "green.webp").write_bytes(encode(emoji(GREEN, mark=3), "WEBP", lossless=True))
    (src / "cats" / "green.txt").write_text("a green cat, smiling\n")
    (src / "cats" / "blue.png").write_bytes(png(BLUE, mark=6))
    with open(src / "cats" / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "prompt", "title"], ["blue.png", "a  blue cat\nwaving", "Blue Cat"]])
    wide(YELLOW).save(src / "banner.png")
    (src / "notes.md").write_text("not an image")
    (src / ".hidden.png").write_bytes(png(PURPLE))
    return src


def test_a_folder_reads_only_new_files_and_what_leaves_it_leaves_the_dataset(tmp_path):
    src = make_folder(tmp_path)
    cat = Catalog(tmp_path / "data")
    cfg = SourceConfig(kind="folder", path=str(src))
    captions = CaptionConfig(captioner="offline")

    listing, first = ingest(cfg, cat)
    assert (first.gets, first.new_images, first.already_known) == (4, 4, 0)
    conv = convert_dataset(ConvertConfig(), cat, progress=False)
    assert (conv.converted, conv.dataset_rows) == (4, 4)
    cap = caption_dataset(captions, cat, progress=False)
    assert cap.user_captions == 2 and cap.captioned == 2  # the model captions only what has no caption
    rows = by_title(cat)
    assert set(rows) == {"red", "green", "Blue Cat", "banner"}
    # numbered in the order of the paths; the name is the folder's (made safe for a file name)
    assert rows["banner"]["file_name"] == "images/my_emoji_0000001.jpg"
    assert rows["Blue Cat"]["image_url"] == "folder:cats/blue.png" and rows["Blue Cat"]["tag"] == "my emoji"
    assert rows["green"]["prompt"] == rows["green"]["source_caption"] == "a green cat, smiling"
    assert rows["Blue Cat"]["prompt"] == "a blue cat waving" and rows["Blue Cat"]["captioner"] == "user"
    assert rows["red"]["captioner"] == "offline" and rows["red"]["source_caption"] == ""
    assert (rows["banner"]["width"], rows["banner"]["height"], rows["banner"]["fit"]) == ("96", "48", "pad")
    assert rows["red"]["fit"] == ""  # square: nothing to fit
    raw = (src / "cats" / "green.webp").read_bytes()
    assert rows["green"]["md5"] == md5(raw) and cat.raw_path(md5(raw)).read_bytes() == raw

    # a second run over a folder that gained two files (one a copy of another) and lost one reads only the new
    (src / "purple.png").write_bytes(png(PURPLE, mark=9))
    shutil.copy(src / "red.png", src / "cats" / "red again.png")
    removed = rows["green"]
    (src / "cats" / "green.webp").unlink()
    _, second = ingest(cfg, cat)
    assert (second.gets, second.new_images, second.duplicates, second.already_known) == (2, 1, 1, 3)
    conv = convert_dataset(ConvertConfig(), cat, progress=False)
    assert (conv.converted, conv.reused, conv.delisted, conv.dataset_rows) == (1, 3, 1, 4)
    cap = caption_dataset(captions, cat, progress=False)
    assert cap.captioned == 1 and cap.model_calls == 1
    rows = by_title(cat)
    assert "green" not in rows and "purple" in rows
    # its files leave images/ (kohya and other folder readers must not train on it) but are kept
    assert not cat.image_path(removed["file_name"]).exists() and not cat.caption_sidecar(removed["file_name"]).exists()
    assert cat.delisted_path(removed["file_name"]).exists()
    with open(cat.duplicates_csv, newline="") as f:
        assert [r["image_url"] for r in csv.DictReader(f)] == ["folder:cats/red again.png"]

    # put back: listed again, with its number and caption, and nothing converted or captioned again
    (src / "cats" / "green.webp").write_bytes(raw)
    _, third = ingest(cfg, cat)
    assert third.new_images == 0 and third.gets == 1  # read (it changed on disk), its bytes already known
    conv = convert_dataset(ConvertConfig(), cat, progress=False)
    assert (conv.converted, conv.relisted, conv.delisted) == (0, 1, 0)
    assert caption_dataset(captions, cat, progress=False).model_calls == 0
    back = by_title(cat)["green"]
    assert back["file_name"] == removed["file_name"] and back["prompt"] == "a green cat, smiling"
    assert cat.image_path(back["file_name"]).exists() and not any(cat.delisted_dir.iterdir())

    # a file changed in place is a new image; the old one is de-listed
    (src / "red.png").write_bytes(png(RED, mark=12))
    os.utime(src / "red.png", ns=(1, 1))
    _, fourth = ingest(cfg, cat)
    assert (fourth.gets, fourth.new_images) == (1, 1)
    conv = convert_dataset(ConvertConfig(), cat, progress=False)
    assert conv.dataset_rows == 6 and conv.delisted == 0  # the old red stays in: `red again.png` still lists it
    assert [r["md5"] for r in read_metadata(cat)].count(md5(png(RED))) == 1


def test_a_site_delists_only_after_a_full_walk_and_relists_without_recomputing(tmp_path):
    cat = Catalog(tmp_path)
    items = build_demo_items(12, seed=4)
    with DemoSite(items, per_page=4, render_delay_ms=30) as site:
        cfg = crawl_cfg(base_url=site.base_url)

        def refresh(now, **kw):
            site.reset_counts()
            listing = refresh_listing(cfg, cat, now=now, progress=False, **kw)
            download_new(cfg, cat, listing, progress=False)
            return listing, convert_dataset(ConvertConfig(), cat, progress=False)

        _, first = refresh(T0)
        n = first.dataset_rows  # the demo site re-uploads an emoji or two: fewer unique images than items
        assert n >= 10
        copies = Counter(md5(it.image_bytes()) for it in items)
        removed = next(it for it in site.page_items(3) if copies[md5(it.image_bytes())] == 1)
        url = site.base_url + removed.path
        row = next(r for r in read_metadata(cat) if r["image_url"] == url)
        site.remove([removed.path])

        # a partial walk reads pages 1 and 2 only: it cannot see the removal, the image stays
        listing, partial = refresh(T0 + timedelta(days=1))
        assert listing.walk.kind == "partial" and partial.dataset_rows == n and partial.delisted == 0

        # a full walk sees it: the image leaves metadata.csv (and so training); its bytes stay
        listing, full = refresh(T0 + timedelta(days=2), full=True)
        assert listing.walk.kind == "full" and (full.dataset_rows, full.delisted) == (n - 1, 1)
        assert url not in {r["image_url"] for r in read_metadata(cat)}
        assert cat.raw_path(row["md5"]).exists() and cat.delisted_path(row["file_name"]).exists()

        # listed again (a re-upload at the top): back under its number, not downloaded or converted again
        site.prepend([removed])
        listing, again = refresh(T0 + timedelta(days=3))
        assert listing.walk.kind == "partial" and site.total_image_gets() == 0
        assert (again.dataset_rows, again.relisted, again.converted) == (n, 1, 0)
        assert next(r for r in read_metadata(cat) if r["image_url"] == url)["file_name"] == row["file_name"]


def make_imagefolder(root: Path) -> tuple[Path, dict[str, bytes]]:
    folder = root / "imagefolder"
    folder.mkdir()
    files = {"a.png": png(RED), "b.png": png(GREEN, mark=4), "c.webp": encode(emoji(BLUE, mark=8), "WEBP")}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with open(folder / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "prompt", "title"], ["a.png", "a red blob", "Red Blob"],
                                 ["b.png", "", "Green Blob"], ["c.webp", "a blue blob", ""]])
    return folder, files


def test_a_dataset_imagefolder_and_parquet_are_read_as_stored(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder, files = make_imagefolder(tmp_path)
    cat = Catalog(tmp_path / "data")
    cfg = SourceConfig(kind="dataset", path=str(folder))
    _, first = ingest(cfg, cat)
    assert (first.gets, first.new_images) == (3, 3)
    convert_dataset(ConvertConfig(), cat, progress=False)
    rows = {r["md5"]: r for r in read_metadata(cat)}
    assert set(rows) == {md5(b) for b in files.values()}  # the bytes as stored, never decoded and re-encoded
    red, green, blue = (rows[md5(files[n])] for n in ("a.png", "b.png", "c.webp"))
    assert (red["image_title"], red["source_caption"]) == ("Red Blob", "a red blob")
    assert (green["image_title"], green["source_caption"]) == ("Green Blob", "")
    assert (blue["image_title"], blue["source_caption"]) == ("c", "a blue blob")  # no title: the file's name
    assert red["image_url"] == f"dataset:{red['md5']}" and red["tag"] == "imagefolder"
    _, again = ingest(cfg, cat)
    assert (again.gets, again.already_known) == (0, 3)

    # the same images in a parquet file with an Image column and other column names
    table = datasets.Dataset.from_dict({
        "picture": [{"bytes": files["a.png"], "path": "a.png"}, {"bytes": files["c.webp"], "path": "c.webp"}],
        "text": ["red, from parquet", "blue, from parquet"], "name": ["Red", "Blue"],
    }).cast_column("picture", datasets.Image())
    table.to_parquet(str(tmp_path / "emoji.parquet"))
    cat2 = Catalog(tmp_path / "data2")
    pq = SourceConfig(kind="dataset", path=str(tmp_path / "emoji.parquet"), title_column="name", name="Parquet")
    ingest(pq, cat2)
    convert_dataset(ConvertConfig(), cat2, progress=False)
    rows = {r["md5"]: r for r in read_metadata(cat2)}
    assert set(rows) == {md5(files["a.png"]), md5(files["c.webp"])}
    assert rows[md5(files["a.png"])]["source_caption"] == "red, from parquet"
    assert rows[md5(files["a.png"])]["image_title"] == "Red"
    assert rows[md5(files["a.png"])]["file_name"] == "images/Parquet_0000001.jpg"


def test_a_url_list_is_fetched_like_the_site(tmp_path):
    items = {
        "red": SiteItem("/img/red.png", "", png(RED), "image/png"),
        "green": SiteItem("/img/green.png", "", png(GREEN, mark=2), "image/png"),
        "copy": SiteItem("/img/copy.png", "", png(RED), "image/png"),
        "gone": SiteItem("/img/gone.png", "", png(BLUE), "image/png", fault="404"),
        "flaky": SiteItem("/img/flaky.png", "", png(YELLOW), "image/png", fault="500-once"),
    }
    with DemoSite(list(items.values())) as site:
        # a redirect to another host (localhost is another origin than 127.0.0.1): refused, as for the site
        items["away"] = SiteItem("/img/away.png", "", png(PURPLE), "image/png", fault="redirect",
                                 location=site.base_url.replace("127.0.0.1", "localhost") + "/img/red.png")
        site.prepend([items["away"]])
        listed = ["red", "green", "copy", "gone", "flaky", "away"]
        path = tmp_path / "urls.csv"

        def write(names):
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["url", "caption", "title", "extra"])
                for n in names:
                    w.writerow([site.image_url(items[n]), f"a {n} emoji" if n != "green" else "", n.title(), "x"])
                w.writerow(["ftp://example.com/x.png", "", "", ""])

        write(listed)
        cat = Catalog(tmp_path / "data")
        cfg = SourceConfig(kind="urls", path=str(path))
        listing, first = ingest(cfg, cat, allowed_hosts=())
        assert (first.downloaded, first.new_images, first.duplicates) == (4, 3, 1)
        assert first.failed == {"HTTP 404": 1, "refused (redirect to other origin)": 1, "refused (not http)": 1}
        assert site.image_gets[items["flaky"].path] == 2  # retried within the run, as the site's images are
        convert_dataset(ConvertConfig(), cat, progress=False)
        rows = by_title(cat)
        assert set(rows) == {"Red", "Green", "Flaky"}
        names = [rows[t]["file_name"] for t in ("Red", "Green", "Flaky")]  # numbered in the list's order
        assert names == sorted(names) and names[0] == "images/urls_0000001.jpg"
        assert rows["Red"]["source_caption"] == "a red emoji" and rows["Green"]["source_caption"] == ""
        assert rows["Red"]["image_url"] == site.image_url(items["red"])

        site.reset_counts()
        _, again = ingest(cfg, cat, allowed_hosts=())
        assert again.downloaded == 0  # fetched once; a 404 is not asked again, a refusal is checked again
        assert set(site.image_gets) == {items["away"].path}

        write(["green", "copy", "flaky"])  # the row of the first red gone: its copy keeps the image listed
        ingest(cfg, cat, allowed_hosts=())
        assert convert_dataset(ConvertConfig(), cat, progress=False).delisted == 0
        write(["green", "flaky"])
        ingest(cfg, cat, allowed_hosts=())
        conv = convert_dataset(ConvertConfig(), cat, progress=False)
        assert conv.delisted == 1 and set(by_title(cat)) == {"Green", "Flaky"}

    # a parquet list (img2dataset's other format) gives the same listing
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png", "http://127.0.0.1:9/b.png"],
                             "caption": ["first", None]}), tmp_path / "urls.parquet")
    from sd_core.ingest.url_list import read_url_list

    listing = read_url_list(SourceConfig(kind="urls", path=str(tmp_path / "urls.parquet")), tag="t")
    assert [u for u, _, _ in listing.items] == ["http://127.0.0.1:9/b.png", "http://127.0.0.1:9/a.png"]
    assert listing.captions == {"http://127.0.0.1:9/a.png": "first"} and listing.origins == ("http://127.0.0.1:9",)


def test_bad_sources_fail_in_one_line_naming_them(tmp_path, capsys):
    from flows.cli import main

    def run(*sets: str) -> tuple[int, str]:
        rc = main(["run", "--until", "convert", "--no-progress", "--data-dir", str(tmp_path / "d"),
                   *[a for s in sets for a in ("--set", s)]])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return rc, err

    rc, err = run("source.kind=folder", f"source.path={tmp_path / 'nope'}")
    assert rc == 2 and f"source.path = {tmp_path / 'nope'}: no such folder" in err
    rc, err = run("source.kind=folder")
    assert rc == 2 and "needs source.path" in err
    rc, err = run("source.kind=folder", "source.url_column=link", f"source.path={tmp_path}")
    assert rc == 2 and "source.url_column is not used by kind = 'folder'" in err

    (tmp_path / "list.csv").write_text("link,caption\nhttp://x/a.png,a\n")
    rc, err = run("source.kind=urls", f"source.path={tmp_path / 'list.csv'}")
    assert rc == 2 and "has no 'url' column (columns: link, caption); set source.url_column" in err
    (tmp_path / "list.txt").write_text("http://x/a.png\n")
    rc, err = run("source.kind=urls", f"source.path={tmp_path / 'list.txt'}")
    assert rc == 2 and "a URL list must be a .csv, .tsv or .parquet file" in err

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is no parquet file")
    rc, err = run("source.kind=dataset", f"source.path={tmp_path / 'broken.parquet'}")
    assert rc == 2 and f"source.path = {tmp_path / 'broken.parquet'}: unreadable parquet" in err
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a"], "n": [1]}), tmp_path / "noimage.parquet")
    rc, err = run("source.kind=dataset", f"source.path={tmp_path / 'noimage.parquet'}")
    assert rc == 2 and "has no image column (columns: caption, n); set source.image_column" in err
    rc, err = run("source.kind=dataset", "source.path=./not-here")
    assert rc == 2 and "no such file or folder, and not a Hub dataset id" in err


def test_an_empty_folder_and_a_missing_extra_fail_the_run_in_one_line(tmp_path, capsys, prefect_harness, monkeypatch):
    import sys

    from flows.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    rc = main(["run", "--until", "convert", "--no-progress", "--data-dir", str(tmp_path / "d"),
               "--set", "source.kind=folder", "--set", f"source.path={empty}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"crawl failed: source.path = {empty} holds no image" in err

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: import raises ImportError
    rc = main(["run", "--until", "convert", "--no-progress", "--data-dir", str(tmp_path / "d"),
               "--set", "source.kind=dataset", "--set", f"source.path={empty}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "pip install 'emoji-sd[datasets]'" in err


def test_a_non_square_image_is_padded_on_its_background_colour(tmp_path):
    import torch

    from sd_core.common.images import border_colour, fit_square, image_to_tensor

    bar = wide(RED, size=(64, 32))  # transparent around a red bar: white once flattened
    on_blue = Image.new("RGB", (64, 32), BLUE)
    on_blue.paste(Image.new("RGB", (48, 16), RED), (8, 8))
    assert border_colour(on_blue) == BLUE
    padded = fit_square(on_blue, "pad")
    assert padded.size == (64, 64) and padded.getpixel((32, 2)) == BLUE and padded.getpixel((32, 32)) == RED
    assert fit_square(on_blue, "crop").size == (32, 32) and fit_square(on_blue, "stretch").size == (64, 32)
    assert fit_square(bar, "pad").getpixel((32, 2)) == (255, 255, 255)

    x = {fit: image_to_tensor(on_blue, 16, fit) for fit in ("pad", "crop", "stretch")}
    blue = torch.tensor(BLUE, dtype=torch.float32)[:, None, None] / 127.5 - 1
    assert torch.allclose(x["pad"][:, :3, :], blue.expand(3, 3, 16), atol=0.02)  # a band of background on top
    red_pixels = {fit: int(((t[0] - t[2]) > 1.0).sum()) for fit, t in x.items()}  # red well above blue
    # the bar (48x16 of 64x32) covers 3/8 of a padded square, 3/8 of a stretched one's... twice as high
    assert 40 <= red_pixels["pad"] <= 56 and 88 <= red_pixels["stretch"] <= 104
    assert red_pixels["crop"] >= 120  # the centre square is all bar, save its top and bottom border rows
    path = tmp_path / "wide.png"
    on_blue.save(path)
    assert torch.equal(image_to_tensor(path, 16, "pad"), x["pad"])
    square = Image.new("RGB", (32, 32), GREEN)
    assert torch.equal(image_to_tensor(square, 16, "pad"), image_to_tensor(square, 16))  # square: untouched


def test_changing_the_fit_or_a_source_caption_changes_only_what_depends_on_it(tmp_path):
    from sd_core.caption.stage import stage_key as caption_key
    from sd_core.ingest.convert import stage_key as convert_key

    src = make_folder(tmp_path)
    cat = Catalog(tmp_path / "data")
    cfg = SourceConfig(kind="folder", path=str(src))
    ingest(cfg, cat)
    convert_dataset(ConvertConfig(), cat, progress=False)
    caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False)
    before = {r["md5"]: r for r in read_metadata(cat)}
    keys = convert_key(ConvertConfig(), cat), caption_key(CaptionConfig(captioner="offline"), cat)
    jpegs = {p.name: p.read_bytes() for p in cat.images_dir.glob("*.jpg")}

    crop = convert_dataset(ConvertConfig(fit="crop"), cat, progress=False)
    assert crop.converted == 0  # the JPEGs keep their shape: only the fit column changes
    after = {r["md5"]: r for r in read_metadata(cat)}
    assert {m: r["fit"] for m, r in after.items() if r["fit"]} == {
        m: "crop" for m, r in before.items() if r["fit"] == "pad"}
    assert {p.name: p.read_bytes() for p in cat.images_dir.glob("*.jpg")} == jpegs
    assert convert_key(ConvertConfig(fit="crop"), cat) != keys[0]
    assert caption_key(CaptionConfig(captioner="offline"), cat) == keys[1]
    assert caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False).prompts_changed == 0

    (src / "red.txt").write_text("a red ball")
    ingest(cfg, cat)
    convert_dataset(ConvertConfig(fit="crop"), cat, progress=False)
    assert caption_key(CaptionConfig(captioner="offline"), cat) != keys[1]
    cap = caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False)
    assert (cap.model_calls, cap.prompts_changed, cap.user_captions) == (0, 1, 3)
    assert by_title(cat)["red"]["prompt"] == "a red ball"
    ignored = caption_dataset(CaptionConfig(captioner="offline", user_captions="ignore"), cat, progress=False)
    assert ignored.user_captions == 0 and ignored.captioned == 2  # the rows the model had not captioned yet
    assert {r["captioner"] for r in read_metadata(cat)} == {"offline"}


def test_source_config_refuses_what_its_kind_does_not_use():
    from pydantic import ValidationError

    assert SourceConfig().kind == "site"
    with pytest.raises(ValidationError, match="source.path not used by kind = 'site'"):
        SourceConfig(path="/x")
    with pytest.raises(ValidationError, match="source.image_column is not used by kind = 'urls'"):
        SourceConfig(kind="urls", path="x.csv", image_column="img")
    with pytest.raises(ValidationError, match="control characters"):
        SourceConfig(kind="folder", path="x", name="a\x00b")
    assert SourceConfig(kind="dataset", path="someone/emoji").is_hub_id()
    assert SourceConfig(kind="dataset", path="someone/emoji").dataset_name() == "emoji"
    with pytest.raises(SourceError):
        from sd_core.ingest.source import check_source

        check_source(SourceConfig(kind="folder", path="/definitely/not/here"))


@pytest.fixture(scope="module")
def folder_run(prefect_harness, tmp_path_factory):
    """The pipeline up to the encode stage on a folder of demo emoji and two wide ones (the demo's settings)."""
    from test_pipeline import by_stage
    from tiny_diffusion import one_torch_thread

    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("folder-run")
    src = root / "emoji"
    src.mkdir()
    for i, item in enumerate(build_demo_items(10, seed=6)):
        (src / f"{i:02d}{Path(item.path).suffix or '.png'}").write_bytes(item.image_bytes())
    wide(RED).save(src / "wide red.png")
    wide(BLUE, size=(40, 90)).save(src / "tall blue.png")
    with one_torch_thread():
        first = by_stage(pipeline(folder_config(src, root / "data"), until="encode", progress=False))
    assert {first[s].status for s in ("crawl", "convert", "caption", "vae", "encode")} == {"ran"}
    yield src, root / "data", first


def folder_config(src: Path, data: Path, *sets: str):
    from test_pipeline import FAST

    from sd_core.config import load_config, preset

    return load_config(base=preset("demo"), sets=[*FAST, "source.kind=folder", f"source.path={src}", *sets],
                       overrides={"data_dir": str(data)})


def train_key(cfg, cat: Catalog) -> str:
    from sd_core.encode.stage import resolve
    from sd_core.training.stage import stage_key

    return stage_key(cfg.train, resolve(cfg.encode, cat), cat)


def rerun(src: Path, data: Path, *sets: str):
    from test_pipeline import by_stage
    from tiny_diffusion import one_torch_thread

    from flows.pipeline import pipeline

    with one_torch_thread():
        return by_stage(pipeline(folder_config(src, data, *sets), until="encode", progress=False))


@pytest.mark.slow
def test_changing_convert_fit_recomputes_only_the_latents_of_non_square_images(folder_run, tmp_path):
    src, first_dir, first = folder_run
    data = tmp_path / "data"
    shutil.copytree(first_dir, data)
    cat = Catalog(data)
    wide_rows = [r for r in read_metadata(cat) if r["fit"]]
    assert sorted(r["image_title"] for r in wide_rows) == ["tall blue", "wide red"]
    before = train_key(folder_config(src, data), cat)

    crop = rerun(src, data, "convert.fit=crop")
    assert crop["crawl"].summary["gets"] == 0 and crop["convert"].summary["converted"] == 0
    assert crop["convert"].key != first["convert"].key  # its output, the fit column, changed
    for stage in ("caption", "vae"):
        assert (crop[stage].status, crop[stage].key) == ("reused", first[stage].key), stage
    assert crop["caption"].summary["model_calls"] == 0
    e = crop["encode"].summary
    assert (crop["encode"].status, e["images_encoded"], e["captions_encoded"]) == ("ran", 2, 0)
    assert {r["fit"] for r in read_metadata(cat)} == {"", "crop"}
    assert train_key(folder_config(src, data, "convert.fit=crop"), cat) != before

    back = rerun(src, data)  # pad again: its latents are still cached
    assert back["encode"].status == "reused" and back["encode"].key == first["encode"].key
    assert train_key(folder_config(src, data), cat) == before


@pytest.mark.slow
def test_a_hand_edited_sidecar_survives_and_reaches_the_text_cache_and_training(folder_run, tmp_path):
    from sd_core.encode.encoders import text_key_base
    from sd_core.encode.stage import resolve
    from sd_core.store.files import sha256_text
    from sd_core.store.tensors import TensorStore

    src, first_dir, first = folder_run
    data = tmp_path / "data"
    shutil.copytree(first_dir, data)
    cat = Catalog(data)
    row = next(r for r in read_metadata(cat) if r["captioner"] == "offline")
    sidecar = cat.caption_sidecar(row["file_name"])
    assert sidecar.read_text("utf-8") == row["prompt"]
    before = train_key(folder_config(src, data), cat)
    sidecar.write_text("a tiny dragon juggling three oranges\n")  # as an editor saves it

    edited = rerun(src, data)
    assert edited["caption"].status == "ran" and edited["caption"].summary["model_calls"] == 0
    assert edited["caption"].summary["sidecars_edited"] == 1
    now = next(r for r in read_metadata(cat) if r["md5"] == row["md5"])
    assert (now["prompt"], now["captioner"]) == ("a tiny dragon juggling three oranges", "user")
    assert sidecar.read_text("utf-8") == "a tiny dragon juggling three oranges\n"  # not rewritten
    e = edited["encode"].summary
    assert (e["captions_encoded"], e["images_encoded"]) == (1, 0)  # its text states, and nothing else
    cfg = folder_config(src, data)
    enc = resolve(cfg.encode, cat)
    texts = TensorStore(cat.text_store, shard_size=enc.shard_size)
    assert texts.contains({**text_key_base(enc.text), "caption_sha256": sha256_text(now["prompt"])})
    assert train_key(cfg, cat) != before

    again = rerun(src, data)  # a second rerun: the hand-written caption survives, nothing is recomputed
    assert again["caption"].status == "reused" and again["encode"].status == "reused"
    assert next(r for r in read_metadata(cat) if r["md5"] == row["md5"])["captioner"] == "user"
    assert sidecar.read_text("utf-8") == "a tiny dragon juggling three oranges\n"


def test_a_hub_dataset_that_does_not_load_is_one_line(tmp_path, monkeypatch):
    """`source.path` = a Hub id is read through the Hub where it is reachable; here (no network) it is named."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: fail at once rather than after DNS retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = SourceConfig(kind="dataset", path="someone/no-such-emoji")
    with pytest.raises(SourceError) as e:
        ingest(cfg, Catalog(tmp_path))
    assert str(e.value).startswith("source.path = someone/no-such-emoji: a Hub dataset that could not be loaded (")
    assert "\n" not in str(e.value)
