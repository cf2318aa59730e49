"""The dataset table, ``metadata.csv``: one row per unique image, columns added by later stages.

``file_name`` is relative to metadata.csv (``images/Blobs_0000001.jpg``), so ``datasets``' imagefolder
reads the data directory as it is.

Cells are written spreadsheet-safe: text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return would be run as a formula by Excel or LibreOffice, so it is written with a leading ``'`` (OWASP's
rule for CSV injection); a cell that already starts with ``'`` gets one more, so the escaping can be
undone without ambiguity. :func:`read_metadata` undoes it: later stages read the titles exactly as listed.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text

# ``fit``: how the model's square input is made of a non-square image (pad, crop, stretch; empty for a square
# one); ``source_caption``: the caption the source gives the image (a folder's .txt, a caption column), if any.
METADATA_COLUMNS = (
    "file_name", "image_url", "image_title", "tag", "md5", "width", "height", "source_format", "animated",
    "fit", "source_caption",
)

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def escape_cell(value: object) -> object:
    """``value`` as written to a CSV: text a spreadsheet would run as a formula gets a leading ``'``."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """Undo :func:`escape_cell` on a cell read back."""
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def _escaped(row: dict[str, object]) -> dict[str, object]:
    return {k: escape_cell(v) for k, v in row.items()}


def read_metadata(catalog: Catalog) -> list[dict[str, str]]:
    """The rows of metadata.csv, ``file_name`` relative to the csv (checked: a path inside the data directory)."""
    try:
        with open(catalog.metadata_csv, newline="", encoding="utf-8") as f:
            rows = [{k: unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []
    for row in rows:
        if row.get("file_name"):
            row["file_name"] = catalog.dataset_file_name(row["file_name"])
    return rows


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
        writer.writerow(_escaped({**{c: old.get(c, "") for c in extra}, **row,
                                  "file_name": catalog.dataset_file_name(str(row["file_name"]))}))
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
        writer.writerow(_escaped({**row, **columns.get(row["md5"], {})}))
    atomic_write_text(catalog.metadata_csv, buf.getvalue())


def write_csv_table(path: Path, header: tuple[str, ...], rows: Iterable[tuple]) -> None:
    """A small CSV side table (duplicates.csv, quarantine.csv), atomically and spreadsheet-safe."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(tuple(escape_cell(v) for v in row) for row in rows)
    atomic_write_text(path, buf.getvalue())


def read_csv_table(path: Path) -> list[dict[str, str]]:
    """Rows of a table written by :func:`write_csv_table`, cells as they were before escaping."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []
