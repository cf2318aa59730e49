"""``emoji-sd push``: the champion's export, and on request the dataset, uploaded to the Hugging Face Hub.

Each upload is a folder staged beside the data (``state/.push-*``, hard links to the files, so nothing large is
copied) holding exactly what the repository gets: for the model, the export's files as its manifest lists them,
the manifest, the sample grid and a card rendered for the repository (its load snippet names the repo id, its
``datasets`` the dataset's); for the dataset, metadata.csv, the images and their caption files, and the dataset
card. Then ``create_repo`` + ``upload_folder``. A missing token and an unreachable Hub each stop with one line,
the token checked first.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sd_core.diffusion.card import model_card
from sd_core.diffusion.export import CARD, CARD_GRID, CARD_SAMPLES, MANIFEST, verify_export
from sd_core.store.card import MARKER, dataset_card
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_text
from sd_core.store.metadata import read_metadata


class PushError(RuntimeError):
    """The upload cannot happen: no token, the Hub unreachable, or the Hub refused it (one line says which)."""


@dataclass
class Upload:
    """One repository's upload: the staged folder and the paths it holds (relative, POSIX)."""

    repo_id: str
    repo_type: Literal["model", "dataset"]
    folder: Path
    files: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"


def check_repo_id(repo_id: str, flag: str) -> str:
    """``repo_id`` when it is a valid ``USER/NAME``; else one line naming ``flag``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{flag} {repo_id!r} is not a Hub repository id: {str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"{flag} {repo_id!r} is not a Hub repository id: expected USER/NAME")
    return repo_id


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dest)


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def stage_model(catalog: Catalog, export: Path, staging: Path, *, repo_id: str,
                dataset_repo_id: str | None = None) -> Upload:
    """Stage the export at ``export`` (verified against its checksums first) with a card for ``repo_id``."""
    manifest = verify_export(export)
    folder = staging / "model"
    names = [MANIFEST, *manifest.get("files", {}), *(n for n in (CARD_GRID, CARD_SAMPLES) if (export / n).is_file())]
    for name in names:
        _link(export / name, folder / name)
    card = model_card(export, catalog=catalog, repo_id=repo_id, dataset_repo_id=dataset_repo_id)
    atomic_write_text(folder / CARD, str(card))
    return Upload(repo_id, "model", folder, _listing(folder))


def stage_dataset(catalog: Catalog, staging: Path, *, repo_id: str) -> Upload:
    """Stage the dataset: metadata.csv, every row's image and caption file, and the card (rendered for ``repo_id``
    unless the data directory's README.md is one a person wrote, which goes as it is)."""
    rows = read_metadata(catalog)
    if not rows:
        raise FileNotFoundError(f"{catalog.metadata_csv} holds no dataset: run the pipeline first")
    folder = staging / "dataset"
    _link(catalog.metadata_csv, folder / catalog.metadata_csv.name)
    for row in rows:
        image = catalog.image_path(row["file_name"])
        if not image.is_file():
            raise FileNotFoundError(f"{image} (a row of {catalog.metadata_csv}) is missing")
        rel = image.relative_to(catalog.root)
        _link(image, folder / rel)
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            _link(sidecar, folder / rel.with_suffix(".txt"))
    own = catalog.dataset_card.read_text("utf-8") if catalog.dataset_card.is_file() else None
    if own is not None and MARKER not in own:
        _link(catalog.dataset_card, folder / CARD)
    else:
        atomic_write_text(folder / CARD, dataset_card(catalog, repo_id=repo_id))
    return Upload(repo_id, "dataset", folder, _listing(folder))


@contextmanager
def staged(catalog: Catalog, export: Path, *, repo_id: str, dataset_repo_id: str | None = None) -> Iterator[list[Upload]]:
    """The uploads, staged in a hidden folder of the data directory that is removed afterwards."""
    check_repo_id(repo_id, "--repo-id")
    if dataset_repo_id is not None:
        check_repo_id(dataset_repo_id, "--dataset-repo-id")
    staging = catalog.state_dir / f".push-{uuid.uuid4().hex[:8]}"
    for old in catalog.state_dir.glob(".push-*"):  # what a killed push left
        shutil.rmtree(old, ignore_errors=True)
    try:
        uploads = [stage_model(catalog, export, staging, repo_id=repo_id, dataset_repo_id=dataset_repo_id)]
        if dataset_repo_id is not None:
            uploads.append(stage_dataset(catalog, staging, repo_id=dataset_repo_id))
        yield uploads
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def hub_endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` when set (read now, not at import), else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_token() -> str:
    """The Hugging Face token (``HF_TOKEN`` or ``hf auth login``'s file); one line when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with write "
                        "access, https://huggingface.co/settings/tokens)")
    return token


def _network_error(e: BaseException) -> bool:
    """A connection that could not be made (httpx, httpx2 and requests each have their own classes)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {"TransportError", "ConnectionError", "OfflineModeIsEnabled"})


def upload(uploads: list[Upload], *, token: str, private: bool = False, endpoint: str | None = None) -> list[str]:
    """``create_repo`` (kept when it exists) and ``upload_folder`` for each upload; the commit URLs."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = endpoint or hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    done: list[str] = []
    for up in uploads:
        try:
            api.create_repo(up.repo_id, repo_type=up.repo_type, private=private, exist_ok=True)
            info: Any = api.upload_folder(repo_id=up.repo_id, repo_type=up.repo_type, folder_path=str(up.folder),
                                          commit_message=f"emoji-sd push: {len(up.files)} files")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            raise PushError(f"the Hub at {endpoint} refused the {up.repo_type} {up.repo_id} (HTTP {status}): "
                            f"{str(e).splitlines()[0]}") from e
        except Exception as e:  # noqa: BLE001  (the HTTP library's connection errors, whichever it is)
            if _network_error(e):
                raise PushError(f"cannot reach the Hugging Face Hub at {endpoint}: {e}") from e
            raise
        done.append(str(getattr(info, "commit_url", None) or up.url))
    return done


def push(catalog: Catalog, export: Path, *, repo_id: str, dataset_repo_id: str | None = None, private: bool = False,
         dry_run: bool = False, token: str | None = None) -> list[str]:
    """Upload the export at ``export`` (and the dataset when ``dataset_repo_id`` is given); lines to print.
    ``token``: the Hub token (default :func:`hub_token`, checked before anything is staged)."""
    if not dry_run and token is None:
        token = hub_token()
    with staged(catalog, export, repo_id=repo_id, dataset_repo_id=dataset_repo_id) as uploads:
        if dry_run:
            return [f"{up.repo_type} {up.repo_id}: {len(up.files)} files: {', '.join(up.files[:8])}"
                    + (", ..." if len(up.files) > 8 else "") for up in uploads]
        urls = upload(uploads, token=str(token), private=private)
    return [f"{up.repo_type} {up.repo_id}: {url}" for up, url in zip(uploads, urls)]
