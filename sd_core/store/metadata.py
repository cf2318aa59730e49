"""The dataset table, ``metadata.csv``: one row per unique image, columns added by later stages."""

from __future__ import annotations

import csv
import io

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text

METADATA_COLUMNS = (
    "file_name", "image_url", "image_title", "tag", "md5", "width", "height", "source_format", "animated",
)


def read_metadata(catalog: Catalog) -> list[dict[str, str]]:
    try:
        with open(catalog.metadata_csv, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


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
        writer.writerow({**{c: old.get(c, "") for c in extra}, **row})
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
