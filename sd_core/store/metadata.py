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
import hashlib
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sd_core.store.catalog import Catalog
from sd_core.store.files import write_if_changed

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


@dataclass(frozen=True)
class _Parsed:
    digest: bytes  # of the file's bytes
    header: tuple[str, ...]
    rows: list[dict[str, str]]  # as read_metadata returns them (unescaped, file names in today's form)
    respelled: bool  # some file_name was read in another spelling (``\\`` or ``./``): the file still holds it


# The last metadata.csv parsed (or written) in this process, by a digest of its bytes: a run reads the table in
# several stages and key functions, and reading the bytes again is ~50x cheaper than parsing them.
_PARSED: dict[Path, _Parsed] = {}
_PARSED_LOCK = threading.Lock()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _remember(path: Path, parsed: _Parsed) -> None:
    with _PARSED_LOCK:
        _PARSED.clear()  # one table at a time: a process that reads several data dirs keeps only the last
        _PARSED[path] = parsed


def _parsed(catalog: Catalog) -> _Parsed | None:
    """metadata.csv as parsed rows (None when there is none), parsed only when its bytes changed."""
    path = catalog.metadata_csv
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    digest = _digest(data)
    with _PARSED_LOCK:
        hit = _PARSED.get(path)
    if hit is not None and hit.digest == digest:
        return hit
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    header = next(reader, [])
    width = len(header)
    rows = []
    for cells in reader:  # as csv.DictReader reads it (blank lines skipped, short rows padded with None), faster
        if not cells:
            continue
        values: list[str | None] = [c[1:] if c.startswith("'") else c for c in cells[:width]]
        rows.append(dict(zip(header, values + [None] * (width - len(values)))))
    respelled = False
    for row in rows:
        if row.get("file_name"):
            name = catalog.dataset_file_name(row["file_name"])
            respelled = respelled or name != row["file_name"]
            row["file_name"] = name
    hit = _Parsed(digest, tuple(header), rows, respelled)
    _remember(path, hit)
    return hit


def read_metadata(catalog: Catalog) -> list[dict[str, str]]:
    """The rows of metadata.csv, ``file_name`` relative to the csv (old bare names read as ``images/…``).
    Each call returns new dicts (the caller may change them); the file is parsed again only when its bytes
    changed since it was last parsed or written in this process."""
    hit = _parsed(catalog)
    return [] if hit is None else [dict(row) for row in hit.rows]


def _cells(row: dict[str, object], columns: list[str]) -> list[str]:
    """A row's values as the CSV holds them (what ``csv`` writes for each, before escaping)."""
    return [v if v.__class__ is str else "" if v is None else str(v) for v in map(row.get, columns)]


def _write_table(catalog: Catalog, header: list[str], rows: list[list[str]]) -> bool:
    """Write metadata.csv with ``header`` and ``rows`` (cells as read back: unescaped) unless it holds exactly
    them already; True when it wrote. The check compares with the parsed table, not the bytes, so an unchanged
    table costs no CSV encoding; a file still in the old form is always rewritten."""
    old = _parsed(catalog)
    if (old is not None and not old.respelled and old.header == tuple(header) and len(old.rows) == len(rows)
            and all([r.get(c) for c in header] == new for r, new in zip(old.rows, rows))):
        return False
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([("'" + c) if c.startswith(_FORMULA_START) else c for c in row] for row in rows)
    text = buf.getvalue()
    wrote = write_if_changed(catalog.metadata_csv, text)
    _remember(catalog.metadata_csv, _Parsed(_digest(text.encode("utf-8")), tuple(header),
                                            [dict(zip(header, row)) for row in rows], False))
    return wrote


def write_metadata(catalog: Catalog, rows: list[dict[str, object]]) -> bool:
    """Write metadata.csv atomically, keeping columns later stages added (e.g. ``prompt``) by md5, unless it
    already holds exactly these rows; True when it wrote."""
    previous = {r["md5"]: r for r in read_metadata(catalog) if r.get("md5")}
    extra = [c for c in (next(iter(previous.values())).keys() if previous else []) if c not in METADATA_COLUMNS]
    columns = [*METADATA_COLUMNS, *extra]
    known, out = set(columns), []
    for row in rows:
        if not known.issuperset(row):
            raise ValueError(f"metadata.csv has no column {sorted(set(row) - known)} (METADATA_COLUMNS)")
        old = previous.get(str(row["md5"]), {})
        cells = {**{c: old.get(c, "") for c in extra}, **row,
                 "file_name": catalog.dataset_file_name(str(row["file_name"]))}
        out.append(_cells(cells, columns))
    return _write_table(catalog, columns, out)


def update_metadata(catalog: Catalog, columns: dict[str, dict[str, object]]) -> bool:
    """Set per-row columns (by md5) in metadata.csv, atomically; rows not named keep their values. Nothing is
    written when no value changes; True when it wrote."""
    rows = read_metadata(catalog)
    names = list(rows[0].keys()) if rows else list(METADATA_COLUMNS)
    for values in columns.values():
        names.extend(k for k in values if k not in names)
    out = []
    for row in rows:
        cells = {**row, **columns.get(row["md5"], {})}
        out.append(_cells(cells, names))
    return _write_table(catalog, names, out)


def write_csv_table(path: Path, header: tuple[str, ...], rows: Iterable[tuple]) -> bool:
    """A small CSV side table (duplicates.csv, quarantine.csv), atomically and spreadsheet-safe, written only
    when its content changed; True when it wrote."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(tuple(escape_cell(v) for v in row) for row in rows)
    return write_if_changed(path, buf.getvalue())


def read_csv_table(path: Path) -> list[dict[str, str]]:
    """Rows of a table written by :func:`write_csv_table`, cells as they were before escaping."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []
