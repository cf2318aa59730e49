"""The dataset table, ``metadata.csv``: one row per unique image, columns added by later stages.

``file_name`` is relative to metadata.csv (``images/Blobs_0000001.jpg``), so ``datasets``' imagefolder
reads the data directory as it is. Data directories written before held bare names (``Blobs_0000001.jpg``):
:func:`read_metadata` returns them in today's form and every write stores that form, so the next run
migrates the file without changing anything a stage key hashes (md5s and captions).
"""

from __future__ import annotations

import csv
import io

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text

METADATA_COLUMNS = (
    "file_name", "image_url", "image_title", "tag", "md5", "width", "height", "source_format", "animated",
)


def read_metadata(catalog: Catalog) -> list[dict[str, str]]:
    """The rows of metadata.csv, ``file_name`` relative to the csv (old bare names read as ``images/…``)."""
    try:
        with open(catalog.metadata_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    for row in rows:
        if row.get("file_name"):
            row["file_name"] = catalog.dataset_file_name(row["file_name"])
    return rows


def needs_migration(catalog: Catalog) -> bool:
    """Whether metadata.csv still holds file names of the old form (bare, not relative to the csv)."""
    try:
        with open(catalog.metadata_csv, newline="", encoding="utf-8") as f:
            return any(r.get("file_name") and "/" not in r["file_name"] for r in csv.DictReader(f))
    except FileNotFoundError:
        return False


def migrate_metadata(catalog: Catalog) -> bool:
    """Rewrite an old metadata.csv with file names relative to it (nothing else changes); True when it did."""
    if not needs_migration(catalog):
        return False
    update_metadata(catalog, {})
    return True


def write_metadata(catalog: Catalog, rows: list[dict[str, object]]) -> None:
    """Write metadata.csv atomically, keeping columns later stages added (e.g. ``prompt``) by md5."""
    previous = {r["md5"]: r for r in read_metadata(catalog) if r.get("md5")}
    extra = [c for c in (next(iter(previous.values())).keys() if previous else []) if c not in METADATA_COLUMNS]
    columns = [*METADATA_COLUMNS, *extra]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        old = previous.get(str(row["md5"]), {})
        writer.writerow({**{c: old.get(c, "") for c in extra}, **row,
                         "file_name": catalog.dataset_file_name(str(row["file_name"]))})
    atomic_write_text(catalog.metadata_csv, buf.getvalue())


def update_metadata(catalog: Catalog, columns: dict[str, dict[str, object]]) -> None:
    """Set per-row columns (by md5) in metadata.csv, atomically; rows not named keep their values."""
    rows = read_metadata(catalog)
    names = list(rows[0].keys()) if rows else list(METADATA_COLUMNS)
    for values in columns.values():
        names.extend(k for k in values if k not in names)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **columns.get(row["md5"], {})})
    atomic_write_text(catalog.metadata_csv, buf.getvalue())
