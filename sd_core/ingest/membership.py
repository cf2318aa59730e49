"""Which of the ledger's images are in the dataset now: those that an item of the source's current listing
gave (``state/listing.json``, whatever the source: a site, a folder, a dataset or a URL list).

The ledger keeps every image it ever got; an image none of whose items (its URL, the URLs that gave the same
bytes, a folder's file) is listed any more is **de-listed**: it leaves metadata.csv, and so training, at the
next convert. Its raw bytes, its convert state and its cached captions and latents stay (until ``emoji-sd gc``
for the caches), so an item listed again comes back without recomputation.

For a site this follows the listing walks (docs/refresh.md): a partial or cut walk keeps the items it did not
reach, so only a complete walk can de-list. A data directory without a listing (written before listings were
saved) de-lists nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sd_core.ingest.ledger import Ledger
from sd_core.store.catalog import Catalog
from sd_core.store.files import read_json

log = logging.getLogger(__name__)


def clean_caption_text(text: object) -> str:
    """A caption as a user wrote it, on one line: blanks and line breaks collapsed, ends trimmed."""
    return " ".join(str(text or "").split())


@dataclass(frozen=True)
class Membership:
    """``listed``: md5s of the images some listed item gave (None: no listing to go by, every image is in);
    ``ids``: the listed items (None likewise); ``captions``: md5 -> the caption the source gives the image."""

    listed: frozenset[str] | None = None
    ids: frozenset[str] | None = None
    captions: dict[str, str] = field(default_factory=dict)

    def __contains__(self, md5: object) -> bool:
        return self.listed is None or md5 in self.listed

    def lists(self, item: str) -> bool:
        return self.ids is None or item in self.ids


def current_membership(catalog: Catalog, ledger: Ledger) -> Membership:
    """What the saved listing says is in the dataset (see the module). A listing that does not read de-lists
    nothing (a warning names it; the next crawl rewrites it)."""
    try:
        data = read_json(catalog.listing_json)
        if data is None:
            return Membership()
        ids = list(dict.fromkeys(str(item[0]) for item in data["items"]))
        captions = {str(k): clean_caption_text(v) for k, v in (data.get("captions") or {}).items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        log.warning("%s does not read (%s): no image is de-listed until the next crawl rewrites it",
                    catalog.listing_json, e)
        return Membership()
    md5_of = ledger.fetched_md5s_of(ids)
    by_md5: dict[str, str] = {}
    if captions:
        # the caption of the item the image was first fetched from, else of the first listed item with one
        first = {md5: url for md5, url in ledger.image_urls().items() if captions.get(url)}
        by_md5 = {md5: captions[url] for md5, url in first.items() if url in md5_of}
        for item in ids:
            md5, text = md5_of.get(item), captions.get(item)
            if md5 is not None and text:
                by_md5.setdefault(md5, text)
    return Membership(frozenset(md5_of.values()), frozenset(ids), by_md5)
