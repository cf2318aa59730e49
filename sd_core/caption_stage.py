"""Caption stage: caption each dataset image once per captioner setting, with a per-item cache.

Captions live in an append-only JSON-lines log per cache key (``captions/<digest>.jsonl``),
one line per image md5, flushed and fsynced after every batch: a killed run loses at most
the batch in flight, and a rerun with the same settings makes no model call.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from tqdm.auto import tqdm

from sd_core.caption import CaptionConfig, CaptionResult, OfflineCaptioner, build_captioner, caption_batch
from sd_core.catalog import Catalog
from sd_core.convert import read_metadata, update_metadata
from sd_core.fsio import atomic_write_json, stable_hash


class CaptionLog:
    """Captions of one cache key, keyed by image md5, appended batch by batch."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, CaptionResult]:
        out: dict[str, CaptionResult] = {}
        for rec in self._records():
            md5 = rec.pop("md5")
            out[md5] = CaptionResult(**rec)
        return out

    def _records(self) -> Iterator[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if line.endswith("\n"):  # a last line without newline is a batch cut short
                        yield json.loads(line)
        except FileNotFoundError:
            return

    def append(self, items: list[tuple[str, CaptionResult]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_tail()
        with open(self.path, "a", encoding="utf-8") as f:
            for md5, res in items:
                f.write(json.dumps({"md5": md5, **asdict(res)}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drop_partial_tail(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


@dataclass
class CaptionSummary:
    items: int = 0
    captioned: int = 0
    reused: int = 0
    flagged: int = 0
    model_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def stage_key(cfg: CaptionConfig, catalog: Catalog) -> str:
    """Key of the caption stage: the captioner settings and the dataset rows it captions."""
    return stable_hash({"captioner": cfg.cache_digest(), "md5": [r["md5"] for r in read_metadata(catalog)]})


def caption_dataset(
    cfg: CaptionConfig,
    catalog: Catalog,
    *,
    progress: bool = True,
    force: bool = False,
    captioner_factory: Callable[[CaptionConfig], object] = build_captioner,
) -> CaptionSummary:
    """Caption every row of metadata.csv that has no caption under this setting yet, then write
    the ``prompt`` column (the final caption), ``captioner`` and ``caption_flagged``."""
    rows = read_metadata(catalog)
    digest = cfg.cache_digest()
    log = CaptionLog(catalog.caption_log(digest))
    atomic_write_json(catalog.caption_log(digest).with_suffix(".key.json"), cfg.cache_key())
    done = {} if force else log.read()
    todo = [r for r in rows if r["md5"] not in done]
    summary = CaptionSummary(items=len(rows), reused=len(rows) - len(todo))
    if todo:
        captioner = captioner_factory(cfg)
        fallback = OfflineCaptioner()
        bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=not progress)
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            images = [Image.open(catalog.image_path(r["file_name"])).convert("RGB") for r in batch]
            results = caption_batch(captioner, fallback, images, [r["image_title"] for r in batch])
            log.append([(r["md5"], res) for r, res in zip(batch, results)])
            done.update((r["md5"], res) for r, res in zip(batch, results))
            summary.captioned += len(batch)
            bar.update(len(batch))
        bar.close()
        summary.model_calls = int(getattr(captioner, "calls", 0))
    columns = {
        r["md5"]: {
            "prompt": done[r["md5"]].text,
            "captioner": done[r["md5"]].source,
            "caption_flagged": done[r["md5"]].flagged,
        }
        for r in rows
    }
    update_metadata(catalog, columns)
    summary.flagged = sum(1 for c in columns.values() if c["caption_flagged"])
    return summary
