"""The crawl stage's input side for every source but the site: a folder, a dataset or a URL list
(``[source]``; docs/sources.md). The site is walked and downloaded by :mod:`sd_core.ingest.crawl`.

Every source ends the same way: its items in the crawl ledger (``state/ledger.sqlite``: outcome, md5, and the
image numbered once per unique content), their bytes in ``raw/`` by md5, and its listing in
``state/listing.json``, which says what is in the dataset now (:mod:`sd_core.ingest.membership`). Convert,
caption, the caches and refreshes then work the same whatever the source.
"""

from __future__ import annotations

from sd_core.ingest.crawl import DownloadSummary, Listing, download_new
from sd_core.ingest.settings import CrawlConfig
from sd_core.ingest.source_config import SourceConfig
from sd_core.store.catalog import Catalog


def check_source(cfg: SourceConfig) -> None:
    """What can be told of a source before anything runs (cheaply: no image is read): the folder or file
    exists, a URL list has its URL column, a parquet file reads, the extra a kind needs is installed.
    :class:`~sd_core.ingest.source_config.SourceError` (one line naming ``source.path``) or
    ``MissingDatasetsPackage`` otherwise."""
    if cfg.kind == "folder":
        from sd_core.ingest.folder import check_folder

        check_folder(cfg)
    elif cfg.kind == "urls":
        from sd_core.ingest.url_list import check_url_list

        check_url_list(cfg)
    elif cfg.kind == "dataset":
        from sd_core.ingest.hf_dataset import check_dataset_path, require

        require("datasets", "source.kind = 'dataset'")
        check_dataset_path(cfg)


def ingest_source(
    cfg: SourceConfig, crawl: CrawlConfig, catalog: Catalog, *, progress: bool = True, force: bool = False
) -> tuple[Listing, DownloadSummary]:
    """Bring the ledger and the listing up to date with a folder, a dataset or a URL list (see the module):
    new and changed items are read (a URL list's new URLs downloaded, with ``crawl``'s fetcher settings), the
    others only listed; ``force`` reads (fetches) every item again. Returns the listing saved and what was
    done."""
    if cfg.kind == "site":
        raise ValueError("source.kind = 'site' is crawled by sd_core.ingest.crawl (refresh_listing, download_new)")
    name = cfg.dataset_name()
    if cfg.kind == "urls":
        from sd_core.ingest.url_list import read_url_list

        listing = read_url_list(cfg, tag=name)
        listing.save(catalog.listing_json)
        return listing, download_new(crawl, catalog, listing, progress=progress, force=force)
    from sd_core.ingest.local import ingest_local

    if cfg.kind == "folder":
        from sd_core.ingest.folder import folder_items

        items = folder_items(cfg)
        where = str(cfg.local_path().resolve())
    else:
        from sd_core.ingest.hf_dataset import dataset_items

        items = dataset_items(cfg)
        where = str(cfg.path) if cfg.is_hub_id() else str(cfg.local_path().resolve())
    return ingest_local(items, catalog, kind=cfg.kind, tag=name, where=where, max_bytes=crawl.max_image_bytes,
                        force=force, progress=progress)


def source_summary(cfg: SourceConfig, listing: Listing) -> dict[str, object]:
    """What the crawl stage's record says of the source besides the download counts."""
    return {"source": cfg.kind, "path": str(cfg.path), "name": listing.tag,
            "captions_from_source": len(listing.captions)}
