"""A damaged crawl ledger is rebuilt from the dataset, never silently replaced by an empty one.

What the ledger knows is mostly written elsewhere too: ``metadata.csv`` holds every converted image's md5,
URL, title, tag and sequence number (in its file name, ``images/Blobs_0000042.jpg``); ``quarantine.csv``
(with convert's state, which keeps their numbers) the other images, ``duplicates.csv`` the URLs that gave
the same bytes; ``state/listing.json`` every
URL listed. A rebuild from them keeps each image's sequence number, so no dataset file is renamed and no
later stage redoes anything; it keeps the deduplication; and the bytes in ``raw/`` stay in use.

What only the ledger knew is which URLs failed or were gone (and their back-off), and which URLs were
fetched but not converted yet: after a rebuild those are requested again once (recorded as failed with
reason "outcome unknown", so that this is a retry, not a first try, for the rule that fails a crawl). The
damaged file is kept beside the new one (``ledger.sqlite.damaged-<UTC time>``), so nothing is deleted.

The rebuild is crash-safe: the new ledger is written under a temporary name and renamed over the damaged
file only when complete (the damaged file was copied aside first, its WAL moved aside).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sd_core.ingest.ledger import Ledger, LedgerDamaged
from sd_core.store.catalog import Catalog
from sd_core.store.files import read_json
from sd_core.store.metadata import read_csv_table, read_metadata

log = logging.getLogger(__name__)

_SEQ = re.compile(r"_(\d{7,})\.jpg$")
LOST = "outcome unknown: the crawl ledger was rebuilt"  # a listed URL only the damaged ledger knew about
NOT_AN_IMAGE_REASONS = ("empty file", "not an image")  # convert's reasons for bytes that are no image at all


@dataclass(frozen=True)
class Rebuilt:
    """What a rebuild recovered, and where the damaged file went."""

    path: Path
    aside: Path | None  # where the damaged file was kept (None: there was no file)
    why: str
    images: int
    urls: int
    refetch: int  # listed URLs whose outcome was lost (fetched again by the next crawl)

    def line(self) -> str:
        kept = f"kept as {self.aside.name}" if self.aside is not None else "no file to keep"
        return (f"the crawl ledger {self.path} was damaged ({self.why}; {kept}) and was "
                f"rebuilt from metadata.csv, quarantine.csv, duplicates.csv and listing.json ({self.images} "
                f"images with their file names, {self.urls} URLs); {self.refetch} listed URLs whose outcome "
                "only the damaged file knew will be fetched again")


def open_ledger(catalog: Catalog) -> tuple[Ledger, Rebuilt | None]:
    """The data dir's ledger, rebuilt first (with a warning) when SQLite cannot read it, or when it is missing
    or empty beside a dataset (a new ledger would number the images anew and rename every file). Other errors
    (permissions, a full disk) raise :class:`LedgerError` naming the file."""
    path = catalog.ledger_db
    try:
        lost = "empty file" if path.stat().st_size == 0 else None
    except FileNotFoundError:
        lost = "missing"
    if lost is None or not read_metadata(catalog):
        try:
            return Ledger(path), None
        except LedgerDamaged as e:
            lost = e.why
    rebuilt = rebuild_ledger(catalog, lost)
    log.warning("%s", rebuilt.line())
    return Ledger(path), rebuilt


def quarantine_verdicts(catalog: Catalog) -> dict[str, str]:
    """md5 -> reason of every image the convert stage quarantined (from its state; {} when unreadable)."""
    return {md5: str(it["quarantined"]) for md5, it in convert_items(catalog).items() if "quarantined" in it}


def convert_items(catalog: Catalog) -> dict[str, dict]:
    """What the convert stage's state says of each image it saw, by md5 ({} when missing or unreadable)."""
    try:
        state = read_json(catalog.convert_state) or {}
        items = state.get("items", {}) if isinstance(state, dict) else {}
        return {str(m): it for m, it in items.items() if isinstance(it, dict)}
    except (OSError, ValueError, AttributeError):
        return {}


def rebuild_ledger(catalog: Catalog, why: str) -> Rebuilt:
    """Write a new ledger from the dataset's files in place of the damaged one (kept aside). See the module."""
    path = catalog.ledger_db
    now = datetime.now(timezone.utc)
    stamp = now.isoformat(timespec="seconds")
    aside = path.with_name(f"{path.name}.damaged-{now.strftime('%Y%m%dT%H%M%SZ')}")
    n = 1
    while aside.exists():  # two rebuilds within a second: keep both damaged files
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{now.strftime('%Y%m%dT%H%M%SZ')}-{n}")
    tmp = path.with_name(f".{path.name}.rebuild.tmp")  # what a killed rebuild left is removed here
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)

    listing = _listing(catalog)
    converted = convert_items(catalog)
    urls: dict[str, dict[str, object]] = {}  # url -> row values
    images: list[tuple[int | None, str, str, str, str]] = []  # (seq, md5, url, title, tag)
    seen: set[str] = set()
    for row in read_metadata(catalog):
        m = _SEQ.search(row.get("file_name", ""))
        md5, url = row.get("md5", ""), row.get("image_url", "")
        if not m or not md5 or not url or md5 in seen:
            continue
        seen.add(md5)
        images.append((int(m.group(1)), md5, url, row.get("image_title", ""), row.get("tag", "")))
    for row in read_csv_table(catalog.quarantine_csv):
        md5, url, reason = row.get("md5", ""), row.get("image_url", ""), row.get("reason", "")
        if not md5 or not url or md5 in seen or reason.startswith(NOT_AN_IMAGE_REASONS):
            continue  # an error page recorded as an image by an older version: its URL is fetched again
        seen.add(md5)
        seq = converted.get(md5, {}).get("seq")  # convert keeps a quarantined image's number in its state
        images.append((seq if isinstance(seq, int) and seq > 0 else None, md5, url, row.get("image_title", ""),
                       listing.get(url, ("", "", None))[1]))
    for seq, md5, url, title, tag in images:
        urls[url] = {"title": title, "tag": tag, "md5": md5}
    for row in read_csv_table(catalog.duplicates_csv):
        url, md5 = row.get("image_url", ""), row.get("md5", "")
        if url and md5 in seen and url not in urls:
            urls[url] = {"title": row.get("image_title", ""), "tag": "", "md5": md5}

    with Ledger(tmp):  # the schema and its version, as any new ledger gets them
        pass
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("BEGIN")
        for url, (title, tag, page) in listing.items():  # failed and due now: fetched again by this crawl
            db.execute("INSERT INTO urls (url, title, tag, page, status, error, first_seen, last_seen) "
                       "VALUES (?, ?, ?, ?, 'failed', ?, ?, ?)", (url, title, tag, page, LOST, stamp, stamp))
        for url, v in urls.items():
            size = _size(catalog, str(v["md5"]))
            db.execute(
                "INSERT INTO urls (url, title, tag, page, status, md5, http_status, attempts, first_seen, last_seen, "
                "fetched_at, size) VALUES (?, ?, ?, NULL, 'ok', ?, 200, 1, ?, ?, ?, ?) ON CONFLICT(url) DO UPDATE SET "
                "status='ok', md5=excluded.md5, http_status=200, error=NULL, attempts=1, "
                "fetched_at=excluded.fetched_at, size=excluded.size",
                (url, v["title"], v["tag"] or listing.get(url, ("", "", None))[1], v["md5"], stamp, stamp, stamp,
                 size))
        numbered, used = [], set()
        for i in sorted((i for i in images if i[0] is not None), key=lambda i: i[0]):
            numbered.append(i if i[0] not in used else (None, *i[1:]))  # a number twice (edited files): renumbered
            used.add(i[0])
        for seq, md5, url, title, tag in sorted(numbered, key=lambda i: i[0] is None) + [
                i for i in images if i[0] is None]:
            db.execute("INSERT INTO images (seq, md5, url, title, tag, size, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (seq, md5, url, title, tag or listing.get(url, ("", "", None))[1], _size(catalog, md5), stamp))
        db.execute("COMMIT")
        db.close()  # the last connection: the WAL is checkpointed into the file and removed
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # The damaged file stays (copied aside); its WAL must not be replayed onto the new ledger.
        kept = path.exists()
        if kept:
            shutil.copy2(path, aside)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        db.close()
        tmp.unlink(missing_ok=True)
        raise
    refetch = sum(1 for u in listing if u not in urls)
    return Rebuilt(path, aside if kept else None, why, len(images), len(set(listing) | set(urls)), refetch)


def _listing(catalog: Catalog) -> dict[str, tuple[str, str, int | None]]:
    """url -> (title, tag, page) from the last listing (empty when it is missing or unreadable)."""
    try:
        data = read_json(catalog.listing_json) or {}
        tag = str(data.get("tag", ""))
        out: dict[str, tuple[str, str, int | None]] = {}
        for url, title, page in data.get("items", []):
            out.setdefault(str(url), (str(title), tag, int(page)))
        return out
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _size(catalog: Catalog, md5: str) -> int:
    try:
        return catalog.raw_path(md5).stat().st_size
    except OSError:
        return 0


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
