"""The crawl ledger: every image URL ever listed, what fetching it gave, and each unique image by md5.

SQLite in WAL mode: each recorded fetch is its own transaction, so a run killed at any
moment keeps everything fetched before it, and the next run resumes from there.

A fetch is recorded (``record_fetch``) as soon as it finishes; the image it brought is added to
``images`` (``promote``) in the listing's order, oldest first, so sequence numbers and file names do not
depend on which download happened to finish first. A URL fetched but not yet promoted when a run was
killed is promoted by the next run, at its place in the order.

A URL that failed is tried again only after a back-off that doubles with each further failure
(``failures``, ``next_try``); ledgers written before these columns existed are migrated on open.
A refused URL (host policy) is checked again on every run, against the policy of that run.

A ledger that SQLite cannot read (garbled, truncated) raises :class:`LedgerDamaged` naming the file; the
crawl then rebuilds it from the dataset (:mod:`sd_core.ingest.recover`). ``PRAGMA user_version`` says
whether the ledger's images were checked to be images (ledgers written before downloads were checked
may hold an error page recorded as an image; the crawl checks those once, see ``crawl.heal_ledger``).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Literal

FetchStatus = Literal["ok", "gone", "failed", "refused"]
RETRIED_LATER = ("failed",)  # statuses that wait for a back-off
CONTENT_CHECKED = 1  # user_version of a ledger whose images are all known to be images
_DAMAGE = ("SQLITE_NOTADB", "SQLITE_CORRUPT")


class LedgerError(RuntimeError):
    """The crawl ledger cannot be used; the message names the file and what to do."""


class LedgerDamaged(LedgerError):
    """SQLite cannot read the ledger: it is not a database (garbled) or its pages are corrupt (truncated)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"the crawl ledger {path} is damaged ({why}); the next crawl (emoji-sd run) moves it aside and "
            "rebuilds it from metadata.csv, or restore it from a backup"
        )
        self.path, self.why = path, why

_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url          TEXT PRIMARY KEY,
    title        TEXT NOT NULL,
    tag          TEXT NOT NULL,
    page         INTEGER,
    status       TEXT,             -- ok | gone (404/410) | failed | refused (host policy) | NULL (not fetched)
    md5          TEXT,
    http_status  INTEGER,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    first_seen   TEXT NOT NULL,
    last_seen    TEXT NOT NULL,
    fetched_at   TEXT,
    size         INTEGER,          -- of the body fetched (status ok)
    content_type TEXT,
    failures     INTEGER NOT NULL DEFAULT 0,  -- failed in a row
    next_try     TEXT,             -- a failed URL is not fetched again before this (UTC)
    version      TEXT              -- a local source's item as it was read (folder: size and mtime); NULL for URLs
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

# Columns added after the first release: (name, declaration) added to an older ledger on open.
_ADDED_COLUMNS = (
    ("size", "INTEGER"),
    ("content_type", "TEXT"),
    ("failures", "INTEGER NOT NULL DEFAULT 0"),
    ("next_try", "TEXT"),
    ("version", "TEXT"),
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class UrlState:
    status: FetchStatus | None
    failures: int
    next_try: datetime | None
    version: str | None = None  # what a local source's item was when it was read (see Ledger.record_fetch)
    md5: str | None = None  # of the bytes it gave when fetched fine

    def due(self, now: datetime) -> bool:
        """A failed URL whose back-off has passed (or that has none)."""
        return self.next_try is None or self.next_try <= now


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
        path = self.path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        except sqlite3.Error as e:
            raise LedgerError(f"the crawl ledger {path} cannot be opened: {e}") from e
        try:
            new = self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if not new:
                problems = [r[0] for r in self._db.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise LedgerDamaged(path, "; ".join(problems)[:200])
            self._db.executescript(_SCHEMA)
            self._migrate()
            if new:
                self._db.execute(f"PRAGMA user_version = {CONTENT_CHECKED}")
        except sqlite3.DatabaseError as e:
            self._db.close()
            if e.sqlite_errorname in _DAMAGE:
                raise LedgerDamaged(path, str(e)) from e
            raise LedgerError(f"the crawl ledger {path} cannot be used: {e}") from e
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self._lock:
            have = {row[1] for row in self._db.execute("PRAGMA table_info(urls)")}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE urls ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def content_checked(self) -> bool:
        """Whether every image in the ledger is known to be an image (see the module's docstring)."""
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0]) >= CONTENT_CHECKED

    def mark_content_checked(self) -> None:
        with self._lock:
            self._db.execute(f"PRAGMA user_version = {CONTENT_CHECKED}")

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note_listed(self, items: list[tuple[str, str, int]], tag: str, *, seen: int | None = None) -> None:
        """Record listed (url, title, page) triples; keeps the first title seen for a URL. Only the first
        ``seen`` items (all when None) were read by this walk: their ``last_seen`` and ``page`` are updated; the
        rest (a partial walk's items carried over from the previous listing) are only added when missing, so a
        refresh writes rows for what it read, not for the whole collection."""
        now = _now()
        seen = len(items) if seen is None else seen
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO urls (url, title, tag, page, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(url) DO UPDATE SET last_seen = excluded.last_seen, page = excluded.page",
                [(u, t, tag, p, now, now) for u, t, p in items[:seen]],
            )
            self._db.executemany(
                "INSERT INTO urls (url, title, tag, page, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(url) DO NOTHING",
                [(u, t, tag, p, now, now) for u, t, p in items[seen:]],
            )
            self._db.execute("COMMIT")

    def statuses(self, urls: list[str]) -> dict[str, FetchStatus | None]:
        return {u: st.status for u, st in self.states(urls).items()}

    def states(self, urls: list[str]) -> dict[str, UrlState]:
        with self._lock:
            out: dict[str, UrlState] = {}
            for i in range(0, len(urls), 500):
                chunk = urls[i : i + 500]
                q = ",".join("?" * len(chunk))
                for url, status, failures, next_try, version, md5 in self._db.execute(
                    f"SELECT url, status, failures, next_try, version, md5 FROM urls WHERE url IN ({q})", chunk
                ):
                    when = datetime.fromisoformat(next_try) if next_try else None
                    out[url] = UrlState(status, int(failures or 0), when, version, md5)
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
        backoff_s: float = 0.0,
        backoff_max_s: float = 0.0,
        not_before_s: float = 0.0,
        version: str | None = None,
    ) -> None:
        """Record one fetch outcome (its own transaction). A failed URL waits
        ``backoff_s * 2**(failures - 1)`` seconds (at most ``backoff_max_s``), and at least ``not_before_s``
        (what the server asked for in Retry-After), before its next try. ``version``: what a local source's
        item was when read (a folder's file: its size and mtime), so that it is read again only when it changes."""
        now = datetime.now(timezone.utc)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                failures, next_try = 0, None
                if status in RETRIED_LATER:
                    row = self._db.execute("SELECT failures FROM urls WHERE url=?", (url,)).fetchone()
                    failures = int(row[0] or 0) + 1 if row else 1
                    wait = max(min(backoff_s * 2 ** min(failures - 1, 40), backoff_max_s), not_before_s)
                    next_try = (now + timedelta(seconds=wait)).isoformat(timespec="seconds") if wait > 0 else None
                self._db.execute(
                    "UPDATE urls SET status=?, md5=?, http_status=?, error=?, attempts=attempts+?, fetched_at=?, "
                    "size=?, content_type=?, failures=?, next_try=?, version=? WHERE url=?",
                    (status, md5, http_status, error, attempts, now.isoformat(timespec="seconds"), size,
                     content_type, failures, next_try, version, url),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def next_try(self, urls: list[str]) -> datetime | None:
        """The latest ``next_try`` among ``urls`` (when all of them may be tried again), or None."""
        when = [st.next_try for st in self.states(urls).values() if st.next_try is not None]
        return max(when, default=None)

    def fetched_md5s_of(self, urls: list[str]) -> dict[str, str]:
        """url -> md5 of the bytes each of ``urls`` gave, for those fetched fine (duplicates included)."""
        out: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(urls), 500):
                chunk = urls[i : i + 500]
                q = ",".join("?" * len(chunk))
                out.update(self._db.execute(
                    f"SELECT url, md5 FROM urls WHERE status = 'ok' AND md5 IS NOT NULL AND url IN ({q})", chunk))
        return out

    def image_urls(self) -> dict[str, str]:
        """md5 -> the URL each image was first fetched from."""
        with self._lock:
            return dict(self._db.execute("SELECT md5, url FROM images").fetchall())

    def forget_images(self, reasons: dict[str, str]) -> list[str]:
        """Undo images that are not images (``reasons``: md5 -> why): their rows leave ``images`` (their
        sequence numbers are not reused) and every URL that gave those bytes, the first one and its
        "duplicates", becomes failed and due now, so this run fetches it again. Returns those URLs."""
        return self._mark_failed(reasons, forget=True)

    def retry_duplicates(self, reasons: dict[str, str]) -> list[str]:
        """URLs recorded as duplicates of the images ``reasons`` names (md5 -> why) become failed and due now:
        a duplicate of a body that was quarantined is no evidence of an image. Returns those URLs."""
        return self._mark_failed(reasons, forget=False)

    def _mark_failed(self, reasons: dict[str, str], *, forget: bool) -> list[str]:
        if not reasons:
            return []
        done: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for md5, why in reasons.items():
                    first = self._db.execute("SELECT url FROM images WHERE md5=?", (md5,)).fetchone()
                    if first is None:
                        continue
                    which = "" if forget else " AND url != ?"
                    urls = [r[0] for r in self._db.execute(
                        f"SELECT url FROM urls WHERE md5=? AND status='ok'{which}", (md5, *(() if forget else first)))]
                    self._db.executemany(
                        "UPDATE urls SET status='failed', error=?, md5=NULL, size=NULL, failures=0, next_try=NULL "
                        "WHERE url=?",
                        [(why[:300], u) for u in urls],
                    )
                    if forget:
                        self._db.execute("DELETE FROM images WHERE md5=?", (md5,))
                    done += urls
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return done

    def unpromoted(self) -> list[str]:
        """URLs fetched fine whose content is not in ``images`` yet (a run was stopped before their turn)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT url FROM urls WHERE status = 'ok' AND md5 IS NOT NULL "
                "AND md5 NOT IN (SELECT md5 FROM images) ORDER BY first_seen, url"
            ).fetchall()
        return [r[0] for r in rows]

    def promote(self, url: str) -> bool | None:
        """Add the image fetched from ``url`` to ``images``: True when its content is new, False for a
        duplicate of an image already there, None when ``url`` has no fetched content."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT md5, title, tag, size, content_type, fetched_at FROM urls WHERE url=? AND status='ok'",
                    (url,),
                ).fetchone()
                new = None
                if row is not None and row[0] is not None:
                    md5, title, tag, size, content_type, fetched_at = row
                    cur = self._db.execute(
                        "INSERT INTO images (md5, url, title, tag, size, content_type, fetched_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(md5) DO NOTHING",
                        (md5, url, title, tag, size or 0, content_type, fetched_at or _now()),
                    )
                    new = cur.rowcount == 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return new

    def fetched_md5s(self) -> set[str]:
        """Content the ledger keeps bytes of: every image, and every URL fetched fine that waits for its turn."""
        with self._lock:
            rows = self._db.execute(
                "SELECT md5 FROM images UNION SELECT md5 FROM urls WHERE status = 'ok' AND md5 IS NOT NULL"
            ).fetchall()
        return {r[0] for r in rows}

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
                "SELECT url, status, http_status, error FROM urls WHERE status IN ('gone', 'failed', 'refused') "
                "ORDER BY url"
            ).fetchall()
        yield from rows

    def counts(self) -> dict[str, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), SUM(status='ok'), SUM(status='gone'), SUM(status='failed'), SUM(status IS NULL), "
                "SUM(status='refused') FROM urls"
            ).fetchone()
            n_images = self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        urls, ok, gone, failed, pending, refused = (int(x or 0) for x in row)
        return {"urls": urls, "ok": ok, "gone": gone, "failed": failed, "refused": refused, "pending": pending,
                "images": n_images}
