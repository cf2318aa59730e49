"""Ingest: the crawl stage (list a tag's pages in a browser, download each new image URL once) and the
convert stage (downloaded bytes to the RGB JPEG dataset)."""
