"""The crawl ledger: every image URL ever listed, what fetching it gave, and each unique image by md5.

SQLite in WAL mode: each recorded fetch is its own transaction, so a run killed at any
moment keeps everything fetched before it, and the next run resumes from there.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

FetchStatus = Literal["ok", "gone", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url          TEXT PRIMARY KEY,
    title        TEXT NOT NULL,
    tag          TEXT NOT NULL,
    page         INTEGER,
    status       TEXT,             -- ok | gone (404/410) | failed (retried next run) | NULL (listed, not fetched)
    md5          TEXT,
    http_status  INTEGER,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    first_seen   TEXT NOT NULL,
    last_seen    TEXT NOT NULL,
    fetched_at   TEXT
);
CREATE TABLE IF NOT EXISTS images (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    md5           TEXT NOT NULL UNIQUE,
    url           TEXT NOT NULL,   -- the first URL this content was fetched from
    title         TEXT NOT NULL,
    tag           TEXT NOT NULL,
    size          INTEGER NOT NULL,
    content_type  TEXT,
    fetched_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS urls_md5 ON urls (md5);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ImageRecord:
    seq: int
    md5: str
    url: str
    title: str
    tag: str
    size: int
    content_type: str | None


@dataclass(frozen=True)
class DuplicateRecord:
    url: str
    title: str
    md5: str
    original_url: str
    original_title: str


class Ledger:
    """Thread-safe access to the crawl ledger (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note_listed(self, items: list[tuple[str, str, int]], tag: str) -> None:
        """Record listed (url, title, page) triples; keeps the first title seen for a URL."""
        now = _now()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO urls (url, title, tag, page, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(url) DO UPDATE SET last_seen = excluded.last_seen, page = excluded.page",
                [(u, t, tag, p, now, now) for u, t, p in items],
            )
            self._db.execute("COMMIT")

    def statuses(self, urls: list[str]) -> dict[str, FetchStatus | None]:
        with self._lock:
            out: dict[str, FetchStatus | None] = {}
            for i in range(0, len(urls), 500):
                chunk = urls[i : i + 500]
                q = ",".join("?" * len(chunk))
                for url, status in self._db.execute(f"SELECT url, status FROM urls WHERE url IN ({q})", chunk):
                    out[url] = status
            return out

    def record_fetch(
        self,
        url: str,
        status: FetchStatus,
        *,
        attempts: int,
        http_status: int | None = None,
        md5: str | None = None,
        size: int | None = None,
        content_type: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Record one fetch outcome. Returns True when ``md5`` is content not seen before."""
        now = _now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE urls SET status=?, md5=?, http_status=?, error=?, attempts=attempts+?, fetched_at=? "
                    "WHERE url=?",
                    (status, md5, http_status, error, attempts, now, url),
                )
                new = False
                if status == "ok" and md5 is not None:
                    title, tag = self._db.execute("SELECT title, tag FROM urls WHERE url=?", (url,)).fetchone()
                    cur = self._db.execute(
                        "INSERT INTO images (md5, url, title, tag, size, content_type, fetched_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(md5) DO NOTHING",
                        (md5, url, title, tag, size, content_type, now),
                    )
                    new = cur.rowcount == 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return new

    def images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, md5, url, title, tag, size, content_type FROM images ORDER BY seq"
            ).fetchall()
        return [ImageRecord(*r) for r in rows]

    def duplicates(self) -> list[DuplicateRecord]:
        """URLs whose bytes equal an image first fetched from another URL."""
        with self._lock:
            rows = self._db.execute(
                "SELECT u.url, u.title, u.md5, i.url, i.title FROM urls u JOIN images i ON u.md5 = i.md5 "
                "WHERE u.status = 'ok' AND u.url != i.url ORDER BY u.first_seen, u.url"
            ).fetchall()
        return [DuplicateRecord(*r) for r in rows]

    def failures(self) -> Iterator[tuple[str, str, int | None, str | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT url, status, http_status, error FROM urls WHERE status IN ('gone', 'failed') ORDER BY url"
            ).fetchall()
        yield from rows

    def counts(self) -> dict[str, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), SUM(status='ok'), SUM(status='gone'), SUM(status='failed'), SUM(status IS NULL) "
                "FROM urls"
            ).fetchone()
            n_images = self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        urls, ok, gone, failed, pending = (int(x or 0) for x in row)
        return {"urls": urls, "ok": ok, "gone": gone, "failed": failed, "pending": pending, "images": n_images}
