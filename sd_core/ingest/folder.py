"""A folder of images as a source: every image file under ``source.path`` (subfolders included, hidden files
and folders skipped), in the order of their paths.

An image's caption is the ``.txt`` beside it (``smile.png`` → ``smile.txt``, as kohya and SimpleTuner keep
them), else the ``prompt`` (or ``caption``, ``text``) of its row in a ``metadata.csv`` (``file_name`` relative
to that csv, as ``datasets``' imagefolder reads it); its title is that row's ``title``, else the file's name
without its extension. A file is read again only when its size or modification time changed.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from sd_core.ingest.local import LocalItem
from sd_core.ingest.membership import clean_caption_text
from sd_core.ingest.source_config import CAPTION_COLUMNS, TITLE_COLUMN, SourceConfig, SourceError, relative_id

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
METADATA = "metadata.csv"


def check_folder(cfg: SourceConfig) -> Path:
    """The folder, or :class:`SourceError` naming ``source.path`` when it is missing or not a folder."""
    root = cfg.local_path()
    if not root.exists():
        raise SourceError(f"source.path = {cfg.path}: no such folder")
    if not root.is_dir():
        raise SourceError(f"source.path = {cfg.path} is a file, not a folder (kind = 'folder')")
    if not os.access(root, os.R_OK | os.X_OK):
        raise SourceError(f"source.path = {cfg.path}: the folder cannot be read (permission denied)")
    return root


def _walk(root: Path) -> tuple[list[PurePosixPath], list[PurePosixPath]]:
    """(image files, metadata.csv files) under ``root``, relative to it, hidden ones left out."""
    images, tables = [], []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = PurePosixPath(Path(folder).relative_to(root).as_posix())
        for name in files:
            if name.startswith("."):
                continue
            if name == METADATA:
                tables.append(rel / name)
            elif Path(name).suffix.lower() in IMAGE_SUFFIXES:
                images.append(rel / name)
    return sorted(images, key=str), tables


def _metadata_rows(root: Path, table: PurePosixPath) -> dict[PurePosixPath, tuple[str, str]]:
    """image path (relative to the root) -> (title, caption) from one metadata.csv."""
    path = root / table
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "file_name" not in columns:
                raise SourceError(f"{path} has no file_name column (columns: {', '.join(columns) or 'none'})")
            caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
            out = {}
            for row in reader:
                name = (row.get("file_name") or "").strip()
                if not name:
                    continue
                rel = PurePosixPath(os.path.normpath((table.parent / name.replace("\\", "/")).as_posix()))
                out[rel] = ((row.get(TITLE_COLUMN) or "").strip(),
                            clean_caption_text(row.get(caption_col)) if caption_col else "")
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{path} cannot be read: {e}") from None


def _sidecar_caption(path: Path) -> str | None:
    try:
        return clean_caption_text(path.read_text("utf-8", errors="replace"))
    except OSError:
        return None


def folder_items(cfg: SourceConfig) -> Iterator[LocalItem]:
    """Every image of the folder as a :class:`LocalItem` (see the module); :class:`SourceError` when the
    folder is missing or a metadata.csv in it cannot be read."""
    root = check_folder(cfg)
    images, tables = _walk(root)
    meta: dict[PurePosixPath, tuple[str, str]] = {}
    for table in sorted(tables, key=lambda t: len(t.parts)):  # a deeper metadata.csv wins for its files
        meta.update(_metadata_rows(root, table))
    for rel in images:
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            continue  # removed while we looked: not listed
        title, caption = meta.get(rel, ("", ""))
        beside = _sidecar_caption(path.with_suffix(".txt"))
        yield LocalItem(
            id=relative_id("folder", rel), title=title or path.stem, caption=beside or caption,
            version=f"{st.st_size}:{st.st_mtime_ns}", read=path.read_bytes,
        )
