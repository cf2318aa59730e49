"""The dataset as the report shows it: counts, and a fixed sample of rows (never every row).

The sample is the ``n`` rows with the lowest md5: an md5 is already a uniform hash of the image's bytes, so
the sample is spread over the whole collection, the same on every run, and as the collection grows a new
image joins it only in place of one it outranks. The page so stays the same size at 50,000 images as at 50.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sd_core.store.catalog import Catalog
from sd_core.store.metadata import read_csv_table, read_metadata


@dataclass(frozen=True)
class DatasetView:
    images: int
    captioned: int
    flagged: int
    by_captioner: dict[str, int]
    tags: dict[str, int]
    sources: dict[str, int]  # scheme://host of the image URLs, by number of images
    duplicates: int
    quarantined: int
    quarantine_reasons: dict[str, int]
    sample: list[dict[str, str]] = field(default_factory=list)  # the rows shown, in md5 order


def _host(url: str) -> str:
    parts = urlsplit(url or "")
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def dataset_view(catalog: Catalog, n: int = 24, rows: list[dict[str, str]] | None = None) -> DatasetView:
    """Counts over metadata.csv (``rows``: its rows, when read already), duplicates.csv and the quarantine
    list, and the fixed sample of ``n`` rows."""
    rows = read_metadata(catalog) if rows is None else rows
    quarantine = read_csv_table(catalog.quarantine_csv)
    return DatasetView(
        images=len(rows),
        captioned=sum(1 for r in rows if r.get("prompt")),
        flagged=sum(1 for r in rows if r.get("caption_flagged") == "True"),
        by_captioner=dict(Counter(r.get("captioner") or "none yet" for r in rows).most_common()),
        tags=dict(Counter(r.get("tag") or "(none)" for r in rows).most_common()),
        sources=dict(Counter(h for r in rows if (h := _host(r.get("image_url", "")))).most_common()),
        duplicates=len(read_csv_table(catalog.duplicates_csv)),
        quarantined=len(quarantine),
        quarantine_reasons=dict(Counter((q.get("reason") or "?").split(":")[0] for q in quarantine).most_common()),
        sample=heapq.nsmallest(n, rows, key=lambda r: r.get("md5", "")),
    )
