"""Configuration is typed and strict; every CLI command loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import main
from sd_core.config import ConfigError, PipelineConfig, load_config


def test_defaults_follow_the_discords_layout():
    cfg = PipelineConfig()
    assert cfg.crawl.listing_url(2) == "https://discords.com/emoji-list/tag/Blobs?page=2"
    assert cfg.crawl.item_selector == "div.LQY5mtmC div.aLnnpRah.text-center"
    assert cfg.crawl.image_selector.startswith("div.Mw1EAtrx img")


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data_dir = "x"\n[crawl]\ntag = "Panda"\nmax_pages = 4\n[convert]\njpeg_quality = 90\n')
    cfg = load_config(f, overrides={"crawl.tag": "Cat", "crawl.base_url": None}, sets=["crawl.max_pages=2"])
    assert (cfg.crawl.tag, cfg.crawl.max_pages, cfg.convert.jpeg_quality) == ("Cat", 2, 90)
    assert str(cfg.data_dir) == "x"


@pytest.mark.parametrize(
    "sets, field",
    [
        (["crawl.max_pagez=3"], "crawl.max_pagez: unknown field"),
        (["crawl.max_pages=0"], "crawl.max_pages"),
        (["convert.jpeg_quality=101"], "convert.jpeg_quality"),
        (["crawl.base_url=ftp://x"], "crawl.base_url"),
        (["crawl.listing_path=/list"], "crawl.listing_path"),
        (["convert.background=[300, 0, 0]"], "convert.background"),
        (["stages=1"], "stages: unknown field"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(sets, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(sets=sets)


def test_cli_reports_bad_config_and_missing_browser(tmp_path, capsys):
    assert main(["config", "--set", "crawl.retries=-1"]) == 2
    assert "crawl.retries" in capsys.readouterr().err
    rc = main(["run", "--data-dir", str(tmp_path), "--set", "crawl.chromium_path=/nope/chromium"])
    assert rc == 1
    assert "crawl.chromium_path = /nope/chromium does not exist" in capsys.readouterr().err


def test_config_command_prints_loadable_toml(tmp_path, capsys):
    assert main(["config", "--set", "crawl.tag=Panda"]) == 0
    out = capsys.readouterr().out
    f = tmp_path / "c.toml"
    f.write_text(out)
    assert load_config(f) == load_config(sets=["crawl.tag=Panda"])


def test_every_command_has_help():
    for cmd in ([], ["run"], ["demo"], ["config"], ["sample"], ["status"], ["serve"]):
        r = subprocess.run([sys.executable, "-m", "flows.cli", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: emoji-sd" in r.stdout
