"""The ``[source]`` table: where the dataset's images come from (docs/sources.md).

Torch-, browser- and ``datasets``-free, so loading a config stays fast; reading a source is
:mod:`sd_core.ingest.source`.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sd_core.common.config_base import StrictModel
from sd_core.ingest.settings import check_tag

SourceKind = Literal["site", "folder", "dataset", "urls"]

# The caption columns looked for, in this order, when source.caption_column is not set (img2dataset's
# `caption`, diffusers' and kohya's `prompt`/`text`); a folder's metadata.csv is read the same way.
CAPTION_COLUMNS = ("prompt", "caption", "text")
TITLE_COLUMN = "title"

# A Hugging Face Hub dataset id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class SourceError(ValueError):
    """The source cannot be read as configured; the message is one line naming ``source.path`` (or the
    column, or the file) and what is wrong."""


class SourceConfig(StrictModel):
    """Where the images come from. ``site`` (the default) crawls ``crawl.base_url``'s listing of ``crawl.tag``;
    the others read ``path``. Every source feeds the same ledger, dedup, convert, caption and cache rules."""

    kind: SourceKind = Field(
        "site",
        description="site: the listing of crawl.tag on crawl.base_url, walked in headless Chromium; folder: the "
        "image files under path (with a .txt caption beside an image, or a metadata.csv with file_name, prompt "
        "and title); dataset: what datasets.load_dataset reads at path (an imagefolder, a parquet file or folder "
        "with an image column) or a Hub dataset id; urls: a CSV, TSV or parquet list of image URLs at path "
        "(columns as img2dataset takes them: url, caption, title), downloaded like the site's images",
    )
    path: str | None = Field(
        None,
        description="the folder (folder), the dataset's folder, file or Hub id (dataset), or the URL list file "
        "(urls); not used by kind = 'site'",
    )
    name: str | None = Field(
        None,
        description="the dataset's name: the tag column and the start of its file names (<name>_0000001.jpg). "
        "Default: the folder's or file's name, or the Hub id's last part (a site uses crawl.tag)",
    )
    split: str = Field("train", min_length=1, description="dataset: the split read")
    image_column: str | None = Field(
        None, description="dataset: the column holding the images (default: the first Image column, or 'image')")
    caption_column: str | None = Field(
        None,
        description="dataset and urls: the column holding each image's caption (default: the first of "
        f"{', '.join(CAPTION_COLUMNS)} there is). A caption from the source is the item's caption "
        "(captioner = user) unless caption.user_captions = 'ignore'",
    )
    title_column: str | None = Field(
        None,
        description=f"dataset and urls: the column holding each image's title (default: '{TITLE_COLUMN}' when "
        "there is one; a folder's titles are metadata.csv's title or the file's name)",
    )
    url_column: str = Field("url", min_length=1, description="urls: the column holding the image URLs")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_tag(v)

    @model_validator(mode="after")
    def _fits_the_kind(self) -> "SourceConfig":
        # a field counts as given when it differs from its default (a config written back out, e.g. by
        # `emoji-sd config` or for the train stage's processes, holds every field)
        given = {n for n in self.model_fields_set if getattr(self, n) != type(self).model_fields[n].default}
        if self.kind == "site":
            used = sorted(given & {"path", "name", "split", "image_column", "caption_column", "title_column",
                                   "url_column"})
            if used:
                raise ValueError(f"{', '.join('source.' + u for u in used)} not used by kind = 'site' (the site is "
                                 "crawl.base_url, its name crawl.tag)")
            return self
        if not (self.path or "").strip():
            raise ValueError(f"kind = {self.kind!r} needs source.path")
        only = {"split": "dataset", "image_column": "dataset", "url_column": "urls",
                "caption_column": ("dataset", "urls"), "title_column": ("dataset", "urls")}
        for name, kinds in only.items():
            if name in given and self.kind not in (kinds if isinstance(kinds, tuple) else (kinds,)):
                raise ValueError(f"source.{name} is not used by kind = {self.kind!r}")
        return self

    def local_path(self) -> Path:
        """``path`` as a local path (``~`` expanded)."""
        return Path(str(self.path)).expanduser()

    def is_hub_id(self) -> bool:
        """A dataset ``path`` that is no local file or folder and reads as a Hub id (``owner/name``)."""
        return (self.kind == "dataset" and not self.local_path().exists()
                and bool(_HUB_ID.match(str(self.path))) and not str(self.path).startswith("."))

    def dataset_name(self) -> str:
        """``name``, or one made from ``path`` (see the field)."""
        if self.name:
            return self.name
        if self.is_hub_id():
            return str(self.path).split("/")[-1]
        p = self.local_path().resolve()
        stem = p.name if p.is_dir() or not p.suffix else p.stem
        return stem or "emoji"


def relative_id(kind: str, relative: PurePosixPath | str) -> str:
    """An item's id in the ledger: the source's kind and what names the item in it (``folder:cats/smile.png``,
    ``dataset:<md5>``); a URL list's items are their URLs."""
    return f"{kind}:{relative}"
