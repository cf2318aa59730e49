"""The caption stage over a dataset: per-item cache, prompt versions, refreshes, interruptions."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from imagegen import emoji

from sd_core.caption.captioners import build_captioner
from sd_core.caption.config import CaptionConfig
from sd_core.caption.offline import OfflineCaptioner
from sd_core.caption.stage import CaptionLog, caption_dataset
from sd_core.caption.template import validate_caption
from sd_core.store.catalog import Catalog
from sd_core.store.metadata import write_metadata

COLOURS = [(220, 30, 30), (30, 60, 220), (30, 180, 60), (240, 200, 20), (140, 40, 200)]
TITLES = ["Blob Wave", "Happy Blob", "Sad Cat", "blob_thinking", "Angry Frog", "Blob Dance", "Cool Blob",
          "Sleepy Panda", "Crying Blob", "Heart Blob", "Blob Clap", "Party Parrot", "Hello Blob"]


def make_dataset(root: Path, n: int, start: int = 0) -> Catalog:
    """A converted dataset of ``n`` more images: JPEGs on white and metadata.csv rows."""
    cat = Catalog(root)
    cat.images_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in _rows(cat)]
    for i in range(start, start + n):
        name = cat.image_file_name(f"Blobs_{i + 1:07d}.jpg")
        img = emoji(COLOURS[i % 5], size=96, shape="circle" if i % 2 else "square", mark=i)
        flat = img.convert("RGBA")
        from PIL import Image

        canvas = Image.new("RGB", flat.size, "white")
        canvas.paste(flat, mask=flat)
        canvas.save(cat.image_path(name), quality=95)
        rows.append({"file_name": name, "image_url": f"http://x/{i}.webp", "image_title": TITLES[i % len(TITLES)],
                     "tag": "Blobs", "md5": f"{i:032x}", "width": 96, "height": 96, "source_format": "WEBP",
                     "animated": False})
    write_metadata(cat, rows)
    return cat


def _rows(cat: Catalog) -> list[dict[str, str]]:
    try:
        with open(cat.metadata_csv, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


class Counting:
    """A captioner factory that counts how often a model had to be built."""

    def __init__(self) -> None:
        self.built = 0
        self.captioners: list[object] = []

    def __call__(self, cfg: CaptionConfig):
        self.built += 1
        c = build_captioner(cfg)
        self.captioners.append(c)
        return c


def test_offline_captions_fill_the_prompt_column_once(tmp_path):
    cat = make_dataset(tmp_path, 8)
    cfg = CaptionConfig(captioner="offline", batch_size=3)
    factory = Counting()
    s = caption_dataset(cfg, cat, progress=False, captioner_factory=factory)
    assert (s.items, s.captioned, s.reused, s.flagged) == (8, 8, 0, 0)
    rows = _rows(cat)
    assert all(validate_caption(r["prompt"], r["image_title"]) is None for r in rows)
    assert all(r["captioner"] == "offline" and r["caption_flagged"] == "False" for r in rows)
    wave = next(r for r in rows if r["image_title"] == "Blob Wave")
    assert wave["prompt"].startswith("Blob Wave emoji with a") and "waving" in wave["prompt"]
    assert "red skin color" in wave["prompt"] and "white background" in wave["prompt"]

    again = caption_dataset(cfg, cat, progress=False, captioner_factory=factory)
    assert (again.captioned, again.reused, factory.built) == (0, 8, 1)
    assert _rows(cat) == rows

    make_dataset(tmp_path, 3, start=8)  # a refresh brought three new images
    grown = caption_dataset(cfg, cat, progress=False, captioner_factory=factory)
    assert (grown.captioned, grown.reused) == (3, 8)
    assert [r["prompt"] for r in _rows(cat)][:8] == [r["prompt"] for r in rows]


def test_qwen_path_caches_by_setting_and_falls_back(tmp_path, tiny_qwen_dir):
    cat = make_dataset(tmp_path, 5)
    cfg = CaptionConfig(model_id=str(tiny_qwen_dir), max_new_tokens=8, dtype="float32", batch_size=2)
    factory = Counting()
    s = caption_dataset(cfg, cat, progress=False, captioner_factory=factory)
    qwen = factory.captioners[0]
    # three batches, each retried once: a random tiny model writes nonsense
    assert (s.captioned, s.model_calls, qwen.items) == (5, 6, 10)
    rows = _rows(cat)
    assert all(r["caption_flagged"] == "True" and r["captioner"] == "offline" for r in rows)
    assert all(validate_caption(r["prompt"], r["image_title"]) is None for r in rows)

    again = caption_dataset(cfg, cat, progress=False, captioner_factory=factory)
    assert (again.captioned, again.model_calls, factory.built) == (0, 0, 1)

    v2 = cfg.model_copy(update={"prompt_version": "v2"})
    redo = caption_dataset(v2, cat, progress=False, captioner_factory=factory)
    assert (redo.captioned, redo.reused, factory.built) == (5, 0, 2)


class Interrupting:
    """Offline captioner that is 'killed' on its third batch."""

    source = "offline"

    def __init__(self) -> None:
        self.inner = OfflineCaptioner()
        self.calls = 0

    def caption(self, images, titles, *, strict=False):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return self.inner.caption(images, titles)


def test_interrupted_run_loses_at_most_the_batch_in_flight(tmp_path):
    cat = make_dataset(tmp_path, 10)
    cfg = CaptionConfig(captioner="offline", batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        caption_dataset(cfg, cat, progress=False, captioner_factory=lambda c: Interrupting())
    log = CaptionLog(cat.caption_log(cfg.cache_digest()))
    assert len(log.read()) == 8
    with open(log.path, "a") as f:  # a line cut short by the kill
        f.write('{"md5": "0000000000000000000000000000000a", "te')
    s = caption_dataset(cfg, cat, progress=False)
    assert (s.captioned, s.reused) == (2, 8)
    assert len(log.read()) == 10 and log.path.read_text().count("\n") == 10


def test_caption_sidecars_follow_the_prompt_column(tmp_path):
    cat = make_dataset(tmp_path, 3)
    off = caption_dataset(CaptionConfig(captioner="offline", sidecars=False), cat, progress=False)
    assert off.sidecars_written == 0 and not list(cat.images_dir.glob("*.txt"))
    on = caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False)
    assert (on.captioned, on.sidecars_written) == (0, 3), "the switch is not part of the caption cache key"
    for r in _rows(cat):
        assert cat.caption_sidecar(r["file_name"]).read_text("utf-8") == r["prompt"]
    assert caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False).sidecars_written == 0
    assert "3 unique images" in cat.dataset_card.read_text("utf-8")


def test_a_dataset_card_someone_wrote_is_kept(tmp_path):
    cat = make_dataset(tmp_path, 2)
    cat.dataset_card.write_text("# My emoji\n\nOur own words.\n")
    caption_dataset(CaptionConfig(captioner="offline"), cat, progress=False)
    assert cat.dataset_card.read_text() == "# My emoji\n\nOur own words.\n"


def test_captioners_are_released_after_the_stage() -> None:
    """Before encode and train start, the caption stage lets go of its model (Qwen2.5-VL is ~7.5 GB on a GPU)."""
    import gc
    import weakref

    from sd_core.caption.config import CaptionConfig
    from sd_core.caption.stage import release_captioners, shared_captioner

    cfg = CaptionConfig(captioner="offline")
    first = shared_captioner(cfg)
    assert shared_captioner(cfg) is first  # one per process and setting while the stage runs
    ref = weakref.ref(first)
    del first
    release_captioners()
    gc.collect()
    assert ref() is None


def test_hand_edited_sidecars_and_source_captions_win_over_the_captioner(tmp_path):
    cat = make_dataset(tmp_path, 4)
    cfg = CaptionConfig(captioner="offline")
    caption_dataset(cfg, cat, progress=False)
    first = _rows(cat)
    edited = cat.caption_sidecar(first[0]["file_name"])
    edited.write_text("  my own words\nfor this one \n")

    s = caption_dataset(cfg, cat, progress=False)
    assert (s.user_captions, s.sidecars_edited, s.prompts_changed, s.sidecars_written) == (1, 1, 1, 0)
    rows = _rows(cat)
    assert (rows[0]["prompt"], rows[0]["captioner"]) == ("my own words for this one", "user")
    assert edited.read_text() == "  my own words\nfor this one \n"  # never rewritten
    assert [r["prompt"] for r in rows[1:]] == [r["prompt"] for r in first[1:]]

    # another caption setting recaptions the others, not this one; ignore hands it to the captioner but
    # leaves the file as the person wrote it; keep again brings it back
    v2 = CaptionConfig(captioner="offline", prompt_version="v2")
    s = caption_dataset(v2, cat, progress=False)
    assert s.captioned == 3 and _rows(cat)[0]["captioner"] == "user"
    ignore = CaptionConfig(captioner="offline", user_captions="ignore")
    s = caption_dataset(ignore, cat, progress=False)
    assert s.user_captions == 0 and _rows(cat)[0]["captioner"] == "offline"
    assert edited.read_text() == "  my own words\nfor this one \n"
    assert caption_dataset(cfg, cat, progress=False).user_captions == 1

    # deleted: the captioner's caption again, and the stage writes the sidecar anew (its own from then on)
    edited.unlink()
    s = caption_dataset(cfg, cat, progress=False)
    assert s.user_captions == 0 and _rows(cat)[0]["prompt"] == first[0]["prompt"]
    assert edited.read_text() == first[0]["prompt"]
    assert caption_dataset(cfg, cat, progress=False).user_captions == 0

    # a caption the source gives (metadata.csv's source_caption) is the image's, unless a sidecar was edited
    from sd_core.store.metadata import update_metadata

    update_metadata(cat, {first[1]["md5"]: {"source_caption": "from the folder"},
                          first[2]["md5"]: {"source_caption": "from the folder too"}})
    cat.caption_sidecar(first[2]["file_name"]).write_text("edited by hand")
    caption_dataset(cfg, cat, progress=False)
    rows = {r["md5"]: r for r in _rows(cat)}
    assert rows[first[1]["md5"]]["prompt"] == "from the folder" == cat.caption_sidecar(first[1]["file_name"]).read_text()
    assert rows[first[2]["md5"]]["prompt"] == "edited by hand"


def test_sidecars_written_before_records_were_kept_are_told_apart(tmp_path):
    """A data dir captioned by an earlier version has sidecars but no state/sidecars.json: the stage wrote each
    sidecar with the prompt column, so a sidecar that differs from its row's prompt was edited by hand."""
    cat = make_dataset(tmp_path, 3)
    cfg = CaptionConfig(captioner="offline")
    caption_dataset(cfg, cat, progress=False)
    cat.sidecar_record.unlink()
    rows = _rows(cat)
    cat.caption_sidecar(rows[1]["file_name"]).write_text("kept from before")
    s = caption_dataset(cfg, cat, progress=False)
    assert s.user_captions == 1 and _rows(cat)[1]["prompt"] == "kept from before"
    assert s.sidecars_written == 0 and cat.sidecar_record.exists()
