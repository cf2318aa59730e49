"""docs/configuration.md is what sd_core.config_reference writes from the config models, and every field says
what it does."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import Field

from sd_core.common.config_base import StrictModel
from sd_core.config import PipelineConfig, load_config, preset
from sd_core.config_reference import COMMAND, REFERENCE, default_of, fields, reference, undescribed

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_is_up_to_date():
    written = (ROOT / REFERENCE).read_text("utf-8") if (ROOT / REFERENCE).exists() else ""
    assert written == reference(ROOT), f"{REFERENCE} is out of date: run `{COMMAND}` and commit it"


def test_every_field_has_a_description():
    assert undescribed() == [], "give these fields a description= (it is what docs/configuration.md shows)"


def test_a_field_without_a_description_is_found():
    class Inner(StrictModel):
        said: int = Field(1, description="this one says")
        silent: int = 2

    class Outer(StrictModel):
        inner: Inner | None = Field(None, description="a table that may be null")
        bare: str = ""

    assert undescribed(Outer) == ["inner.silent", "bare"]


def test_every_field_and_table_is_in_the_reference():
    text = reference(ROOT)
    for entry in fields():  # a field's line, or a table's heading
        assert f"- **`{entry.name}`** (" in text or f"`[{entry.name}]`" in text, entry.name
    for section in ("source", "crawl", "convert", "caption", "vae", "encode", "encode.vae", "encode.text", "train",
                    "train.model", "train.model.unet", "train.model.lora", "train.schedule", "eval",
                    "eval.promote_if", "sample"):
        assert f"`[{section}]`" in text, section


def test_a_line_shows_type_bounds_allowed_values_and_default():
    text = reference(ROOT)
    assert "- **`crawl.download_workers`** (integer, ≥ 1, ≤ 64; default `8`): image downloads in parallel" in text
    assert "- **`caption.captioner`** (`\"qwen\"` | `\"offline\"`; default `\"qwen\"`): qwen: " in text
    assert "- **`train.sample_every`** (integer or null, ≥ 1; default unset): " in text
    assert "- **`crawl.full_walk_every`** (duration (seconds, or ISO 8601 such as \"P7D\"); default `\"P7D\"`)" in text


def test_the_defaults_shown_are_the_models_and_read_back():
    """Each default in the reference, written into a TOML file as shown, loads to the same config as no file."""
    lines = []
    unset = [e.name + "." for e in fields() if e.info.get_default() is None]  # tables unset by default (lora)
    for entry in fields():
        default = entry.info.get_default(call_default_factory=True)
        if default is None or isinstance(default, StrictModel) or entry.name.startswith(tuple(unset)):
            continue
        line = next(x for x in reference(ROOT).splitlines() if x.startswith(f"- **`{entry.name}`**"))
        shown = line.split("; default `", 1)[1].split("`): ", 1)[0]
        table, _, name = entry.name.rpartition(".")
        lines.append((table, f"{name} = {shown}"))
    toml = ""
    for table in dict.fromkeys(t for t, _ in lines):
        toml += (f"[{table}]\n" if table else "") + "".join(f"{x}\n" for t, x in lines if t == table)
    assert PipelineConfig.model_validate(tomllib.loads(toml)) == PipelineConfig()


def test_presets_are_listed_with_what_they_set():
    text = reference(ROOT)
    presets = text.split("## Presets", 1)[1]
    for name in ("`demo` (built in)", "`configs/demo-gpu.toml`", "`configs/finetune-sd14.toml`",
                 "`configs/lora-sd14.toml`", "`configs/scratch-gpu.toml`"):
        assert f"### {name}" in presets
    assert "- `caption.captioner = \"offline\"` (default `\"qwen\"`): no VLM weights can be fetched here" in presets
    assert "- `train.model.kind = \"pretrained_attn2_lora\"` (default `\"scratch\"`)" in presets
    for path in sorted((ROOT / "configs").glob("*.toml")):
        load_config(path)  # every shipped config loads
    load_config(base=preset("demo"))


def test_a_preset_naming_no_field_is_refused():
    with pytest.raises(KeyError, match="train.stepz: no such config field"):
        default_of("train.stepz")
    assert default_of("train.model.unet.h_dim") == 256


def test_the_command_checks_and_writes(tmp_path):
    out = tmp_path / "configuration.md"
    cmd = [sys.executable, "-m", "sd_core.config_reference", "--out", str(out)]
    stale = subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert stale.returncode == 1 and f"run `{COMMAND}`" in stale.stderr
    wrote = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert wrote.returncode == 0, wrote.stderr
    assert out.read_text("utf-8") == reference(ROOT)
    assert subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT).returncode == 0
