"""Caption stage: caption each dataset image once per captioner setting, with a per-item cache.

Captions live in an append-only JSON-lines log per cache key (``captions/<digest>.jsonl``),
one line per image md5, flushed and fsynced after every batch: a killed run loses at most
the batch in flight, and a rerun with the same settings makes no model call.

When the captions are in metadata.csv, the stage also writes them beside the images
(``images/<name>.txt``, with ``caption.sidecars``) and the data directory's dataset card (``README.md``).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from tqdm.auto import tqdm

from sd_core.caption.captioners import CaptionResult, build_captioner, caption_batch
from sd_core.caption.config import CaptionConfig
from sd_core.caption.offline import OfflineCaptioner
from sd_core.store.card import write_dataset_card
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text, json_problem, sha256_text, stable_hash, write_if_changed
from sd_core.store.metadata import read_metadata, update_metadata


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
        """Append a batch in one write (atomic among concurrent appenders on a local disk)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_tail()
        data = "".join(json.dumps({"md5": m, **asdict(r)}, ensure_ascii=False) + "\n" for m, r in items)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

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
    sidecars_written: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def stage_key(cfg: CaptionConfig, catalog: Catalog) -> str:
    """Key of the caption stage: the captioner settings and the dataset rows it captions."""
    return stable_hash({"captioner": cfg.cache_digest(), "md5": [r["md5"] for r in read_metadata(catalog)]})


@dataclass(frozen=True)
class CaptionJob:
    md5: str
    file_name: str
    title: str


def plan_captions(cfg: CaptionConfig, catalog: Catalog, *, force: bool = False) -> list[list[CaptionJob]]:
    """Batches of the dataset rows that have no caption under this setting (all of them with ``force``)."""
    digest = cfg.cache_digest()
    key_json = json.dumps(cfg.cache_key(), indent=2, sort_keys=True, default=str) + "\n"
    write_if_changed(catalog.caption_log(digest).with_suffix(".key.json"), key_json)
    done = set() if force else set(CaptionLog(catalog.caption_log(digest)).read())
    todo = [CaptionJob(r["md5"], r["file_name"], r["image_title"]) for r in read_metadata(catalog)
            if r["md5"] not in done]
    return [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]


_CAPTIONERS: dict[str, object] = {}
_CAPTIONERS_LOCK = threading.Lock()


def shared_captioner(cfg: CaptionConfig) -> object:
    """One captioner per setting per process, so a worker loads a model once for all its batches."""
    with _CAPTIONERS_LOCK:
        digest = cfg.cache_digest()
        if digest not in _CAPTIONERS:
            _CAPTIONERS[digest] = build_captioner(cfg)
        return _CAPTIONERS[digest]


def release_captioners() -> None:
    """Drop this process's shared captioners and give their GPU memory back (before encode and train)."""
    from sd_core.common.devices import empty_device_cache

    with _CAPTIONERS_LOCK:
        _CAPTIONERS.clear()
    empty_device_cache()


def caption_jobs(cfg: CaptionConfig, catalog: Catalog, jobs: list[CaptionJob], captioner: object) -> int:
    """Caption one batch and append it to the log; returns the model calls it took."""
    calls_before = int(getattr(captioner, "calls", 0))
    images = [Image.open(catalog.image_path(j.file_name)).convert("RGB") for j in jobs]
    results = caption_batch(captioner, OfflineCaptioner(), images, [j.title for j in jobs])
    CaptionLog(catalog.caption_log(cfg.cache_digest())).append([(j.md5, r) for j, r in zip(jobs, results)])
    return int(getattr(captioner, "calls", 0)) - calls_before


def finish_captions(cfg: CaptionConfig, catalog: Catalog, summary: CaptionSummary) -> CaptionSummary:
    """Write the ``prompt`` column (the final caption), ``captioner`` and ``caption_flagged``."""
    rows = read_metadata(catalog)
    done = CaptionLog(catalog.caption_log(cfg.cache_digest())).read()
    missing = [r["md5"] for r in rows if r["md5"] not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} dataset rows have no caption (first: {missing[0]})")
    columns = {
        r["md5"]: {"prompt": done[r["md5"]].text, "captioner": done[r["md5"]].source,
                   "caption_flagged": done[r["md5"]].flagged}
        for r in rows
    }
    update_metadata(catalog, columns)
    summary.items = len(rows)
    summary.reused = len(rows) - summary.captioned
    summary.flagged = sum(1 for c in columns.values() if c["caption_flagged"])
    if cfg.sidecars:
        summary.sidecars_written = write_caption_sidecars(
            catalog, {r["file_name"]: str(columns[r["md5"]]["prompt"]) for r in rows})
    write_dataset_card(catalog, captioner=captioner_label(cfg))
    return summary


def write_caption_sidecars(catalog: Catalog, captions: dict[str, str]) -> int:
    """Write each caption to the ``.txt`` beside its image (``file_name`` → caption) where it is missing or
    differs from what this stage last wrote there; returns how many files were written.

    What was written is kept as a digest per file in ``state/sidecars.json``, so a run reads one directory
    listing and that index instead of every sidecar; a sidecar not in the index (or with another digest) is
    read and compared first, and written only when it differs. A sidecar edited by hand therefore stays until
    its caption changes (delete it to have it written again)."""
    index = catalog.caption_sidecars_index
    data, _ = json_problem(index)  # missing or damaged: every sidecar is read and compared, as before
    before = data.get("written") if isinstance(data, dict) and isinstance(data.get("written"), dict) else {}
    listed: dict[Path, set[str]] = {}
    now: dict[str, str] = {}
    written = 0
    for file_name, text in captions.items():
        path = catalog.caption_sidecar(file_name)
        digest = now[file_name] = sha256_text(text)[:16]
        if path.parent not in listed:
            listed[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        if before.get(file_name) == digest and path.name in listed[path.parent]:
            continue
        try:
            if path.read_text("utf-8") == text:
                continue
        except FileNotFoundError:
            pass
        atomic_write_text(path, text)
        written += 1
    write_if_changed(index, json.dumps({"written": now}, sort_keys=True, separators=(",", ":")) + "\n")
    return written


def captioner_label(cfg: CaptionConfig) -> str:
    """The captioner as the dataset card names it."""
    if cfg.captioner == "offline":
        return f"emoji-sd's offline template captioner (prompt version `{cfg.prompt_version}`)"
    revision = f" at revision `{cfg.revision}`" if cfg.revision else ""
    return f"`{cfg.model_id}`{revision} ({cfg.captioner}, prompt version `{cfg.prompt_version}`)"


def caption_dataset(
    cfg: CaptionConfig,
    catalog: Catalog,
    *,
    progress: bool = True,
    force: bool = False,
    captioner_factory: Callable[[CaptionConfig], object] = build_captioner,
) -> CaptionSummary:
    """Caption every row of metadata.csv that has no caption under this setting yet (one process),
    saving each batch as it is done, then fill the caption columns of metadata.csv."""
    batches = plan_captions(cfg, catalog, force=force)
    summary = CaptionSummary()
    if batches:
        captioner = captioner_factory(cfg)
        bar = tqdm(total=sum(map(len, batches)), desc="captioning", unit="img", disable=not progress)
        for jobs in batches:
            summary.model_calls += caption_jobs(cfg, catalog, jobs, captioner)
            summary.captioned += len(jobs)
            bar.update(len(jobs))
        bar.close()
    return finish_captions(cfg, catalog, summary)
