"""The one place that knows where every artifact lives inside a data directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sd_core.store.files import json_problem

IMAGES = "images"


@dataclass(frozen=True)
class Catalog:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # dataset (what users and later stages read)
    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES

    def image_file_name(self, name: str) -> str:
        """The ``file_name`` metadata.csv holds for the image ``name`` of ``images/``: relative to the csv
        (``images/Blobs_0000001.jpg``), which is how ``datasets``' imagefolder and other tools read it."""
        return f"{IMAGES}/{PurePosixPath(name).name}"

    @staticmethod
    def dataset_file_name(file_name: str) -> str:
        """A metadata ``file_name`` checked and with ``/`` separators: relative to metadata.csv, as ``datasets``'
        imagefolder reads it (a bare name is a file beside metadata.csv). Absolute paths and ``..`` are refused."""
        if file_name and "\\" not in file_name and file_name[0] != "/" and not any(
                p in ("", ".", "..") for p in file_name.split("/")):
            return file_name  # already in that form (every row of a table written today): what follows returns
        path = PurePosixPath(file_name.replace("\\", "/"))
        if not file_name or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"metadata.csv file_name must be a path inside the data directory, got {file_name!r}")
        return str(path)

    def image_path(self, file_name: str) -> Path:
        """Where the image of a metadata.csv ``file_name`` is."""
        return self.root / self.dataset_file_name(file_name)

    def caption_sidecar(self, file_name: str) -> Path:
        """The caption beside an image (``images/Blobs_0000001.txt``), as kohya, SimpleTuner and OneTrainer read it."""
        return self.image_path(file_name).with_suffix(".txt")

    @property
    def delisted_dir(self) -> Path:
        """``delisted/``: the JPEGs and caption sidecars of images their source no longer lists (out of the
        dataset; moved back to ``images/`` when listed again, removed by ``emoji-sd gc``)."""
        return self.root / "delisted"

    def delisted_path(self, file_name: str) -> Path:
        """Where a de-listed image's file (``Blobs_0000001.jpg`` or its ``.txt``) is kept."""
        return self.delisted_dir / PurePosixPath(file_name.replace("\\", "/")).name

    @property
    def sidecar_record(self) -> Path:
        """What the caption stage wrote into each caption sidecar (a hash per file), so that a sidecar edited
        by hand since is told apart from one the pipeline wrote."""
        return self.state_dir / "sidecars.json"

    @property
    def dataset_card(self) -> Path:
        """``README.md``: what the dataset is, where it came from and whose licence its images carry."""
        return self.root / "README.md"

    @property
    def metadata_csv(self) -> Path:
        return self.root / "metadata.csv"

    @property
    def duplicates_csv(self) -> Path:
        return self.root / "duplicates.csv"

    # crawl
    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    def raw_path(self, md5: str) -> Path:
        """Downloaded bytes, content-addressed by their md5."""
        return self.raw_dir / md5[:2] / md5

    @property
    def ledger_db(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def listing_json(self) -> Path:
        return self.state_dir / "listing.json"

    # convert
    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def quarantine_csv(self) -> Path:
        return self.quarantine_dir / "quarantine.csv"

    @property
    def convert_state(self) -> Path:
        return self.state_dir / "convert.json"

    # caption
    def caption_log(self, digest: str) -> Path:
        return self.root / "captions" / f"{digest}.jsonl"

    # vae (the offline default trains one on the data) and encode
    @property
    def vae_dir(self) -> Path:
        return self.root / "models" / "vae"

    @property
    def latent_store(self) -> Path:
        return self.root / "cache" / "latents"

    @property
    def text_store(self) -> Path:
        return self.root / "cache" / "text"

    # train and sample
    @property
    def train_dir(self) -> Path:
        return self.root / "models" / "unet"

    def run_dir(self, name: str) -> Path:
        return self.train_dir / name

    @property
    def latest_run_json(self) -> Path:
        """Names the run the train stage finished last: ``{"run": "run-<key>", "key": ...}``."""
        return self.train_dir / "latest.json"

    def _pointed_run(self, pointer: Path) -> Path | None:
        data, _ = json_problem(pointer)
        return self.run_dir(data["run"]) if isinstance(data, dict) and isinstance(data.get("run"), str) else None

    def latest_run(self) -> Path | None:
        """The folder of the last completed training run (its ``model/`` is the export); None when
        ``latest.json`` is missing or does not read (see :meth:`latest_problem`)."""
        return self._pointed_run(self.latest_run_json)

    def latest_problem(self) -> str | None:
        """Why ``latest.json`` names no run folder on disk although it exists (damaged, or naming a folder that
        is gone); None when it reads, or does not exist (nothing trained yet)."""
        data, why = json_problem(self.latest_run_json)
        if why is not None:
            return why
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("run"), str) or not data["run"].startswith("run-"):
            return "it names no run folder"
        if not self.run_dir(data["run"]).is_dir():
            return f"it names {data['run']}, which is not in {self.train_dir}"
        return None

    @property
    def current_json(self) -> Path:
        """Names the champion: the run whose export sampling, the report and deployments use (written and
        read by :mod:`sd_core.store.champion`; served through :func:`sd_core.diffusion.champion.served_model`)."""
        return self.root / "models" / "current.json"


    @property
    def eval_history_csv(self) -> Path:
        """One row per evaluated run. (Not ``eval_history.csv``: ``datasets``' imagefolder reads a file or
        folder named ``eval…``, ``train…`` or ``test…`` as a split of the dataset.)"""
        return self.root / "models" / "evaluations.csv"

    def eval_dir(self, run: Path) -> Path:
        """A run's scores and its grid of held-out prompts (not ``eval/``, for the same reason)."""
        return run / "scores"

    def eval_json(self, run: Path) -> Path:
        return self.eval_dir(run) / "scores.json"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    # bookkeeping
    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def stage_manifest(self, stage: str) -> Path:
        """The record of what ``stage`` did last. In a hidden folder: `datasets`' imagefolder reads a file named
        like a split (``train.json``, ``eval.json``) as that split and would skip metadata.csv, and it skips
        hidden folders."""
        return self.state_dir / ".stages" / f"{stage}.json"

    @property
    def run_file(self) -> Path:
        """The processes the current (or last) run started, so the next run can stop what a killed one left."""
        return self.state_dir / "run.json"

    @property
    def captions_dir(self) -> Path:
        """Where the caption logs (:meth:`caption_log`) and their keys live."""
        return self.root / "captions"

    def stage_paths(self, stage: str) -> tuple[Path, ...]:
        """What ``stage`` writes, for its size on disk (``metadata.csv`` counts for convert, which makes it)."""
        return {
            "crawl": (self.raw_dir, self.ledger_db, self.listing_json),
            "convert": (self.images_dir, self.metadata_csv, self.duplicates_csv, self.quarantine_dir,
                        self.convert_state, self.delisted_dir),
            "caption": (self.captions_dir,),
            "vae": (self.vae_dir,),
            "encode": (self.latent_store, self.text_store),
            "train": (self.train_dir,),
            "sample": (self.samples_dir,),
        }.get(stage, ())
