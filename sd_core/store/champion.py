"""The champion record, ``models/current.json``: which run's export is served, and its content digest.

It is written atomically with a ``checksum`` field, the SHA-256 of the rest of its content, so a truncated,
garbled or hand-edited record is told from an intact one. Reading it never falls back to another run: a
record that does not read or verify raises :class:`~sd_core.store.files.DamagedFileError`. Whether the
champion can be rebuilt from ``models/evaluations.csv`` and the exports is decided a layer up
(:mod:`sd_core.diffusion.champion`), where exports can be checked.
"""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from typing import Any

from sd_core.store.catalog import Catalog
from sd_core.store.files import DamagedFileError, atomic_write_json, json_checksum, read_state_json

CHECKSUM = "checksum"


def write_champion(catalog: Catalog, *, run: str, digest: str, scores: dict[str, Any], reason: str,
                   since: str | None = None) -> dict[str, Any]:
    """Write ``models/current.json`` naming ``run`` (whose export has content digest ``digest``) as the
    champion, atomically and with its checksum; returns the record."""
    record = {"run": run, "digest": digest, "scores": scores, "reason": reason,
              "since": since or datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record[CHECKSUM] = json_checksum(record, CHECKSUM)
    atomic_write_json(catalog.current_json, record)
    return record


def read_champion(catalog: Catalog) -> dict[str, Any] | None:
    """The champion record, or None when ``models/current.json`` does not exist. A record that is empty,
    truncated, not JSON, lacks the run it names or fails its checksum raises :class:`DamagedFileError`.
    A record written before records had a checksum (no ``checksum`` field) is read as it is."""
    path = catalog.current_json
    data = read_state_json(path)
    if data is None:
        return None
    if not isinstance(data.get("run"), str) or not data["run"]:
        raise DamagedFileError(path, "it names no run")
    if CHECKSUM in data and data[CHECKSUM] != json_checksum(data, CHECKSUM):
        raise DamagedFileError(path, "its content does not match its checksum")
    return data


def read_history_rows(catalog: Catalog) -> list[dict[str, str]]:
    """The rows of ``models/evaluations.csv`` (none when it does not exist); :class:`DamagedFileError` when it
    does not read as a CSV with ``run`` and ``status`` columns."""
    path = catalog.eval_history_csv
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = reader.fieldnames or []
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DamagedFileError(path, f"unreadable: {e}") from None
    if rows and not {"run", "status"} <= set(fields):
        raise DamagedFileError(path, "it has no run and status columns")
    return rows


def last_promoted(catalog: Catalog) -> tuple[dict[str, str] | None, str]:
    """The evaluations.csv row of the run promoted last, or None with the reason it cannot be told: nothing was
    promoted, or that run was evaluated again later with another verdict (its export changed since)."""
    rows = read_history_rows(catalog)
    promoted = [i for i, r in enumerate(rows) if r.get("status") == "promoted"]
    if not promoted:
        return None, f"{catalog.eval_history_csv.name} records no promoted run"
    row = rows[promoted[-1]]
    later = [r for r in rows[promoted[-1] + 1:] if r.get("run") == row["run"] and r.get("status") != "champion"]
    if later:
        return None, (f"{row['run']}, promoted last, was evaluated again afterwards ({later[-1].get('status')}), so "
                      "which of its exports was promoted is unknown")
    return row, ""
