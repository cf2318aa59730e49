"""Items of a local source (a folder, a dataset) into the crawl ledger, as the site's downloads go there.

Each item has an id (``folder:cats/smile.png``, ``dataset:<md5>``) that plays the part of a URL: it is listed,
"fetched" (read), recorded with its outcome, and its bytes are stored by md5 in ``raw/``; bytes already stored
under another id are a duplicate. An item is read again only when its ``version`` changed (a folder's file:
its size and modification time), so a second run over a folder that gained files reads only the new ones.
What the run found is saved as the listing (``state/listing.json``): an item no longer there is de-listed
(:mod:`sd_core.ingest.membership`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice

from tqdm.auto import tqdm

from sd_core.ingest.convert import not_an_image
from sd_core.ingest.crawl import END_OF_LISTING, DownloadsFailed, DownloadSummary, Listing, Walk
from sd_core.ingest.recover import open_ledger
from sd_core.ingest.source_config import SourceError
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_bytes, md5_bytes, sweep_temp_files

_CHUNK = 500  # items noted in the ledger per transaction


@dataclass(frozen=True)
class LocalItem:
    """One item of a local source: its id, title and caption (``""``: none), a ``version`` that changes when
    its bytes do (None: never read again once read), and how to read its bytes."""

    id: str
    title: str
    caption: str
    version: str | None
    read: Callable[[], bytes]


def _chunks(items: Iterable[LocalItem], n: int) -> Iterator[list[LocalItem]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def _read(item: LocalItem, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, why they are unusable) in the words a failed download is recorded with."""
    try:
        data = item.read()
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}: {item.id}"[:300]
    if len(data) > max_bytes:
        return None, f"too large: {len(data)} bytes, more than crawl.max_image_bytes = {max_bytes}: {item.id}"
    why = not_an_image(data)
    if why is not None:
        return None, f"{why}: {item.id}"[:300]
    return data, None


def ingest_local(
    items: Iterable[LocalItem], catalog: Catalog, *, kind: str, tag: str, where: str, max_bytes: int,
    force: bool = False, progress: bool = True,
) -> tuple[Listing, DownloadSummary]:
    """Record every item in the ledger, read those new or changed since they were read (all with ``force``),
    store their bytes by md5 and number the new images in the items' order; save the listing.

    Raises :class:`SourceError` when the source holds no item, and :class:`DownloadsFailed` (after recording
    everything) when none of its items is a usable image (a broken file among good ones is only counted).
    """
    sweep_temp_files(catalog.root)
    summary = DownloadSummary()
    failed: Counter[str] = Counter()
    example = ""
    listed: list[tuple[str, str, int]] = []
    captions: dict[str, str] = {}
    ledger, rebuilt = open_ledger(catalog)
    with ledger:
        if rebuilt is not None:
            summary.ledger_rebuilt = rebuilt.line()
        for url in ledger.unpromoted():  # read by a run stopped before it numbered them
            summary.count_promoted(ledger.promote(url))
        bar = tqdm(desc=f"reading {kind}", unit="img", disable=not progress)
        for batch in _chunks(items, _CHUNK):
            ledger.note_listed([(it.id, it.title, 0) for it in batch], tag)
            states = ledger.states([it.id for it in batch])
            for it in batch:
                listed.append((it.id, it.title, 0))
                if it.caption:
                    captions[it.id] = it.caption
                st = states.get(it.id)
                if not force and st is not None and st.status in ("ok", "failed") and st.version == it.version:
                    summary.already_known += 1
                    continue
                data, why = _read(it, max_bytes)
                summary.gets += 1
                if data is None:
                    reason = (why or "error").split(":")[0]
                    failed[reason] += 1
                    example = example or str(why)
                    ledger.record_fetch(it.id, "failed", attempts=1, error=why, version=it.version)
                    continue
                md5 = md5_bytes(data)
                if not catalog.raw_path(md5).exists():
                    atomic_write_bytes(catalog.raw_path(md5), data)
                summary.downloaded += 1
                ledger.record_fetch(it.id, "ok", attempts=1, md5=md5, size=len(data), version=it.version)
                new = ledger.promote(it.id)
                if st is None or st.md5 != md5:  # the same bytes read again (a file touched, put back) count as neither
                    summary.count_promoted(new)
            bar.update(len(batch))
        bar.close()
        if not listed:
            raise SourceError(f"source.path = {where} holds no image")
        summary.listed = len(listed)
        summary.unique_urls = len({i for i, _, _ in listed})
        summary.failed = dict(failed)
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        listing = Listing(tag=tag, pages=1, items=tuple(listed), base_url=f"{kind}:{where}", kind=kind,
                          captions=captions, walk=Walk("full", f"every item of the {kind} is read", 1,
                                                       END_OF_LISTING, None, at), full_walk_at=at)
        listing.save(catalog.listing_json)
        usable = ledger.fetched_md5s_of([i for i, _, _ in listed])
        if not usable:  # a broken file among good ones is counted in `failed`, and the run goes on
            counts = ", ".join(f"{r}: {k}" for r, k in failed.most_common())
            this_run = f"{summary.gets} read this run; {counts}; e.g. {example}" if summary.gets else (
                "each failed in an earlier run and is read again when it changes")
            raise DownloadsFailed(f"{kind} {where}: no item is a usable image ({this_run})", summary)
    return listing, summary
