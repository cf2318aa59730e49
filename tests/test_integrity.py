"""Issue 22, the model side: what is served is exactly the evaluated and promoted champion, verified by
checksum; continuing training writes a new export that goes through the gate; comparability of held-out
losses comes from content, not paths; damaged state files heal with a warning or fail naming themselves;
gc is crash-safe; status names what it cannot read.

One demo data directory is built by the real pipeline (a champion, then a worse refresh that was rejected)
and every test works on a copy of it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from polling import wait_for
from test_pipeline import FAST, by_stage, config
from tiny_diffusion import one_torch_thread

from flows.cli import main
from sd_core.demo.emoji_art import build_demo_items
from sd_core.demo.site import DemoSite
from sd_core.diffusion.champion import ChampionError, champion_run, champion_status, served_model
from sd_core.diffusion.export import MANIFEST, model_digest
from sd_core.store.catalog import Catalog
from sd_core.store.champion import read_champion
from sd_core.store.files import DamagedFileError, json_checksum
from sd_core.store.records import StageFailed

CHAMPION = ["train.steps=30", "eval.items=6"]  # as tests/test_eval.py: a champion, then a worse refresh
WORSE = ["train.steps=2", "train.seed=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def _threads():
    with one_torch_thread():
        yield


def cli_sets(*sets: str) -> list[str]:
    return [a for s in [*FAST, *sets] for a in ("--set", s)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_harness) -> dict:
    """A data dir with a champion (30 steps) and, latest, a worse run the eval stage rejected."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("integrity") / "data"
    with DemoSite(build_demo_items(40, seed=9), per_page=12) as site:
        first = by_stage(pipeline(config(site, root, *CHAMPION), progress=False))
        worse = by_stage(pipeline(config(site, root, *CHAMPION, *WORSE), start="train", progress=False))
        base_url = site.base_url
    assert first["eval"].summary["decision"] == "promoted" and worse["eval"].summary["decision"] == "rejected"
    cat = Catalog(root)
    return {"root": root, "base_url": base_url, "champion": cat.run_dir(first["train"].summary["run"]).name,
            "rejected": cat.latest_run().name}


def clone(src: Path, dst: Path) -> Path:
    """A copy of a data dir; weights (never changed in place, only replaced) are hard-linked to save disk."""
    def link_weights(a: str, b: str) -> None:
        if a.endswith(".safetensors"):
            os.link(a, b)
        else:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, symlinks=True, copy_function=link_weights)
    (dst / ".emoji-sd.lock").unlink(missing_ok=True)
    return dst


def cfg_at(demo: dict, root: Path, *sets: str):
    from sd_core.config import load_config, preset

    return load_config(base=preset("demo"), sets=[*FAST, *CHAMPION, *sets],
                       overrides={"data_dir": str(root), "crawl.base_url": demo["base_url"]})


def run(demo: dict, root: Path, *sets: str, **kw) -> dict:
    from flows.pipeline import pipeline

    return by_stage(pipeline(cfg_at(demo, root, *sets), progress=False, **kw))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sample(root: Path, out: Path) -> int:
    return main(["sample", "--data-dir", str(root), "--prompt", "Frog emoji", "--n", "1", "--steps", "2",
                 "--out", str(out)])


def drawn_from(out: Path) -> str:
    return json.loads((out.with_suffix("") / "samples.json").read_text())["model"]


# --- failure 1: continuing the champion's run ---------------------------------------------------------


@pytest.mark.slow
def test_continuing_the_champions_run_writes_a_new_export_that_goes_through_the_gate(demo, tmp_path, capsys):
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    champion = cat.run_dir(demo["champion"])
    before, record = files(champion / "model"), cat.current_json.read_text()
    assert served_model(cat) == champion / "model"

    # `emoji-sd train ... --set train.steps=40`: more steps than the champion run had
    assert main(["train", "--data-dir", str(d), "--preset", "demo", "--no-progress",
                 *cli_sets(*CHAMPION, "train.steps=40")]) == 0
    line = capsys.readouterr().out
    longer = cat.latest_run()
    assert longer.name == f"{champion.name}-s40" and f"going on from {champion.name}'s step 30" in line
    assert files(champion / "model") == before and cat.current_json.read_text() == record  # untouched
    from sd_core.training.metrics import read_metrics

    assert [int(r["step"]) for r in read_metrics(longer / "metrics.csv")] == list(range(1, 41))
    assert json.loads((longer / "model" / MANIFEST).read_text())["step"] == 40

    # sampling still draws the champion, not the new unevaluated weights
    out = tmp_path / "grid.png"
    assert sample(d, out) == 0 and drawn_from(out) == str(champion / "model")

    # the full rerun with more steps: the new export is scored and gated against the champion
    again = run(demo, d, "train.steps=40", start="train")
    e = again["eval"].summary
    assert again["train"].status == "reused" and e["run"] == longer.name
    assert e["decision"] in ("promoted", "rejected") and "this run is the champion" not in e["reason"]
    assert champion.name in e["reason"]
    served = served_model(cat)
    assert served == (longer if e["decision"] == "promoted" else champion) / "model"
    assert read_champion(cat)["digest"] == model_digest(served)
    samples = json.loads((cat.samples_dir / "samples_key.json").read_text())
    assert samples["model"] == str(served) and samples["digest"] == model_digest(served)


@pytest.mark.slow
def test_a_champion_export_replaced_in_place_is_never_served_or_called_the_champion(demo, tmp_path, capsys):
    """What an earlier version left: the champion's run continued in place, its export replaced."""
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    champion = cat.run_dir(demo["champion"])
    other = cat.run_dir(demo["rejected"]) / "model"
    shutil.rmtree(champion / "model")
    shutil.copytree(other, champion / "model")  # a complete, valid export: just not the one promoted
    (cat.latest_run_json).write_text(json.dumps({"run": champion.name, "key": "x"}))
    capsys.readouterr()
    assert sample(d, tmp_path / "grid.png") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the export" in err and str(cat.current_json) in err
    with pytest.raises(StageFailed, match="eval failed: .*replaced after it was evaluated") as failed:
        run(demo, d, only="eval")
    assert isinstance(failed.value.__cause__, ChampionError)
    assert champion_status(cat)[0] == "mismatch"


# --- failure 2: a copied data directory -----------------------------------------------------------------


@pytest.mark.slow
def test_a_copied_data_directory_makes_the_same_promotion_decisions(demo, tmp_path):
    a = Path(shutil.copytree(demo["root"], tmp_path / "a", symlinks=True))  # cp -a
    b = Path(shutil.copytree(a, tmp_path / "moved" / "elsewhere" / "b", symlinks=True))
    decisions = {}
    for d in (a, b):
        (d / ".emoji-sd.lock").unlink(missing_ok=True)
        e = run(demo, d, "train.steps=2", "train.seed=2", start="train")["eval"].summary
        assert "not compared" not in e["reason"], e["reason"]
        decisions[d] = (e["decision"], e["held_out_loss"])
        scored = json.loads(Catalog(d).eval_json(Catalog(d).latest_run()).read_text())
        champ = json.loads(Catalog(d).eval_json(Catalog(d).run_dir(demo["champion"])).read_text())
        assert scored["held_out_basis"] == champ["held_out_basis"]
    assert decisions[a] == decisions[b] and decisions[a][0] == "rejected"
    # no exported config holds a path: neither the data dir's nor the machine's
    for d in (demo["root"], a, b):
        for cfg in Path(d, "models", "unet").rglob("*.json"):
            if "model" in cfg.relative_to(d).parts and cfg.name != MANIFEST:
                text = cfg.read_text()
                assert "_name_or_path" not in text and str(tmp_path) not in text and str(demo["root"]) not in text, cfg


def test_held_out_comparability_ignores_where_a_model_was_loaded_from(tmp_path):
    """Two exports of the same weights, their VAE and text encoder loaded from different folders, and one
    as an earlier version wrote it (an absolute ``_name_or_path`` in its VAE config), compare."""
    from tiny_diffusion import tiny_unet_config
    from tiny_models import CLIP_HIDDEN, build_tiny_clip, build_tiny_vae

    from sd_core.diffusion.export import conditioning_digest, write_scratch_export
    from sd_core.diffusion.models import ModelConfig, build_unet
    from sd_core.diffusion.schedulers import ScheduleConfig
    from sd_core.encode.encoders import TextEncoderConfig, VAEConfig
    from sd_core.eval.stage import held_out_basis

    unet = build_unet(ModelConfig(unet=tiny_unet_config(context_dim=CLIP_HIDDEN)), sample_size=8)
    build_tiny_clip(tmp_path / "here" / "clip")
    build_tiny_vae(tmp_path / "here" / "vae", sample_size=64)
    shutil.copytree(tmp_path / "here", tmp_path / "there" / "else")  # the same encoders, moved
    exports = []
    for where in ("here", "there/else"):
        enc = tmp_path / where
        text, vae = TextEncoderConfig(model_id=str(enc / "clip")), VAEConfig(model_id=str(enc / "vae"))
        exports.append(write_scratch_export(enc / "model", unet=unet, vae_cfg=vae, text_cfg=text,
                                            schedule=ScheduleConfig(), manifest={"step": 0}))
    for e in exports:
        assert not [p for p in e.rglob("*.json") if str(tmp_path) in p.read_text()]
    assert conditioning_digest(exports[0]) == conditioning_digest(exports[1])
    assert held_out_basis(exports[0]) == held_out_basis(exports[1])
    old = exports[1] / "vae" / "config.json"
    old.write_text(json.dumps({**json.loads(old.read_text()), "_name_or_path": str(tmp_path / "there" / "vae"),
                               "_diffusers_version": "0.30.0"}))
    assert held_out_basis(exports[0]) == held_out_basis(exports[1])
    other = json.loads(old.read_text())
    old.write_text(json.dumps({**other, "latent_channels": 8}))  # content that matters still counts
    assert conditioning_digest(exports[0]) != conditioning_digest(exports[1])


# --- failure 3: a damaged champion record ------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    """Truncate, garble (bytes that no JSON holds, mid-file) or empty a file, as a crash or a bad disk would."""
    data = path.read_bytes()
    half = len(data) // 2
    new = {"truncate": data[:half], "garble": data[:half] + b"#\x00#" + data[half + 3:], "empty": b""}[how]
    tmp = path.with_name(f"{path.name}.damaged")
    tmp.write_bytes(new)
    os.replace(tmp, path)  # a new file: the copy's hard links to the fixture stay intact


@pytest.mark.slow
def test_a_damaged_champion_record_is_rebuilt_never_a_fallback_to_the_latest_run(demo, tmp_path, caplog, capsys):
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    champion, rejected = cat.run_dir(demo["champion"]), cat.run_dir(demo["rejected"])
    assert cat.latest_run() == rejected
    record = read_champion(cat)

    # truncated: `emoji-sd sample` rebuilds it from evaluations.csv with a warning, and draws the champion
    damage(cat.current_json, "truncate")
    assert champion_status(cat)[0] == "rebuildable"
    out = tmp_path / "grid.png"
    with caplog.at_level(logging.WARNING):
        assert sample(d, out) == 0
    assert drawn_from(out) == str(champion / "model")
    assert any(str(cat.current_json) in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    again = read_champion(cat)
    assert (again["run"], again["digest"]) == (record["run"], record["digest"]) and again["checksum"]
    assert champion_status(cat)[0] == "intact"

    # edited to name the rejected run: its checksum no longer matches, so it is rebuilt, not believed
    edited = {**again, "run": rejected.name, "digest": model_digest(rejected / "model")}
    cat.current_json.write_text(json.dumps(edited))
    assert served_model(cat) == champion / "model" and read_champion(cat)["run"] == champion.name

    # the pipeline too: a truncated record is rebuilt and the samples are the champion's
    damage(cat.current_json, "truncate")
    result = run(demo, d, only="sample")
    samples = json.loads((cat.samples_dir / "samples_key.json").read_text())
    assert result["sample"].status in ("ran", "reused") and samples["digest"] == model_digest(champion / "model")

    # without evaluations.csv it cannot be told which run was promoted: one line naming it, nothing drawn
    damage(cat.current_json, "garble")
    cat.eval_history_csv.unlink()
    grid = (cat.samples_dir / "grid.png").read_bytes()
    capsys.readouterr()
    assert sample(d, tmp_path / "again.png") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{cat.current_json} is damaged" in err and "--promote" in err
    with pytest.raises(StageFailed, match="sample failed: .*current.json is damaged") as failed:
        run(demo, d, only="sample", force=["sample"])
    assert isinstance(failed.value.__cause__, DamagedFileError)
    assert (cat.samples_dir / "grid.png").read_bytes() == grid
    assert main(["status", "--data-dir", str(d), "--preset", "demo", *cli_sets(*CHAMPION)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("champion"))
    assert "damaged" in line and "current.json" in line


# --- state that heals or names itself --------------------------------------------------------------------

DAMAGES = ["truncate", "garble", "empty"]


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_run_plan(demo, tmp_path, how, caplog, capsys):
    """plan.json: rebuilt from the run's checkpoints and settings (warning) when its length is unambiguous,
    else one line naming it and what to set."""
    d = clone(demo["root"], tmp_path / "d")
    plan = Catalog(d).run_dir(demo["champion"]) / "plan.json"
    original = json.loads(plan.read_text())
    damage(plan, how)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--data-dir", str(d), "--preset", "demo", "--no-progress",
                     *cli_sets(*CHAMPION)]) == 0
    assert "train: reused" in capsys.readouterr().out
    assert any(str(plan) in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    healed = json.loads(plan.read_text())
    assert {k: healed[k] for k in ("kind", "steps", "shaping", "items")} == \
        {k: original[k] for k in ("kind", "steps", "shaping", "items")}
    # a length that matches neither train.steps nor train.continue_steps: which plan it was cannot be told
    damage(plan, how)
    assert main(["train", "--data-dir", str(d), "--preset", "demo", "--no-progress",
                 *cli_sets(*CHAMPION, "train.steps=31")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{plan} is damaged" in err and "train.steps=30" in err


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_latest_pointer(demo, tmp_path, how, caplog, capsys):
    """models/unet/latest.json: eval names it; the train stage, finding its run finished, rewrites it."""
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    damage(cat.latest_run_json, how)
    with pytest.raises(StageFailed, match="eval failed: .*latest.json is damaged.*run the train stage") as failed:
        run(demo, d, only="eval")
    assert isinstance(failed.value.__cause__, DamagedFileError)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--data-dir", str(d), "--preset", "demo", "--no-progress",
                     *cli_sets(*CHAMPION)]) == 0
    assert "train: reused" in capsys.readouterr().out
    assert any(str(cat.latest_run_json) in r.getMessage() for r in caplog.records)
    assert cat.latest_run() == cat.run_dir(demo["champion"])
    e = run(demo, d, only="eval")["eval"].summary
    assert e["decision"] == "champion" and e["run"] == demo["champion"]


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_champion_record(demo, tmp_path, how, caplog):
    """models/current.json: rebuilt from evaluations.csv and the exports' checksums (warning)."""
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    damage(cat.current_json, how)
    with caplog.at_level(logging.WARNING):
        assert champion_run(cat) == cat.run_dir(demo["champion"])
    assert any(str(cat.current_json) in r.getMessage() for r in caplog.records)
    record = read_champion(cat)
    assert record["checksum"] == json_checksum(record) and served_model(cat).parent.name == demo["champion"]


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_stage_record(demo, tmp_path, how, caplog, capsys):
    """state/.stages/<stage>.json: status names it; the pipeline goes on (warning); the stage's next run
    rewrites it."""
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    record = cat.stage_manifest("train")
    damage(record, how)
    assert main(["status", "--data-dir", str(d), "--preset", "demo", *cli_sets(*CHAMPION)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("train"))
    assert "stale" in line and f"{record} is damaged" in line
    with caplog.at_level(logging.WARNING):
        results = run(demo, d, only="sample")  # the train stage is not selected: its record is read
    assert results["train"].status == "skipped"
    assert any(str(record) in r.getMessage() for r in caplog.records)
    assert main(["train", "--data-dir", str(d), "--preset", "demo", "--no-progress", *cli_sets(*CHAMPION)]) == 0
    from sd_core.store.records import load_stage

    assert load_stage(cat, "train").status == "reused"


# --- gc ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gc_never_counts_a_half_deleted_run_among_those_it_keeps(demo, tmp_path, capsys):
    """What a gc killed by an earlier version left: a run folder without model/, newest of all. It is removed;
    the intact run is kept as the newest."""
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    champion, intact = cat.run_dir(demo["champion"]), cat.run_dir(demo["rejected"])
    cat.latest_run_json.write_text(json.dumps({"run": champion.name, "key": "k"}))  # the rejected run: unnamed
    half = cat.run_dir("run-00000000deadbeef")
    shutil.copytree(intact / "checkpoints", half / "checkpoints", copy_function=os.link)
    shutil.copy2(intact / "plan.json", half / "plan.json")
    os.utime(half / "plan.json")  # the newest
    gc = ["gc", "--data-dir", str(d), "--preset", "demo", *cli_sets(*CHAMPION), "--keep-runs", "1"]
    assert main(gc) == 0
    out = capsys.readouterr().out
    assert f"{half.relative_to(d)}  (training run without a complete export" in out
    assert f"{intact.relative_to(d)}  (one of the 1 newest)" in out
    assert main([*gc, "--yes"]) == 0
    assert not half.exists() and served_model(cat) == champion / "model" and (intact / "model").is_dir()


@pytest.mark.slow
def test_gc_killed_while_deleting_leaves_no_half_run_and_the_next_gc_finishes(demo, tmp_path, capsys):
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    champion, doomed = cat.run_dir(demo["champion"]), cat.run_dir(demo["rejected"])
    cat.latest_run_json.write_text(json.dumps({"run": champion.name, "key": "k"}))
    bulk = doomed / "bulk"  # enough files that deleting them takes a moment
    bulk.mkdir()
    for i in range(20000):
        (bulk / f"{i:05d}").write_bytes(b"x")
    args = ["gc", "--data-dir", str(d), "--preset", "demo", *cli_sets(*CHAMPION), "--keep-runs", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "--yes"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def aside():
            return [p for p in cat.train_dir.iterdir() if p.name.startswith(".trash-")] or proc.poll() is not None

        wait_for(aside, 300, "gc to rename the run aside", interval=0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the run is whole or gone, never half there; what is left aside is finished by the next gc
    assert not doomed.exists()
    left = [p for p in cat.train_dir.iterdir() if p.name.startswith(".trash-")]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    for p in left:
        assert f"{p.relative_to(d)}  (left by an unfinished removal)" in out
    assert main([*args, "--yes"]) == 0
    assert not [p for p in cat.train_dir.iterdir() if p.name.startswith(".trash-")]
    assert served_model(cat) == champion / "model"


# --- status and errors that name files ----------------------------------------------------------------


@pytest.mark.slow
def test_status_shows_a_killed_first_train_as_interrupted(demo, tmp_path, capsys):
    d = clone(demo["root"], tmp_path / "d")
    cat = Catalog(d)
    cat.stage_manifest("train").unlink()  # as before the first train finished
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--data-dir", str(d), "--preset", "demo",
                             "--no-progress", *cli_sets(*CHAMPION, "train.seed=7", "train.steps=5000")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = cat.stage_manifest("train").with_suffix(".running")
    try:
        wait_for(marker.exists, 300, "the train's running marker")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert main(["status", "--data-dir", str(d), "--preset", "demo", *cli_sets(*CHAMPION)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("train"))
    assert "stale" in line and "interrupted" in line and "never ran" not in line


@pytest.mark.slow
def test_status_of_a_read_only_data_directory_names_what_it_cannot_read(demo, tmp_path):
    d = clone(demo["root"], tmp_path / "d")
    cmd = [sys.executable, "-m", "flows.cli", "status", "--data-dir", str(d), "--preset", "demo",
           *cli_sets(*CHAMPION)]
    if os.geteuid() == 0:  # root writes anywhere: run status without the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make the data directory read-only")
        cmd = ["setpriv", "--bounding-set", "-dac_override", *cmd]
    subprocess.run(["chmod", "-R", "a-w", str(d)], check=True)
    try:
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(d)], check=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(rows) >= {"crawl", "train", "eval", "sample", "champion"}
    for line in rows.values():
        if "cannot read" in line:  # what it could not open is named
            assert str(d) in line, line
    assert "intact" in rows["champion"] and "Traceback" not in done.stderr


WRITE = """
import resource, signal, sys, torch
from pathlib import Path
from sd_core.store.files import atomic_write_bytes
from sd_core.training.checkpoint import _save_tensors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
for path, write in ((sys.argv[1], lambda p: atomic_write_bytes(p, b"x" * 100000)),
                    (sys.argv[2], lambda p: _save_tensors(p, {"w": torch.zeros(100000)}))):
    try:
        write(Path(path))
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
"""


def test_write_errors_name_the_file(tmp_path):
    """A write the file system refuses part-way (here the file-size limit; a full disk fails the same way)
    names the file, from the atomic writer and from the checkpoint writer (safetensors)."""
    a, w = tmp_path / "state.json", tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-c", WRITE, str(a), str(w)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    lines = done.stdout.splitlines()
    assert lines == [f"OSError: [Errno 27] File too large: '{a}'", f"OSError: [Errno 27] File too large: '{w}'"], \
        done.stdout + done.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_a_full_disk_names_the_file(tmp_path):
    from sd_core.store.files import atomic_write_json

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(OSError, match=f"No space left on device: '{mnt / 'current.json'}'"):
            atomic_write_json(mnt / "current.json", {"x": "y" * 200_000})
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
