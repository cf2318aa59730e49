"""Convert stage: downloaded bytes (WebP, PNG, GIF, JPEG, animated) into the RGB JPEG dataset.

Transparency is flattened on a background colour (white by default). Bytes that do not
decode are quarantined with their reason and never enter the dataset.

Only the first frame of an animation is decoded (it is the one kept); a truncated animation is found
from the file's structure (:mod:`sd_core.ingest.frames`). Each image is decoded in a worker process
with a time limit (``max_seconds_per_image``): an image over it is quarantined with reason ``timeout``.

The dataset holds the images the source lists now (:mod:`sd_core.ingest.membership`): the JPEG and caption
sidecar of an image no longer listed move to ``delisted/``, and back when it is listed again. The JPEGs keep
their shape; ``convert.fit`` only says, in metadata.csv's ``fit`` column, how the model's square input is made
from a non-square one (:func:`sd_core.common.images.fit_square`), so changing it converts nothing again.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from sd_core.common.images import flatten_rgb
from sd_core.common.config_base import StrictModel
from sd_core.ingest.frames import scan_frames
from sd_core.ingest.isolate import Worker, WorkerCrashed, WorkerTimeout
from sd_core.ingest.ledger import ImageRecord, Ledger
from sd_core.ingest.membership import current_membership
from sd_core.ingest.recover import open_ledger
from sd_core.store.catalog import Catalog
from sd_core.store.files import (
    atomic_write_bytes,
    atomic_write_json,
    md5_bytes,
    read_json,
    sha256_text,
    stable_hash,
    sweep_temp_files,
)
from sd_core.store.metadata import write_csv_table, write_metadata

CODE_VERSION = 2  # 2: first frame only, structural truncation check, JPEG checksums in the state
_SAVE_EVERY = 50
UNTITLED = "untitled"  # the dataset title of an emoji listed without one


class ConvertConfig(StrictModel):
    """Decoding of downloaded bytes into the RGB JPEG dataset."""

    jpeg_quality: int = Field(
        95, ge=1, le=100, description="quality of the JPEG each image is saved as (Pillow's scale)"
    )
    background: tuple[int, int, int] = Field(
        (255, 255, 255), description="RGB colour that transparency is flattened on (white)"
    )
    max_image_pixels: int = Field(
        16_000_000, gt=0,
        description="decompression-bomb limit: larger images are quarantined. Only the first frame of an "
        "animation is decoded, so this also bounds the pixels decoded per file",
    )
    max_frames: int = Field(
        10_000, ge=1, description="animations with more frames are quarantined (counted without decoding)"
    )
    max_seconds_per_image: float = Field(
        30.0, gt=0,
        description="time limit to decode and re-encode one image (in a worker process, which is killed "
        "past it); the image is quarantined with reason 'timeout'",
    )
    fit: Literal["pad", "crop", "stretch"] = Field(
        "pad",
        description="how a non-square image becomes the square the model takes: 'pad' centres it on a square "
        "of its border colour, 'crop' keeps its centre square, 'stretch' resizes it as it is. The JPEGs keep "
        "their shape; metadata.csv's fit column says what is applied (empty for a square image). Changing it "
        "recomputes the latents of non-square images (and what is trained on them), not the conversion or the "
        "captions",
    )

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError("each channel must be in 0..255")
        return v


class QuarantineError(ValueError):
    """The bytes are not a usable image; the message is the reason recorded."""


@dataclass(frozen=True)
class Converted:
    jpeg: bytes
    width: int
    height: int
    source_format: str
    animated: bool


_MAGIC = ((b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"\xff\xd8", "JPEG"), (b"BM", "BMP"))


def sniff_format(data: bytes) -> str:
    """Format named by the leading bytes, for reasons given before Pillow can tell."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "image")


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open: the format identified from the header, no pixel decoded. The first step of
    :func:`to_rgb_jpeg`, and all of :func:`not_an_image`."""
    if not data:
        raise QuarantineError("empty file")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise QuarantineError("not an image (unidentified format)") from None


def not_an_image(data: bytes) -> str | None:
    """Why ``data`` is no image at all (empty, or in no format the decoder knows: an HTML error page, text,
    JSON), or None. Only the header is read, so this is cheap enough for every download; an image whose
    pixels are broken or too many is still an image here (convert quarantines it with its reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            _open(data).close()
    except QuarantineError as e:
        return str(e)
    except Exception:  # noqa: BLE001 - identified but broken (a bomb, a bad header field): convert decides
        return None
    return None


def to_rgb_jpeg(data: bytes, cfg: ConvertConfig) -> Converted:
    """Decode ``data`` (first frame if animated) and encode it as an RGB JPEG.

    Runs in the calling process with no time limit; the convert stage calls it through
    :class:`ConvertWorker`, which adds one.
    """
    if not data:
        raise QuarantineError("empty file")
    fmt = sniff_format(data)
    scan = scan_frames(data, cfg.max_frames)
    if scan is not None:
        if scan.truncated:
            raise QuarantineError(f"undecodable {fmt}: truncated file (it ends {scan.truncated})")
        if scan.frames > cfg.max_frames:
            raise QuarantineError(f"too many frames: more than {cfg.max_frames} (convert.max_frames)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(data)
            w, h = img.size
            if w * h > cfg.max_image_pixels:
                raise QuarantineError(f"decompression bomb: {w}x{h} exceeds {cfg.max_image_pixels} pixels")
            fmt = img.format or fmt
            animated = scan.frames > 1 if scan is not None else bool(getattr(img, "is_animated", False))
            img.load()  # the first frame only: the others are never decoded
    except QuarantineError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise QuarantineError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise QuarantineError(f"undecodable {fmt}: {e}") from None
    rgb = flatten_rgb(img, cfg.background)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return Converted(buf.getvalue(), rgb.width, rgb.height, fmt, animated)


def _worker_handler(setup: bytes) -> Callable[[bytes], tuple[dict[str, Any], bytes | None]]:
    """The worker process's side of :class:`ConvertWorker` (``setup`` is the config as JSON)."""
    cfg = ConvertConfig.model_validate_json(setup)

    def handle(data: bytes) -> tuple[dict[str, Any], bytes | None]:
        try:
            out = to_rgb_jpeg(data, cfg)
        except QuarantineError as e:
            return {"quarantined": str(e)}, None
        except Exception as e:  # noqa: BLE001 - MemoryError, a codec's own error: this image is unusable
            return {"quarantined": f"decoder error: {type(e).__name__}: {e}"[:300]}, None
        return {"width": out.width, "height": out.height, "source_format": out.source_format,
                "animated": out.animated}, out.jpeg

    return handle


class ConvertWorker:
    """``to_rgb_jpeg`` in a worker process, at most ``cfg.max_seconds_per_image`` per image."""

    def __init__(self, cfg: ConvertConfig) -> None:
        self.cfg = cfg
        self._worker = Worker("sd_core.ingest.convert:_worker_handler", cfg.model_dump_json().encode())

    def convert(self, data: bytes) -> Converted:
        limit = self.cfg.max_seconds_per_image
        try:
            head, jpeg = self._worker.call(data, timeout=limit)
        except WorkerTimeout:
            raise QuarantineError(
                f"timeout: decoding took longer than {limit:g}s (convert.max_seconds_per_image)"
            ) from None
        except WorkerCrashed as e:
            raise QuarantineError(f"decoder crashed ({e})") from None
        if "quarantined" in head:
            raise QuarantineError(head["quarantined"])
        return Converted(jpeg or b"", int(head["width"]), int(head["height"]), str(head["source_format"]),
                         bool(head["animated"]))

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> "ConvertWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FILE_TAG_CHARS = 64  # of the tag in a dataset file name: names stay far below any file system's limit


def file_name_for(rec: ImageRecord) -> str:
    """Dataset file name from the tag and the image's sequence number (never from its title).

    The tag is reduced to ``A-Z a-z 0-9 _ -`` (other runs become ``_``), never starts with ``-`` or ``_``, and
    is cut to FILE_TAG_CHARS characters, so a name is at most 80 bytes whatever the tag; the sequence number
    alone keeps names unique. A tag of letters, digits, ``_`` and ``-`` up to that length keeps the name it
    always had (``Blobs_0000001.jpg``).
    """
    tag = re.sub(r"[^A-Za-z0-9_-]+", "_", rec.tag).lstrip("_-")[:FILE_TAG_CHARS].rstrip("_") or "emoji"
    return f"{tag}_{rec.seq:07d}.jpg"


@dataclass
class ConvertSummary:
    images: int = 0
    converted: int = 0
    reused: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    dataset_rows: int = 0
    delisted: int = 0  # images of the ledger no item of the source lists now: not in the dataset
    relisted: int = 0  # de-listed images listed again this run (their files moved back from delisted/)
    set_aside: int = 0  # images de-listed this run (their files moved to delisted/)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def config_key(cfg: ConvertConfig) -> str:
    """What a converted JPEG depends on (``fit`` is not: it only fills metadata.csv's fit column)."""
    return stable_hash({"config": cfg.model_dump(mode="json", exclude={"fit"}), "code_version": CODE_VERSION})


def stage_key(cfg: ConvertConfig, catalog: Catalog) -> str:
    """Key of the convert stage: its settings, its code version, the listed images it reads and the
    captions their source gives them."""
    with Ledger(catalog.ledger_db) as ledger:
        member = current_membership(catalog, ledger)
        images = [(r.seq, r.md5, r.tag) for r in ledger.images() if r.md5 in member]
    key: dict[str, object] = {"config": config_key(cfg), "images": images, "fit": cfg.fit}
    if member.captions:
        key["captions"] = sorted((m, sha256_text(c)[:16]) for m, c in member.captions.items())
    return stable_hash(key)


def _move(src: Any, dst: Any) -> bool:
    """Rename ``src`` to ``dst`` (one atomic step on one file system); False when ``src`` is not there."""
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        return False
    return True


def _set_aside(catalog: Catalog, file_name: str) -> bool:
    """Move a de-listed image's JPEG and caption sidecar from images/ to delisted/; True when it moved one."""
    moved = False
    for src in (catalog.image_path(file_name), catalog.caption_sidecar(file_name)):
        if src.exists():
            catalog.delisted_dir.mkdir(parents=True, exist_ok=True)
            moved = _move(src, catalog.delisted_path(src.name)) or moved
    return moved


def _bring_back(catalog: Catalog, file_name: str) -> bool:
    """Move a listed-again image's JPEG and sidecar back from delisted/ (only where images/ has none)."""
    moved = False
    for src, dst in ((catalog.delisted_path(file_name), catalog.image_path(file_name)),
                     (catalog.delisted_path(catalog.caption_sidecar(file_name).name), catalog.caption_sidecar(file_name))):
        if not dst.exists() and _move(src, dst):
            moved = True
    return moved


def convert_dataset(
    cfg: ConvertConfig, catalog: Catalog, *, progress: bool = True, force: bool = False
) -> ConvertSummary:
    """Bring ``images/``, ``metadata.csv`` and the quarantine up to date with the crawl ledger.

    Items converted earlier with the same settings are reused when their JPEG is still the one
    written (its md5 is kept in the state); progress is saved every few items, so a killed run
    resumes where it stopped. Each image is decoded in a worker process, at most
    ``max_seconds_per_image`` each.
    """
    sweep_temp_files(catalog.root)
    ledger, _rebuilt = open_ledger(catalog)  # a damaged ledger is rebuilt from the dataset, with a warning
    with ledger:
        member = current_membership(catalog, ledger)
        everything = ledger.images()
        duplicates = [d for d in ledger.duplicates() if member.lists(d.url)]
    records = [r for r in everything if r.md5 in member]
    key = config_key(cfg)
    state = read_json(catalog.convert_state) or {}
    items: dict[str, dict] = state.get("items", {}) if state.get("config_key") == key and not force else {}
    summary = ConvertSummary(images=len(records), delisted=len(everything) - len(records))
    reasons: Counter[str] = Counter()
    for rec in records:  # listed again: its files come back from delisted/, nothing is converted again
        item = items.get(rec.md5)
        if item is not None and "file_name" in item and not catalog.image_path(item["file_name"]).exists():
            summary.relisted += int(_bring_back(catalog, item["file_name"]))
    checked: list[str] = []  # images whose JPEG was read to check it (its stat is recorded anew)
    todo = [r for r in records if not _done(items.get(r.md5), catalog, checked)]
    summary.reused = len(records) - len(todo)

    def save_state() -> None:
        atomic_write_json(catalog.convert_state, {"config_key": key, "items": items}, compact=True)

    # Progress is saved every _SAVE_EVERY items, or every 2 % of the state's size when that is more: a save
    # writes the whole state, so this keeps the saves' cost proportional to the items converted.
    save_every = max(_SAVE_EVERY, len(items) // 50)

    with ConvertWorker(cfg) as worker:
        for i, rec in enumerate(tqdm(todo, desc="converting", unit="img", disable=not progress or not todo)):
            raw = catalog.raw_path(rec.md5)
            try:
                data = raw.read_bytes()
            except FileNotFoundError:
                items.pop(rec.md5, None)
                reasons["raw bytes missing"] += 1
                continue
            name = catalog.image_file_name(file_name_for(rec))  # relative to metadata.csv: images/<tag>_<seq>.jpg
            try:
                out = worker.convert(data)
            except QuarantineError as e:
                atomic_write_bytes(catalog.quarantine_dir / rec.md5, data)
                items[rec.md5] = {"quarantined": str(e), "seq": rec.seq}  # seq: for a ledger rebuild
            else:
                atomic_write_bytes(catalog.image_path(name), out.jpeg)
                items[rec.md5] = {
                    "file_name": name, "width": out.width, "height": out.height,
                    "source_format": out.source_format, "animated": out.animated, "jpeg_md5": md5_bytes(out.jpeg),
                    "jpeg_stat": _stat_of(catalog.image_path(name)),
                }
                summary.converted += 1
            if (i + 1) % save_every == 0:
                save_state()
    if todo or checked or state.get("items") is not items:  # a rerun with nothing new leaves the state as it was
        save_state()
    listed = {r.md5 for r in records}
    for rec in everything:  # de-listed: its JPEG and sidecar leave images/ (kept in delisted/ until gc)
        item = items.get(rec.md5)
        if rec.md5 not in listed and item is not None and "file_name" in item:
            summary.set_aside += int(_set_aside(catalog, item["file_name"]))

    rows, quarantine = [], []
    for rec in records:
        item = items.get(rec.md5)
        if item is None:
            continue
        title = dataset_title(rec.title)
        if "quarantined" in item:
            quarantine.append((rec.md5, rec.url, title, item["quarantined"]))
            reasons[item["quarantined"].split(":")[0]] += 1
            continue
        rows.append({
            "file_name": item["file_name"], "image_url": rec.url, "image_title": title, "tag": rec.tag,
            "md5": rec.md5, "width": item["width"], "height": item["height"],
            "source_format": item["source_format"], "animated": item["animated"],
            "fit": cfg.fit if item["width"] != item["height"] else "",
            "source_caption": member.captions.get(rec.md5, ""),
        })
    write_metadata(catalog, rows)
    write_csv_table(catalog.quarantine_csv, ("md5", "image_url", "image_title", "reason"), quarantine)
    write_csv_table(
        catalog.duplicates_csv,
        ("image_url", "image_title", "md5", "original_url", "original_title"),
        [(d.url, dataset_title(d.title), d.md5, d.original_url, dataset_title(d.original_title)) for d in duplicates],
    )
    summary.quarantined = len(quarantine)
    summary.quarantine_reasons = dict(reasons)
    summary.dataset_rows = len(rows)
    return summary


def dataset_title(title: str) -> str:
    """The title as the dataset shows it: ``untitled`` when the listing gave none (or only blanks)."""
    return title if title.strip() else UNTITLED


def _stat_of(path) -> list[int]:  # type: ignore[no-untyped-def]
    """What identifies a file's version without reading it: size, mtime, ctime and inode. Replacing or
    rewriting the file changes them (an overwrite that restores the mtime still moves the ctime)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _done(item: dict | None, catalog: Catalog, checked: list[str]) -> bool:
    """Converted before and still intact: quarantined, or its JPEG is the file written then. That is told
    from the file's stat recorded when it was written or last checked (``jpeg_stat``: one ``stat`` per image
    on a rerun, no read); a JPEG whose stat differs (copied, touched, rewritten) is read and checked against
    the md5 recorded when written, and its stat recorded when it matches (its name appended to ``checked``).
    A missing, changed or unrecorded JPEG is converted again."""
    if item is None:
        return False
    if "quarantined" in item:
        return True
    if "jpeg_md5" not in item:
        return False
    path = os.path.join(catalog.root, catalog.dataset_file_name(item["file_name"]))  # image_path, as a str: faster
    try:
        stat = _stat_of(path)
        if item.get("jpeg_stat") == stat:
            return True
        with open(path, "rb") as f:
            if md5_bytes(f.read()) != item["jpeg_md5"]:
                return False
    except OSError:
        return False
    item["jpeg_stat"] = stat  # checked by content: the next run trusts this version of the file by its stat
    checked.append(item["file_name"])
    return True
