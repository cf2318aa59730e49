"""Typed configuration for every stage, loaded from TOML plus command-line overrides.

Every model forbids unknown fields, so a typo is refused with the field's dotted name
instead of being silently ignored.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, Field, ValidationError, model_validator

from sd_core.caption.config import CaptionConfig
from sd_core.common.config_base import StrictModel
from sd_core.encode.config import EncodeStageConfig
from sd_core.eval.config import EvalConfig
from sd_core.ingest.convert import ConvertConfig
from sd_core.ingest.settings import CrawlConfig
from sd_core.ingest.source_config import SourceConfig
from sd_core.sample.config import SampleConfig
from sd_core.training.config import TrainStageConfig
from sd_core.vae.config import VAETrainConfig

STAGES: tuple[str, ...] = ("crawl", "convert", "caption", "vae", "encode", "train", "eval", "sample")
Stage = Literal["crawl", "convert", "caption", "vae", "encode", "train", "eval", "sample"]


class ConfigError(ValueError):
    """A configuration file or override was refused; the message names the field."""


class PipelineConfig(StrictModel):
    data_dir: Path = Field(Path("data"), description="the data directory: every stage's files, caches, models, "
                           "records and report.html live under it (--data-dir)")
    source: SourceConfig = Field(SourceConfig(), description="what the first stage (still called crawl) reads: "
                                 "the site crawl.base_url lists (the default), a folder, a dataset or a URL list "
                                 "(docs/sources.md)")
    crawl: CrawlConfig = Field(CrawlConfig(), description="the first stage with source.kind = 'site': the listing "
                               "walk and the downloads (a URL list's downloads too); docs/crawling.md, "
                               "docs/refresh.md")
    convert: ConvertConfig = Field(ConvertConfig(), description="the convert stage: images/ and metadata.csv")
    caption: CaptionConfig = Field(CaptionConfig(), description="the caption stage: each image's prompt")
    vae: VAETrainConfig = Field(VAETrainConfig(), description="used only when encode.vae.model_id = 'trained'")
    encode: EncodeStageConfig = Field(EncodeStageConfig(), description="the encode stage")
    train: TrainStageConfig = Field(TrainStageConfig(), description="the train stage (also `emoji-sd train`)")
    eval: EvalConfig = Field(EvalConfig(), description="the eval stage: scores and promotion (docs/evaluation.md)")
    sample: SampleConfig = Field(SampleConfig(), description="the sample stage, which draws from the champion into "
                                 "samples/, and `emoji-sd sample`")

    @model_validator(mode="before")
    @classmethod
    def _one_held_out_minimum(cls, data: Any) -> Any:
        """``eval.min_items`` and ``train.val_min_items`` are one setting (the trainer makes the split the eval
        scores): whichever is given sets the other; both given and different is refused."""
        if not isinstance(data, dict):
            return data
        sections = {"eval": "min_items", "train": "val_min_items"}
        given = {}
        for section, name in sections.items():
            value = data.get(section)
            if isinstance(value, dict) and name in value:
                given[section] = value[name]
            elif isinstance(value, BaseModel) and name in value.model_fields_set:
                given[section] = getattr(value, name)
        if len(set(map(str, given.values()))) > 1:
            raise ValueError(f"eval.min_items ({given['eval']}) and train.val_min_items ({given['train']}) differ: "
                             "they are one setting (set eval.min_items)")
        if not given:
            return data
        value, data = next(iter(given.values())), dict(data)
        for section, name in sections.items():
            current = data.get(section)
            if isinstance(current, BaseModel):
                data[section] = current.model_copy(update={name: value})
            else:
                data[section] = {**(current or {}), name: value}
        return data


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, creating tables on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid configuration:\n  {dotted}: {k} is not a table")
    node[keys[-1]] = value


def _read_toml(path: Path) -> dict[str, Any]:
    """A config file: TOML, or JSON when its name ends in ``.json`` (what the train stage hands the processes
    it launches, since TOML has no null)."""
    if Path(path).suffix == ".json":
        try:
            return json.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    try:
        return tomllib.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(name: str) -> dict[str, Any]:
    """A config preset shipped with the package (``demo``: the embedded offline default)."""
    return tomllib.loads(resources.files("sd_core.presets").joinpath(f"{name}.toml").read_text("utf-8"))


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    *,
    base: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Build the config from ``base`` (a preset), an optional TOML file over it, then dotted
    overrides, then ``KEY=VALUE`` strings."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree = _merge(tree, _read_toml(path))
    for key, value in (overrides or {}).items():
        if value is not None:
            apply_override(tree, key, value)
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        apply_override(tree, key.strip(), _parse_value(raw.strip()))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def config_to_toml(cfg: BaseModel) -> str:
    """Render a config as TOML (``tomli_w``: tables for nested models) so a run can record what it used.
    TOML has no null: fields that are None are left out, and read back as their default (None)."""
    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))
