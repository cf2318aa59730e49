"""The library's layering: a module imports only from its own layer or lower ones, and only what trains
imports the trainer. Read from the source (every import, at module level or inside functions).

Lowest first: ``store`` (the data directory: catalog, atomic files, records of what stages did), ``runtime``
(the processes of a run: identity, the reaper, signals, which process runs a stage; it keeps its files
through the store), ``common``, then the stages in pipeline order and what reads their outputs. See
docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import sd_core

ROOT = Path(sd_core.__file__).parent
LAYERS = ["store", "runtime", "common", "demo", "ingest", "caption", "vae", "encode", "diffusion", "training", "sample",
          "eval", "report", "publish", "presets", "config", "config_reference", "status", "app"]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(("sd_core", *parts)).removesuffix(".__init__")] = path
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("sd_core.")}


def layer(module: str) -> str:
    return module.split(".")[1]


def test_every_module_sits_in_a_known_layer() -> None:
    assert {layer(m) for m in modules() if m != "sd_core"} <= set(LAYERS)


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    known = modules()
    upward = []
    for module, path in known.items():
        if module == "sd_core":
            continue
        for target in imports(path):
            if target not in known:
                continue  # a name imported from a module, already counted as the module
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)


def closure(module: str) -> set[str]:
    """Every sd_core module ``module`` imports, directly or through others."""
    known, seen, todo = modules(), set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or m not in known:
            continue
        seen.add(m)
        todo.extend(imports(known[m]))
    return seen - {module}


def test_only_training_imports_the_trainer() -> None:
    users = sorted(m for m, p in modules().items() if "sd_core.training.trainer" in imports(p))
    assert users == ["sd_core.training.stage"]
    for module in ("sd_core.config", "sd_core.sample.stage", "sd_core.diffusion.export", "sd_core.report.page"):
        assert "sd_core.training.trainer" not in closure(module), module


def test_the_store_supervises_no_process() -> None:
    """Processes (identity, signals, the reaper) are the runtime layer's; the store only keeps files."""
    supervising = {"psutil", "signal", "subprocess"}
    found = []
    for module, path in modules().items():
        if not module.startswith("sd_core.store"):
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found += [f"{module} imports {n}" for n in sorted(names & supervising)]
    assert not found, "\n".join(found)
