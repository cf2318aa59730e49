"""The model that is served: exactly the champion export that ``models/current.json`` names, verified.

:func:`served_model` is the one way to the model that sampling, the sample stage, the report and any app
draw from. It returns the champion run's ``model/`` only after checking every file of it against the
export's manifest (size and SHA-256) and the export's content digest against the one the champion record
holds, which is the digest of the weights the eval stage scored and promoted. There is no fallback: with no
champion, or one that does not verify, it raises one line naming the file and saying what to do.

A damaged record (empty, truncated, garbled, failing its checksum, or missing while
``models/evaluations.csv`` records promotions) is rebuilt with a warning when that is unambiguous: the run
promoted last in ``evaluations.csv`` (not evaluated again since with another verdict) whose export is
complete and whose ``scores/scores.json`` records the scores of that very export (the same digest).
Otherwise it is an error naming ``current.json``. A nightly run so heals a truncated file on its own, and
never serves a run that was not promoted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sd_core.diffusion.export import ModelFolderError, export_complete, model_digest, verify_export
from sd_core.store.catalog import Catalog
from sd_core.store.champion import CHECKSUM, last_promoted, read_champion, read_history_rows, write_champion
from sd_core.store.files import DamagedFileError, json_problem

log = logging.getLogger(__name__)

RecordState = Literal["intact", "unchecked", "rebuilt"]
PROMOTE_HINT = ("restore it, or make a run the champion explicitly with `emoji-sd run --from eval --promote` "
                "(evaluates the latest run and promotes it)")


class ChampionError(RuntimeError):
    """No champion to serve, or one whose export does not verify; the message is one line naming the file."""


@dataclass(frozen=True)
class Champion:
    run: Path  # the champion's run folder
    digest: str | None  # the content digest of the export that was evaluated and promoted
    record: dict[str, Any]
    state: RecordState  # intact (checksum verified), unchecked (written before records had one), rebuilt
    note: str = ""  # what was wrong with the record, when it was rebuilt

    @property
    def model(self) -> Path:
        return self.run / "model"


def _rebuilt_record(catalog: Catalog, why: str) -> dict[str, Any]:
    """The champion record as ``evaluations.csv`` and the exports on disk say it was; DamagedFileError naming
    ``current.json`` when they do not say it unambiguously."""
    path = catalog.current_json

    def fail(reason: str) -> DamagedFileError:
        return DamagedFileError(path, why, f"it cannot be rebuilt ({reason}); {PROMOTE_HINT}")

    try:
        row, reason = last_promoted(catalog)
    except DamagedFileError as e:
        raise fail(str(e)) from None
    if row is None:
        raise fail(reason)
    run = catalog.run_dir(row["run"])
    if not export_complete(run / "model"):
        raise fail(f"{row['run']}, promoted last, has no complete export in {run / 'model'}")
    digest = model_digest(run / "model")
    scores, _ = json_problem(catalog.eval_json(run))
    if not isinstance(scores, dict) or scores.get("digest") != digest:
        raise fail(f"{catalog.eval_json(run)} does not hold the scores of {row['run']}'s export")
    return {"run": row["run"], "digest": digest, "scores": scores.get("scores", {}),
            "reason": f"rebuilt from {catalog.eval_history_csv.name}: {scores.get('reason', 'promoted')}",
            "since": row.get("evaluated_at") or None}


def find_champion(catalog: Catalog, *, repair: bool = True) -> Champion | None:
    """The champion as ``models/current.json`` names it, or None when no run was promoted yet (no record and no
    promotion in ``evaluations.csv``). A damaged record is rebuilt (see the module) and, with ``repair``,
    written back with a warning; when it cannot be rebuilt, :class:`DamagedFileError` names it. The export
    itself is not checked here (see :func:`served_model`)."""
    path = catalog.current_json
    try:
        record = read_champion(catalog)
        why = ""
    except DamagedFileError as e:
        record, why = None, e.why
    if record is None and not why:  # no record: nothing promoted yet, unless the history says otherwise
        try:
            promoted = any(r.get("status") == "promoted" for r in read_history_rows(catalog))
        except DamagedFileError as e:  # without either file, which run was promoted cannot be told
            raise DamagedFileError(e.path, e.why, f"{path.name} is missing too; {PROMOTE_HINT}") from None
        if not promoted:
            return None
        why = f"it is missing, although {catalog.eval_history_csv.name} records promoted runs"
    if record is not None:
        return Champion(catalog.run_dir(record["run"]), record.get("digest"), record,
                        "intact" if CHECKSUM in record else "unchecked")
    rebuilt = _rebuilt_record(catalog, why)
    if repair:
        rebuilt = write_champion(catalog, **rebuilt)
        log.warning("%s was damaged (%s); rebuilt from %s and the exports' checksums: the champion is %s",
                    path, why, catalog.eval_history_csv.name, rebuilt["run"])
    return Champion(catalog.run_dir(rebuilt["run"]), rebuilt["digest"], rebuilt, "rebuilt", why)


def champion_run(catalog: Catalog, *, repair: bool = True) -> Path | None:
    """The champion's run folder (None before any run was promoted); see :func:`find_champion`."""
    champ = find_champion(catalog, repair=repair)
    return champ.run if champ is not None else None


def served_model(catalog: Catalog) -> Path:
    """The model folder to serve: the champion's export, after every file of it matched its manifest's size
    and SHA-256 and its content digest matched the one ``models/current.json`` records for it.

    Raises :class:`ChampionError` (no champion yet; its export is missing, damaged or not the one evaluated)
    or :class:`~sd_core.store.files.DamagedFileError` (``current.json`` damaged beyond rebuilding), each one
    line naming the file. Never returns another run's export."""
    path = catalog.current_json
    champ = find_champion(catalog, repair=True)
    if champ is None:
        raise ChampionError(f"no champion in {catalog.root}: {path} does not exist, no run was evaluated and "
                            "promoted yet; run the eval stage (`emoji-sd run --from eval`)")
    model = champ.model
    if not model.is_dir():
        raise ChampionError(f"{path} names {champ.run.name}, whose export {model} is missing; {PROMOTE_HINT}")
    try:
        verify_export(model)
    except ModelFolderError as e:
        raise ChampionError(f"the champion's export does not verify: {e}") from None
    digest = model_digest(model)
    if champ.digest != digest:
        raise ChampionError(
            f"{model} is not the export {path} names (digest {champ.digest}, on disk {digest}): it was replaced "
            "after it was evaluated; evaluate and promote it again with `emoji-sd run --from eval --force eval "
            "--promote`, or restore it")
    return model


def champion_status(catalog: Catalog) -> tuple[str, str]:
    """``(state, line)`` for ``emoji-sd status``, read-only and cheap (file sizes, not checksums): state is
    ``intact``, ``unchecked`` (a record written before records had a checksum), ``rebuildable`` (damaged,
    the next run rebuilds it), ``damaged`` (it cannot be rebuilt), ``mismatch`` (its export is missing or
    not the one promoted) or ``none`` (nothing promoted yet)."""
    path = catalog.current_json
    try:
        champ = find_champion(catalog, repair=False)
    except DamagedFileError as e:
        return "damaged", str(e)
    if champ is None:
        return "none", f"no champion yet ({path.name} does not exist: no run was evaluated and promoted)"
    what = f"{champ.run.name} (digest {champ.digest}, since {champ.record.get('since')})"
    if not export_complete(champ.model):
        return "mismatch", f"{what}: its export {champ.model} is missing or incomplete"
    if model_digest(champ.model) != champ.digest:
        return "mismatch", f"{what}: {champ.model} is not the export that was promoted"
    if champ.state == "rebuilt":
        return "rebuildable", (f"{what}; {path.name} is damaged ({champ.note}); the next run or `emoji-sd sample` "
                               f"rebuilds it from {catalog.eval_history_csv.name}")
    if champ.state == "unchecked":
        return "unchecked", f"{what}; {path.name} has no checksum (written by an earlier version)"
    return "intact", f"{what}; {path.name} intact (checksum verified)"
