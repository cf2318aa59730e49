"""Typed configuration for every stage, loaded from TOML plus command-line overrides.

Every model forbids unknown fields, so a typo is refused with the field's dotted name
instead of being silently ignored.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from sd_core.caption import CaptionConfig
from sd_core.strict import StrictModel

STAGES: tuple[str, ...] = ("crawl", "convert", "caption")
Stage = Literal["crawl", "convert", "caption"]


class ConfigError(ValueError):
    """A configuration file or override was refused; the message names the field."""


class CrawlConfig(StrictModel):
    """Where to crawl and how politely. Selectors default to the discords.com layout."""

    base_url: str = "https://discords.com"
    tag: str = "Blobs"
    listing_path: str = "/emoji-list/tag/{tag}?page={page}"
    container_selector: str = "div.FS5UE28h.container"
    item_selector: str = "div.LQY5mtmC div.aLnnpRah.text-center"
    image_selector: str = "div.Mw1EAtrx img, img"
    url_attribute: str = "src"
    title_attribute: str = "title"
    start_page: int = Field(1, ge=1)
    max_pages: int | None = Field(None, ge=1)
    page_timeout_s: float = Field(20.0, gt=0, description="longest wait for a page's items to render")
    empty_page_settle_s: float = Field(
        3.0, gt=0, description="a loaded page still without items after this long is the end of the listing"
    )
    page_delay_s: float = Field(0.0, ge=0, description="pause between listing pages (politeness)")
    chromium_path: str = "/usr/bin/chromium"
    chromedriver_path: str = "/usr/bin/chromedriver"
    browser_args: tuple[str, ...] = ()
    user_agent: str | None = None
    download_workers: int = Field(8, ge=1, le=64)
    max_requests_per_second: float = Field(10.0, ge=0, description="per host; 0 disables the limit")
    retries: int = Field(3, ge=0, le=10, description="retries of 5xx, 429 and timeouts; 404 is never retried")
    backoff_s: float = Field(0.5, ge=0)
    timeout_s: float = Field(20.0, gt=0)
    max_image_bytes: int = Field(20_000_000, gt=0)
    retry_gone: bool = Field(False, description="fetch again URLs that answered 404/410 in an earlier run")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("listing_path")
    @classmethod
    def _listing_path(cls, v: str) -> str:
        if "{page}" not in v:
            raise ValueError("must contain {page}")
        return v

    def listing_url(self, page: int) -> str:
        return self.base_url + self.listing_path.format(tag=self.tag, page=page)


class ConvertConfig(StrictModel):
    """Decoding of downloaded bytes into the RGB JPEG dataset."""

    jpeg_quality: int = Field(95, ge=1, le=100)
    background: tuple[int, int, int] = (255, 255, 255)
    max_image_pixels: int = Field(
        16_000_000, gt=0, description="decompression-bomb limit: larger images are quarantined"
    )

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError("each channel must be in 0..255")
        return v


class PipelineConfig(StrictModel):
    data_dir: Path = Path("data")
    crawl: CrawlConfig = CrawlConfig()
    convert: ConvertConfig = ConvertConfig()
    caption: CaptionConfig = CaptionConfig()


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


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> PipelineConfig:
    """Build the config from an optional TOML file, then dotted overrides, then ``KEY=VALUE`` strings."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = tomllib.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
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
    """Render a config as TOML (enough for these flat-ish models) so a run records what it used."""
    data = json.loads(cfg.model_dump_json(exclude_none=True))
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    out = [f"{k} = {json.dumps(v)}" for k, v in scalars.items()]
    for name, table in tables.items():
        out.append(f"\n[{name}]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
    return "\n".join(out) + "\n"
