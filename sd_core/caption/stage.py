"""Caption stage: caption each dataset image once per captioner setting, with a per-item cache.

Captions live in an append-only JSON-lines log per cache key (``captions/<digest>.jsonl``),
one line per image md5, flushed and fsynced after every batch: a killed run loses at most
the batch in flight, and a rerun with the same settings makes no model call.

When the captions are in metadata.csv, the stage also writes them beside the images
(``images/<name>.txt``, with ``caption.sidecars``) and the data directory's dataset card (``README.md``).

Captions a person gave win (``caption.user_captions = "keep"``): a sidecar edited by hand since the stage wrote
it, else the caption the source gives (metadata.csv's ``source_caption``), is the image's caption, with
``captioner = user``; the model captions only the others, and a hand-edited sidecar is never overwritten. The
stage tells its own sidecars from edited ones by a hash of what it wrote into each (``state/sidecars.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from sd_core.ingest.membership import clean_caption_text
from sd_core.store.card import write_dataset_card
from sd_core.store.catalog import Catalog
from sd_core.store.files import (
    atomic_write_text, read_json, sha256_text, stable_hash, write_if_changed,
)
from sd_core.store.metadata import read_metadata, update_metadata

log = logging.getLogger(__name__)

USER = "user"  # metadata.csv's captioner of a caption a person gave (the source's, or a hand-edited sidecar)


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
    user_captions: int = 0  # rows whose caption a person gave (captioner = user)
    sidecars_edited: int = 0  # sidecars edited by hand since the stage wrote them: never overwritten
    prompts_changed: int = 0  # rows whose prompt is not what metadata.csv held before

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def stage_key(cfg: CaptionConfig, catalog: Catalog) -> str:
    """Key of the caption stage: the captioner settings, the dataset rows it captions and the captions their
    source gives them (a hand-edited sidecar is seen when the stage runs, not here)."""
    rows = read_metadata(catalog)
    key: dict[str, object] = {"captioner": cfg.cache_digest(), "md5": [r["md5"] for r in rows]}
    given = [(r["md5"], sha256_text(c)[:16]) for r in rows if (c := clean_caption_text(r.get("source_caption")))]
    if given and cfg.user_captions == "keep":
        key["source_captions"] = given
    return stable_hash(key)


def _bytes_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _text_hash(text: str) -> str:
    return _bytes_hash(text.encode("utf-8"))


def written_by_stage(catalog: Catalog, sidecar: Path, record: dict[str, str]) -> bool:
    """Whether the sidecar file at ``sidecar`` (in images/ or delisted/) holds what the stage last wrote for
    its image (a hand-edited one does not)."""
    written = record.get(catalog.image_file_name(sidecar.with_suffix(".jpg").name))
    try:
        return written is not None and _bytes_hash(sidecar.read_bytes()) == written
    except OSError:
        return False


def read_sidecar_record(catalog: Catalog) -> dict[str, str]:
    """file_name -> hash of what the stage last wrote into that image's sidecar ({} when there is no record; a
    damaged one is named in a warning and read as none)."""
    return read_sidecar_state(catalog)[0]


def read_sidecar_state(catalog: Catalog) -> tuple[dict[str, str], dict[str, list[int]]]:
    """:func:`read_sidecar_record`, and file_name -> the sidecar file's stat (size, mtime, ctime, inode) when it
    last held what the record says: written by the stage then, or read and found so. A sidecar whose stat still
    matches is not read again (a rerun stats each sidecar instead of reading it); one whose stat moved (edited,
    touched, moved, copied) is read, as without a stat."""
    try:
        data = read_json(catalog.sidecar_record)
    except ValueError as e:
        log.warning("%s does not read (%s): sidecars that differ from metadata.csv's prompt count as edited by hand",
                    catalog.sidecar_record, e)
        return {}, {}
    written = data.get("written") if isinstance(data, dict) else None
    stats = data.get("stats") if isinstance(data, dict) else None
    record = {str(k): str(v) for k, v in written.items()} if isinstance(written, dict) else {}
    return record, ({k: v for k, v in stats.items() if k in record and isinstance(v, list)}
                    if isinstance(stats, dict) else {})


def _file_stat(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _holds_record(catalog: Catalog, file_name: str, record: dict[str, str], stats: dict[str, list[int]] | None) -> bool:
    """Whether the sidecar is, by its stat, the file that held what ``record`` says when that stat was taken."""
    known = None if stats is None else stats.get(file_name)
    if known is None or file_name not in record:
        return False
    # catalog.caption_sidecar(file_name), with str operations (pathlib costs more than the stat here)
    path = os.path.join(catalog.root, os.path.splitext(catalog.dataset_file_name(file_name))[0] + ".txt")
    return known == _file_stat(path)


def _sidecar_bytes(catalog: Catalog, file_name: str, contents: dict[str, bytes | None] | None = None) -> bytes | None:
    """What the image's sidecar holds (None: no sidecar, or one that cannot be read, named in a warning); kept in
    ``contents`` so that one run reads each sidecar once."""
    if contents is not None and file_name in contents:
        return contents[file_name]
    path = catalog.caption_sidecar(file_name)
    try:
        data: bytes | None = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as e:
        log.warning("caption sidecar %s cannot be read (%s): not used", path, e)
        data = None
    if contents is not None:
        contents[file_name] = data
    return data


def hand_edited_sidecar(catalog: Catalog, row: dict[str, str], record: dict[str, str],
                        contents: dict[str, bytes | None] | None = None,
                        stats: dict[str, list[int]] | None = None) -> str | None:
    """The caption in ``row``'s sidecar when a person edited it since the stage wrote it (on one line), else
    None: no sidecar, the stage's own, or emptied (the stage writes it again). Without a record of what the
    stage wrote (sidecars written before records were kept), a sidecar that differs from the prompt the stage
    last wrote to metadata.csv counts as edited, since the stage wrote both together. ``stats``
    (:func:`read_sidecar_state`): a sidecar untouched since it held what the record says is not read."""
    if _holds_record(catalog, row["file_name"], record, stats):
        return None
    data = _sidecar_bytes(catalog, row["file_name"], contents)
    if data is None:
        return None
    written = record.get(row["file_name"])
    prompt = (row.get("prompt") or "").encode("utf-8")
    edited = _bytes_hash(data) != written if written is not None else data != prompt
    return (clean_caption_text(data.decode("utf-8", errors="replace")) or None) if edited else None


def user_captions(cfg: CaptionConfig, catalog: Catalog, rows: list[dict[str, str]],
                  record: dict[str, str] | None = None, contents: dict[str, bytes | None] | None = None,
                  stats: dict[str, list[int]] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(md5 -> the caption a person gave, file_name -> the text of each sidecar edited by hand) of ``rows``.
    A hand-edited sidecar wins over the source's caption; with ``user_captions = "ignore"`` the first is empty
    (the edited sidecars are still returned: they are never overwritten). ``contents`` keeps the sidecars read;
    ``stats`` as in :func:`hand_edited_sidecar`."""
    if record is None:
        record, stats = read_sidecar_state(catalog)
    edited: dict[str, str] = {}
    if cfg.sidecars:
        for r in rows:
            if (text := hand_edited_sidecar(catalog, r, record, contents, stats)) is not None:
                edited[r["file_name"]] = text
    if cfg.user_captions == "ignore":
        return {}, edited
    given: dict[str, str] = {}
    for r in rows:
        text = edited.get(r["file_name"]) or clean_caption_text(r.get("source_caption"))
        if text:
            given[r["md5"]] = text
    return given, edited


@dataclass(frozen=True)
class CaptionJob:
    md5: str
    file_name: str
    title: str


def caption_batches(cfg: CaptionConfig, catalog: Catalog, *, force: bool = False) -> list[list[CaptionJob]]:
    """Batches of the dataset rows that have no caption under this setting (all of them with ``force``), but
    those whose caption a person gave (see :func:`user_captions`)."""
    digest = cfg.cache_digest()
    key_json = json.dumps(cfg.cache_key(), indent=2, sort_keys=True, default=str) + "\n"
    write_if_changed(catalog.caption_log(digest).with_suffix(".key.json"), key_json)  # a rerun leaves it as it is
    done = set() if force else set(CaptionLog(catalog.caption_log(digest)).read())
    rows = [r for r in read_metadata(catalog) if r["md5"] not in done]
    given, _ = user_captions(cfg, catalog, rows)
    todo = [CaptionJob(r["md5"], r["file_name"], r["image_title"]) for r in rows if r["md5"] not in given]
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
    """Write the ``prompt`` column (the final caption: the one a person gave, else the model's), ``captioner``
    (``user`` for the first) and ``caption_flagged``; the sidecars but those edited by hand; the dataset card."""
    rows = read_metadata(catalog)
    done = CaptionLog(catalog.caption_log(cfg.cache_digest())).read()
    (record, stats), contents = read_sidecar_state(catalog), {}
    given, edited = user_captions(cfg, catalog, rows, record, contents, stats)
    missing = [r["md5"] for r in rows if r["md5"] not in done and r["md5"] not in given]
    if missing:
        raise RuntimeError(f"{len(missing)} dataset rows have no caption (first: {missing[0]})")
    columns = {
        r["md5"]: ({"prompt": given[r["md5"]], "captioner": USER, "caption_flagged": False} if r["md5"] in given else
                   {"prompt": done[r["md5"]].text, "captioner": done[r["md5"]].source,
                    "caption_flagged": done[r["md5"]].flagged})
        for r in rows
    }
    summary.prompts_changed = sum(1 for r in rows if r.get("prompt") != columns[r["md5"]]["prompt"])
    update_metadata(catalog, columns)
    summary.items = len(rows)
    summary.reused = len(rows) - summary.captioned
    summary.flagged = sum(1 for c in columns.values() if c["caption_flagged"])
    summary.user_captions = len(given)
    summary.sidecars_edited = len(edited)
    if cfg.sidecars:
        summary.sidecars_written = write_caption_sidecars(
            catalog, {r["file_name"]: str(columns[r["md5"]]["prompt"]) for r in rows if r["file_name"] not in edited},
            record, contents, stats)
    write_dataset_card(catalog, captioner=captioner_label(cfg))
    return summary


def write_caption_sidecars(catalog: Catalog, captions: dict[str, str], record: dict[str, str] | None = None,
                           contents: dict[str, bytes | None] | None = None,
                           stats: dict[str, list[int]] | None = None) -> int:
    """Write each caption to the ``.txt`` beside its image (``file_name`` → caption), only where it differs
    from what is there; returns how many files were written. The hash of what each sidecar now holds, and the
    file's stat then, are kept in ``state/sidecars.json`` (written only when they changed), so that a later edit
    by hand is told apart and an untouched sidecar is not read again (``record``, ``stats``: that file as
    :func:`read_sidecar_state` read it; ``contents``: sidecars already read)."""
    if record is None:
        record, stats = read_sidecar_state(catalog)
    stats = {} if stats is None else stats
    written, changed = 0, bool(captions) and not catalog.sidecar_record.exists()
    for file_name, text in captions.items():
        digest = _text_hash(text)
        if record.get(file_name) == digest and _holds_record(catalog, file_name, record, stats):
            continue  # holds this caption, by its stat: not read
        changed = changed or record.get(file_name) != digest
        record[file_name] = digest
        path = catalog.caption_sidecar(file_name)
        if _sidecar_bytes(catalog, file_name, contents) != text.encode("utf-8"):
            atomic_write_text(path, text)
            written += 1
        stat = _file_stat(path)
        changed = changed or stats.get(file_name) != stat
        if stat is not None:
            stats[file_name] = stat
        else:
            stats.pop(file_name, None)
    if changed:
        state = {"written": record, "stats": {k: v for k, v in stats.items() if k in record}}
        atomic_write_text(catalog.sidecar_record, json.dumps(state, sort_keys=True, separators=(",", ":")) + "\n")
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
    batches = caption_batches(cfg, catalog, force=force)
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
