"""A ``datasets`` dataset as a source: what ``datasets.load_dataset`` reads at ``source.path`` (an imagefolder
folder, a parquet file or folder with an image column) or a Hub dataset id, streamed row by row (nothing is
copied into a cache), the images' bytes read as they are stored (never decoded and re-encoded).

An item's id is the md5 of its image's bytes (``dataset:<md5>``): a row whose image changed is a new item and
the old one is de-listed. Its caption is the caption column's value, its title the title column's, else the
image file's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd_core.ingest.local import LocalItem
from sd_core.ingest.membership import clean_caption_text
from sd_core.ingest.source_config import CAPTION_COLUMNS, TITLE_COLUMN, SourceConfig, SourceError, relative_id
from sd_core.store.files import md5_bytes

EXTRA = "pip install 'emoji-sd[datasets]'"
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class MissingDatasetsPackage(RuntimeError):
    """``source.kind = 'dataset'`` (or a parquet URL list) without the ``datasets`` extra installed."""


def require(module: str, what: str) -> Any:
    """Import ``module`` of the ``datasets`` extra, or one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDatasetsPackage(f"{what} needs the package {module.split('.')[0]}: {EXTRA}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def check_dataset_path(cfg: SourceConfig) -> None:
    """A local path that exists, or a Hub id; else :class:`SourceError` naming ``source.path``. A local parquet
    file's schema is read (cheap) so that a file that is no parquet is named before anything runs."""
    path = cfg.local_path()
    if path.exists():
        if path.is_file() and path.suffix.lower() not in _BUILDERS:
            raise SourceError(f"source.path = {cfg.path}: a dataset file must be one of "
                              f"{', '.join(sorted(_BUILDERS))} (or give an imagefolder folder)")
        if path.is_file() and path.suffix.lower() == ".parquet":
            pq = require("pyarrow.parquet", "source.kind = 'dataset'")
            try:
                schema = pq.read_schema(path)
            except Exception as e:  # noqa: BLE001 - pyarrow's errors are many: the file is no readable parquet
                raise SourceError(f"source.path = {cfg.path}: unreadable parquet ({_one_line(e)})") from None
            names = list(schema.names)
            if cfg.image_column is not None and cfg.image_column not in names:
                raise SourceError(f"source.path = {cfg.path} has no column source.image_column = "
                                  f"{cfg.image_column!r} (columns: {', '.join(names)})")
            if cfg.image_column is None and not any(_holds_images(schema.field(n).type) for n in names):
                raise SourceError(f"source.path = {cfg.path} has no image column (columns: {', '.join(names)}); "
                                  "set source.image_column")
        return
    if not cfg.is_hub_id():
        raise SourceError(f"source.path = {cfg.path}: no such file or folder, and not a Hub dataset id")


def _holds_images(arrow_type: Any) -> bool:
    """An arrow column that can hold images: raw bytes, or a struct with a ``bytes`` field (``datasets``' Image)."""
    import pyarrow as pa

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return True
    return pa.types.is_struct(arrow_type) and any(arrow_type.field(i).name == "bytes"
                                                  for i in range(arrow_type.num_fields))


def _load(cfg: SourceConfig) -> Any:
    datasets = require("datasets", "source.kind = 'dataset'")
    path = cfg.local_path()
    try:
        if path.is_file():
            return datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path), split=cfg.split,
                                         streaming=True)
        if path.is_dir():
            return datasets.load_dataset(str(path), split=cfg.split, streaming=True)
        return datasets.load_dataset(str(cfg.path), split=cfg.split, streaming=True)
    except Exception as e:  # noqa: BLE001 - whatever load_dataset raises, the source cannot be read
        where = "a Hub dataset that could not be loaded" if not path.exists() else "cannot be read as a dataset"
        raise SourceError(f"source.path = {cfg.path}: {where} ({_one_line(e)})") from None


def _image_column(cfg: SourceConfig, features: Any) -> str:
    from datasets import Image, Value

    names = list(features or {})
    if cfg.image_column is not None:
        if features is not None and cfg.image_column not in features:
            raise SourceError(f"source.path = {cfg.path} has no column source.image_column = {cfg.image_column!r} "
                              f"(columns: {', '.join(names)})")
        return cfg.image_column
    found = [n for n in names if isinstance(features[n], Image)]
    if found:
        return found[0]
    if "image" in names and (isinstance(features["image"], Value) and features["image"].dtype in ("binary",
                                                                                                  "large_binary")
                             or isinstance(features["image"], dict) and "bytes" in features["image"]):
        return "image"
    raise SourceError(f"source.path = {cfg.path} has no image column (columns: {', '.join(names) or 'none'}); "
                      "set source.image_column")


def _column(cfg: SourceConfig, features: Any, given: str | None, defaults: tuple[str, ...], field: str) -> str | None:
    names = list(features or {})
    if given is not None:
        if features is not None and given not in features:
            raise SourceError(f"source.path = {cfg.path} has no column source.{field} = {given!r} "
                              f"(columns: {', '.join(names)})")
        return given
    return next((c for c in defaults if c in names), None)


def _image_bytes(value: Any) -> tuple[bytes | None, str]:
    """(the image's bytes, its file name or "") from an undecoded Image value, raw bytes, or None."""
    if value is None:
        return None, ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path") or ""
        if data is None and path:
            from datasets.utils.file_utils import xopen

            with xopen(path, "rb") as f:
                data = f.read()
        return (bytes(data) if data is not None else None), str(path)
    raise SourceError(f"the image column holds {type(value).__name__} values, not images")


def dataset_items(cfg: SourceConfig) -> Iterator[LocalItem]:
    """Every row with an image as a :class:`LocalItem` (see the module); :class:`SourceError` (one line naming
    ``source.path``) when the dataset cannot be loaded or read, or has no image column."""
    check_dataset_path(cfg)
    ds = _load(cfg)
    features = ds.features
    image_col = _image_column(cfg, features)
    caption_col = _column(cfg, features, cfg.caption_column, CAPTION_COLUMNS, "caption_column")
    title_col = _column(cfg, features, cfg.title_column, (TITLE_COLUMN,), "title_column")
    from datasets import Image

    if features is not None and isinstance(features.get(image_col), Image):
        ds = ds.cast_column(image_col, Image(decode=False))
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
            data, name = _image_bytes(row.get(image_col))
        except StopIteration:
            return
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file in the middle of the dataset
            raise SourceError(f"source.path = {cfg.path}: cannot be read as a dataset ({_one_line(e)})") from None
        if data is None:
            continue
        title = str(row.get(title_col) or "").strip() if title_col else ""
        caption = clean_caption_text(row.get(caption_col)) if caption_col else ""
        yield LocalItem(id=relative_id("dataset", md5_bytes(data)), title=title or Path(name).stem,
                        caption=caption, version=None, read=lambda data=data: data)
