"""The one place that knows where every artifact lives inside a data directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Catalog:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # dataset (what users and later stages read)
    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_path(self, file_name: str) -> Path:
        return self.images_dir / file_name

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

    def latest_run(self) -> Path | None:
        """The folder of the last completed training run (its ``model/`` is the export)."""
        try:
            pointer = json.loads(self.latest_run_json.read_text("utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        return self.run_dir(pointer["run"]) if isinstance(pointer, dict) and "run" in pointer else None

    def trained_model(self) -> Path | None:
        """The export samples are drawn from (the latest run's ``model/``), when there is one."""
        run = self.latest_run()
        return run / "model" if run is not None and (run / "model").is_dir() else None

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
        return self.state_dir / "stages" / f"{stage}.json"

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
                        self.convert_state),
            "caption": (self.captions_dir,),
            "vae": (self.vae_dir,),
            "encode": (self.latent_store, self.text_store),
            "train": (self.train_dir,),
            "sample": (self.samples_dir,),
        }.get(stage, ())
