"""The configuration reference, docs/configuration.md, written from the config models themselves.

Every table of :class:`~sd_core.config.PipelineConfig` becomes a section and every field a line with its
type (a ``Literal``'s allowed values, the bounds pydantic checks), its default and its ``description=``;
the shipped presets are listed with what each sets. ``tests/test_config_reference.py`` fails when the file
differs from what this module writes, and when a field has no description.

    python -m sd_core.config_reference            # rewrite docs/configuration.md
    python -m sd_core.config_reference --check    # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tomllib
import types
import typing
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path, PurePath
from typing import Any, Iterator, Literal, Sequence

import annotated_types
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from sd_core.common.config_base import StrictModel
from sd_core.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: configs/ and docs/ sit beside sd_core/
REFERENCE = Path("docs") / "configuration.md"
COMMAND = "python -m sd_core.config_reference"


@dataclass(frozen=True)
class Entry:
    """One field of the tree: its dotted name, its declaration, and the model it belongs to."""

    name: str
    info: FieldInfo
    owner: type[BaseModel]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models a field holds (``X`` and ``X | None`` alike): such a field is a table."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return [a for a in (args or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]


def fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> Iterator[Entry]:
    """Every field of ``model`` and of the tables under it, depth first, in declaration order."""
    for name, info in model.model_fields.items():
        yield Entry(prefix + name, info, model)
        for sub in _models_in(info.annotation):
            yield from fields(sub, f"{prefix}{name}.")


def undescribed(model: type[BaseModel] = PipelineConfig) -> list[str]:
    """Dotted names of the fields without a ``description=``."""
    return [e.name for e in fields(model) if not (e.info.description or "").strip()]


# --- rendering values and types --------------------------------------------------------------------------

def toml_value(value: Any) -> str:
    """``value`` as it is written in a TOML file (or after ``--set``)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, timedelta):
        return json.dumps(TypeAdapter(timedelta).dump_python(value, mode="json"))
    if isinstance(value, (str, PurePath)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", timedelta: "duration (seconds, or ISO "
          "8601 such as \"P7D\")", Path: "path"}


def type_text(annotation: Any) -> str:
    """A field's type in words: ``"a" | "b"`` for a Literal, ``list of string`` for a variable tuple."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f"`{toml_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"table of {type_text(args[0])} to {type_text(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bounds_text(info: FieldInfo) -> str:
    """The constraints pydantic checks on a field, as ``≥ 1, ≤ 64``."""
    out = []
    for m in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                out.append(f"{sign} {toml_value(getattr(m, attr))}")
        if isinstance(m, annotated_types.MultipleOf):
            out.append(f"a multiple of {m.multiple_of}")
        if isinstance(m, annotated_types.MinLen) and m.min_length:
            out.append(f"at least {m.min_length} character{'s' * (m.min_length > 1)}")
        if getattr(m, "pattern", None):
            out.append(f"matching `{m.pattern}`")
    return ", ".join(out)


def _prose(text: str) -> str:
    """One line of prose ending in a full stop, reStructuredText's ``code`` as Markdown's `code`."""
    text = " ".join(text.split()).replace("``", "`")
    return text if text.endswith((".", "!", "?")) else text + "."


def _docstrings(model: type[BaseModel]) -> list[str]:
    """The docstrings of ``model`` and of the public config models it extends (a train table's is the
    trainer's too), most derived first."""
    out = []
    for cls in model.__mro__:
        if cls in (StrictModel, BaseModel) or not (isinstance(cls, type) and issubclass(cls, StrictModel)):
            continue
        doc = cls.__dict__.get("__doc__")
        if doc and not cls.__name__.startswith("_"):
            out.append(_prose(inspect.cleandoc(doc)))
    return out


# --- the document --------------------------------------------------------------------------------------

INTRO = """\
# Configuration reference

<!-- Written by `{command}` from the config models' `description=`s: edit those, not this file.
     tests/test_config_reference.py fails when the two differ. -->

Every setting of a run lives in one typed configuration, `sd_core.config.PipelineConfig`: the tables below, one
per stage. Values are set, each over the one before:

1. the defaults listed here;
2. a **preset** (see [Presets](#presets)): `emoji-sd demo` always starts from the built-in `demo` preset, and
   `emoji-sd sample`, `train`, `status` and `gc` take `--preset demo`;
3. a **TOML file** given with `--config FILE` (a `.json` file is read as JSON), whose tables are the sections
   below:

   ```toml
   data_dir = "data/blobs"

   [crawl]
   tag = "Blobs"
   max_pages = 3

   [train.model.unet]
   h_dim = 128
   ```

4. the command's own flags (`--data-dir`, `--base-url`, `--tag`, `--max-pages`; the flags of `emoji-sd sample`,
   which share the names of `[sample]`);
5. `--set table.field=value`, repeatable: `--set crawl.max_pages=3 --set train.model.kind=pretrained_attn2`. The
   value is read as a TOML value (`3`, `true`, `[0.0, 7.5]`, `"text"`), else as JSON (`null` unsets a field that
   may be null, which a TOML file cannot say), else as a plain string.

An unknown field, or a value out of its bounds, is refused with a message naming the field.
`emoji-sd config --config FILE --set ...` prints the resulting configuration, every field, as TOML.
"""


def _field_line(entry: Entry) -> str:
    info = entry.info
    kind = type_text(info.annotation)
    bounds = bounds_text(info)
    default = info.get_default(call_default_factory=True)
    shown = "unset" if default is None else f"`{toml_value(default)}`"
    kind += f", {bounds}" if bounds else ""
    return f"- **`{entry.name}`** ({kind}; default {shown}): {_prose(info.description or '')}"


def _table_sections(model: type[BaseModel], prefix: str, info: FieldInfo | None, depth: int) -> list[str]:
    """The section of one table: its heading, what it is, its fields, then its tables."""
    lines = [f"{'#' * min(depth, 3)} `[{prefix}]`", ""]
    about = [_prose(info.description)[:1].upper() + _prose(info.description)[1:]] if info and info.description else []
    about += _docstrings(model)
    for paragraph in about:
        lines += [paragraph, ""]
    tables = []
    for name, sub_info in model.model_fields.items():
        subs = _models_in(sub_info.annotation)
        if subs:
            tables.append((name, sub_info, subs[0]))
        else:
            lines.append(_field_line(Entry(f"{prefix}.{name}", sub_info, model)))
    if lines[-1] != "":
        lines.append("")
    for name, sub_info, sub in tables:
        lines += _table_sections(sub, f"{prefix}.{name}", sub_info, depth + 1)
    return lines


def _comments(text: str) -> dict[str, str]:
    """``key = value  # comment`` → {dotted key: comment}, for the lines of a TOML file that carry one."""
    out: dict[str, str] = {}
    table = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            table = stripped.split("]")[0].strip("[ ")
            continue
        if "=" not in stripped or stripped.startswith("#"):
            continue
        for i, ch in enumerate(line):
            if ch != "#":
                continue
            try:
                parsed = tomllib.loads(line[:i])
            except tomllib.TOMLDecodeError:
                continue  # the '#' is inside a string
            if parsed:
                key = next(iter(parsed))
                out[f"{table}.{key}" if table else key] = line[i + 1:].strip()
            break
    return out


def _header(text: str) -> list[str]:
    """A TOML file's leading comment, in order: prose as paragraphs, indented lines (commands, code) as code blocks."""
    blocks: list[tuple[bool, list[str]]] = []  # (is code, lines)
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        code = body.startswith("   ")
        if not blocks or blocks[-1][0] != code:
            blocks.append((code, []))
        blocks[-1][1].append(body.strip())
    out: list[str] = []
    for code, lines in blocks:
        out += (["```", *lines, "```", ""] if code else [" ".join(l for l in lines if l), ""])
    return out


def _flat(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and key != "scores":
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def default_of(dotted: str) -> Any:
    """The default of a dotted field; KeyError naming it when there is no such field."""
    model: type[BaseModel] | None = PipelineConfig
    info = None
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            raise KeyError(f"{dotted}: no such config field")
        info = model.model_fields[part]
        subs = _models_in(info.annotation)
        model = subs[0] if subs else None
    assert info is not None
    return info.get_default(call_default_factory=True)


def _preset_section(title: str, how: str, text: str) -> list[str]:
    tree = tomllib.loads(text)
    notes = _comments(text)
    lines = [f"### {title}", "", how, "", *_header(text)]
    for key, value in _flat(tree):
        default = default_of(key)
        was = "the default" if value == default else "default " + (
            "unset" if default is None else f"`{toml_value(default)}`")
        note = f": {notes[key]}" if key in notes else ""
        lines.append(f"- `{key} = {toml_value(value)}` ({was}){note}")
    return [*lines, ""]


def presets(root: Path | None = ROOT) -> list[tuple[str, str, str]]:
    """(title, how to use it, TOML text) of the built-in presets and of the files in ``root/configs``."""
    out = []
    for item in sorted(resources.files("sd_core.presets").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            name = item.name.removesuffix(".toml")
            how = f"`--preset {name}`" + ("; `emoji-sd demo` always starts from it" if name == "demo" else "")
            out.append((f"`{name}` (built in)", f"{how}. Its file is `sd_core/presets/{item.name}`.",
                        item.read_text("utf-8")))
    folder = (root / "configs") if root is not None else None
    if folder is not None and folder.is_dir():
        for path in sorted(folder.glob("*.toml")):
            out.append((f"`configs/{path.name}`", f"`--config configs/{path.name}`.", path.read_text("utf-8")))
    return out


def reference(root: Path | None = ROOT) -> str:
    """docs/configuration.md: the intro, every table, then the presets."""
    lines = [INTRO.format(command=COMMAND)]
    top = PipelineConfig.model_fields
    leaves = [n for n, i in top.items() if not _models_in(i.annotation)]
    tables = [n for n, i in top.items() if _models_in(i.annotation)]
    lines += ["The tables: " + ", ".join(f"[`[{n}]`](#{n})" for n in tables) + "; then the [presets](#presets).", ""]
    lines += ["## Top level", ""]
    lines += [_field_line(Entry(n, top[n], PipelineConfig)) for n in leaves] + [""]
    for name in tables:
        lines += _table_sections(_models_in(top[name].annotation)[0], name, top[name], 2)
    lines += ["## Presets", "",
              "A preset is a TOML file of settings that differ from the defaults; what follows is each one's own "
              "comment and what it sets. A `--config` file and `--set` go over it.", ""]
    for title, how, text in presets(root):
        lines += _preset_section(title, how, text)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="write the configuration reference")
    parser.add_argument("--out", type=Path, default=ROOT / REFERENCE, help=f"where to write it (default: {REFERENCE})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    if missing := undescribed():
        print(f"fields without a description: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = reference()
    if args.check:
        current = args.out.read_text("utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    from sd_core.store.files import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
