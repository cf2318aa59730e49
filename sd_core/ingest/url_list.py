"""A list of image URLs as a source: a CSV, TSV or parquet file at ``source.path`` with one URL a row, and
optionally a caption and a title, in the columns img2dataset reads (``url``, ``caption``, ``title``; see
``source.url_column``, ``caption_column``, ``title_column``).

It becomes a :class:`~sd_core.ingest.crawl.Listing` that the crawl's download half fetches like the site's
(:func:`~sd_core.ingest.crawl.download_new`): the same fetcher, retries, deadlines, back-off, host policy and
ledger. The hosts it may fetch from are the ones the list names (and ``crawl.allowed_hosts``); a redirect to
another host is refused, and a private or loopback address only when the list itself names one.
"""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from urllib.parse import urlsplit

from sd_core.ingest.crawl import END_OF_LISTING, Listing, Walk
from sd_core.ingest.hf_dataset import require
from sd_core.ingest.membership import clean_caption_text
from sd_core.ingest.settings import origin_of
from sd_core.ingest.source_config import CAPTION_COLUMNS, TITLE_COLUMN, SourceConfig, SourceError

SUFFIXES = {".csv": ",", ".tsv": "\t", ".parquet": None}


def check_url_list(cfg: SourceConfig) -> list[str]:
    """The list's columns; :class:`SourceError` naming ``source.path`` when the file is missing, unreadable,
    of another kind, or has no URL column."""
    path = cfg.local_path()
    if not path.is_file():
        raise SourceError(f"source.path = {cfg.path}: no such file" if not path.exists() else
                          f"source.path = {cfg.path} is a folder, not a URL list (kind = 'urls')")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SourceError(f"source.path = {cfg.path}: a URL list must be a .csv, .tsv or .parquet file")
    try:
        if SUFFIXES[suffix] is None:
            pq = require("pyarrow.parquet", "a parquet URL list")
            columns = list(pq.read_schema(path).names)
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                columns = next(csv.reader(f, delimiter=SUFFIXES[suffix]), [])
    except SourceError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"source.path = {cfg.path} cannot be read: {e}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's errors: the file is no readable parquet
        raise SourceError(f"source.path = {cfg.path}: unreadable parquet ({type(e).__name__}: {e})") from None
    columns = [c.strip() for c in columns]
    if cfg.url_column not in columns:
        raise SourceError(f"source.path = {cfg.path} has no {cfg.url_column!r} column (columns: "
                          f"{', '.join(columns) or 'none'}); set source.url_column")
    for field, given in (("caption_column", cfg.caption_column), ("title_column", cfg.title_column)):
        if given is not None and given not in columns:
            raise SourceError(f"source.path = {cfg.path} has no column source.{field} = {given!r} "
                              f"(columns: {', '.join(columns)})")
    return columns


def _rows(cfg: SourceConfig, wanted: list[str]) -> list[dict[str, object]]:
    path = cfg.local_path()
    sep = SUFFIXES[path.suffix.lower()]
    try:
        if sep is None:
            pq = require("pyarrow.parquet", "a parquet URL list")
            return pq.read_table(path, columns=wanted).to_pylist()
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [{k.strip(): v for k, v in row.items() if k is not None}
                    for row in csv.DictReader(f, delimiter=sep)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"source.path = {cfg.path} cannot be read: {e}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's errors
        raise SourceError(f"source.path = {cfg.path}: unreadable parquet ({type(e).__name__}: {e})") from None


def read_url_list(cfg: SourceConfig, *, tag: str, now: datetime | None = None) -> Listing:
    """The list as a listing, newest first as a site lists (its last row first), so that images are numbered
    in the list's order; repeated URLs keep their first row. :class:`SourceError` as :func:`check_url_list`,
    or when no row has a URL."""
    columns = check_url_list(cfg)
    caption_col = cfg.caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    title_col = cfg.title_column or (TITLE_COLUMN if TITLE_COLUMN in columns else None)
    wanted = [c for c in dict.fromkeys([cfg.url_column, caption_col, title_col]) if c]
    seen: dict[str, tuple[str, str]] = {}
    for row in _rows(cfg, wanted):
        url = str(row.get(cfg.url_column) or "").strip()
        if url and url not in seen:
            seen[url] = (str(row.get(title_col) or "").strip() if title_col else "",
                         clean_caption_text(row.get(caption_col)) if caption_col else "")
    if not seen:
        raise SourceError(f"source.path = {cfg.path}: no row has a URL in its {cfg.url_column!r} column")
    origins: dict[str, None] = {}
    for url in seen:
        try:
            origin_of(url)
        except ValueError:
            continue  # refused by the host policy when fetched, with its reason
        parts = urlsplit(url)
        origins.setdefault(f"{parts.scheme.lower()}://{parts.netloc.rsplit('@', 1)[-1].lower()}")
    items = tuple((url, title, 0) for url, (title, _) in reversed(seen.items()))
    at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    return Listing(tag=tag, pages=1, items=items, origins=tuple(origins), base_url=f"urls:{cfg.path}", kind="urls",
                   captions={u: c for u, (_, c) in seen.items() if c},
                   walk=Walk("full", "every row of the URL list is read", 1, END_OF_LISTING, None, at),
                   full_walk_at=at)
