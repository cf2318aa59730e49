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


def test_printed_config_loads_back_with_inf_and_escaped_text(tmp_path, capsys):
    """inf (TOML has it, JSON has not), and a tag with quotes, a backslash and a non-ASCII letter."""
    sets = ["crawl.max_retry_after_s=inf", """crawl.tag='Blob "\\ é'"""]
    assert main(["config", *(a for s in sets for a in ("--set", s))]) == 0
    f = tmp_path / "c.toml"
    f.write_text(capsys.readouterr().out)
    loaded = load_config(f)
    assert loaded == load_config(sets=sets)
    assert loaded.crawl.max_retry_after_s == float("inf") and loaded.crawl.tag == 'Blob "\\ é'


def test_every_command_has_help():
    for cmd in ([], ["run"], ["demo"], ["config"], ["sample"], ["status"], ["serve"], ["gc"], ["push"], ["app"]):
        r = subprocess.run([sys.executable, "-m", "flows.cli", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: emoji-sd" in r.stdout


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def bad_paths(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    return {"DIR": str(tmp_path), "FILE": str(a_file), "MISSING": str(tmp_path / "nope.toml"), "MODEL": str(empty)}


@pytest.mark.parametrize("args, code, names", [
    (["config", "--config", "DIR"], 2, "config file DIR is a directory"),
    (["config", "--config", "MISSING"], 2, "config file not found: MISSING"),
    (["run", "--data-dir", "FILE"], 2, "data_dir = FILE is a file"),
    (["demo", "--data-dir", "FILE"], 2, "data_dir = FILE is a file"),
    (["status", "--data-dir", "FILE"], 2, "data_dir = FILE is a file"),
    (["gc", "--data-dir", "FILE"], 2, "data_dir = FILE is a file"),
    (["sample", "--model", "MODEL"], 2, "MODEL is neither an emoji-sd export"),
    (["config", "--set", "crawl.retries=-1"], 2, "invalid configuration: crawl.retries: Input should be"),
    (["config", "--set", "crawl.max_pagez=3", "--set", "convert.jpeg_quality=101"], 2,
     "invalid configuration: crawl.max_pagez: unknown field; convert.jpeg_quality: Input should be"),
    (["config", "--set", "crawl.max_pagez=3"], 2, "crawl.max_pagez: unknown field"),
    (["config", "--set", "train.model.kind=big"], 2, "train.model.kind: Input should be"),
    (["config", "--set", "crawl"], 2, "--set expects KEY=VALUE"),
    (["run", "--until", "nope"], 2, "argument --until: invalid choice: 'nope'"),
    (["demo", "--force", "nope"], 2, "argument --force: invalid choice: 'nope'"),
    (["sample", "--scheduler", "nope"], 2, "argument --scheduler: invalid choice: 'nope'"),
    (["nope"], 2, "argument command: invalid choice: 'nope'"),
    ([], 2, "the following arguments are required: command"),
])
def test_each_user_error_is_one_line_naming_the_file_or_field(args, code, names, bad_paths):
    def fill(s: str) -> str:
        for k, v in bad_paths.items():
            s = s.replace(k, v)
        return s

    r = cli(*(fill(a) for a in args))
    assert r.returncode == code, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert fill(names) in r.stderr


def test_debug_adds_the_traceback(tmp_path):
    for args in (["--debug", "config", "--config", str(tmp_path)], ["config", "--config", str(tmp_path), "--debug"]):
        r = cli(*args)
        assert r.returncode == 2
        assert r.stderr.startswith("Traceback") and r.stderr.splitlines()[-1] == (
            f"emoji-sd: config file {tmp_path} is a directory, not a TOML file")


def test_help_and_argument_errors_do_not_import_torch():
    probe = ("import sys\nfrom flows.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'prefect') if m in sys.modules))")
    for args in ([], ["--help"], ["run", "--help"], ["demo", "--help"], ["sample", "--help"], ["gc", "--help"],
                 ["status", "--help"], ["push", "--help"], ["app", "--help"], ["run", "--until", "nope"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert r.stdout.splitlines()[-1] == "[]", (args, r.stdout[-500:])


def test_config_loads_without_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, sd_core.config; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False"
