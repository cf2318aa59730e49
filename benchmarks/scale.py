"""The data stages at scale: crawl, convert, caption and encode at 1,000, 10,000 and 50,000 demo emoji, each
through ``emoji-sd run`` (the CLI a user runs), for a first run, a rerun with nothing new and a refresh after
``--grow`` (1 %) new items, with issue 18's targets printed beside the figures.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--sizes 1000 10000 50000]
        [--grow 0.01] [--work DIR] [--json results.json]
    .venv/bin/python benchmarks/scale.py --summarize results-1k.json results-50k.json   # targets across runs

The site is :func:`demo_site.lazy_demo_site` (images drawn when first requested), served by this process on one
port for the three runs of a size, so a rerun sees the same URLs. The pipeline runs as
``python -m flows.cli run --config <demo preset, tiny VAE> --until encode --no-progress`` in a child process:
the demo preset's offline captioner and packaged MiniLM text encoder, and instead of the trained VAE (the
``vae`` stage, minutes of training) a pretrained-VAE config pointing at a tiny ``AutoencoderKL`` built from
a config and saved (tests/tiny_models.py, 64 px, 8x down, 4 channels; ``encode.vae.flip`` as the preset), so
the vae stage is ``unused`` and encode runs the real VAE code path on a small model.

Per run and stage: ``s`` (how long the stage's ``state/.stages/<stage>.running`` marker existed, polled every
0.1 s: the stage as the CLI ran it, Prefect's task overhead included), ``rss`` (peak memory of the whole
process tree of the run while the stage ran: the CLI, Prefect's temporary server, the convert worker,
chromedriver and Chromium, sampled with psutil every 0.1 s as the sum of each process's PSS, which shares a
page between the processes that map it; the sum of their RSS, which counts Chromium's and torch's shared
pages once per process, is printed beside it), ``disk`` (bytes of the stage's artifacts, ``Catalog.stage_paths``). Per run:
the CLI's wall seconds (``wall``: Python and Prefect start-up included), the tree's peak RSS over the whole
run, report.html's size, the data directory's size, and the seconds of ``emoji-sd status`` and
``emoji-sd gc`` (dry run) run as commands afterwards.

Targets (issue 18), checked at the largest and smallest size measured:
  - a rerun with nothing new at 50,000 items takes at most 2x the same rerun at 1,000 (wall seconds);
  - a refresh's seconds per new item at most 2x the first run's seconds per item (the stages' seconds; the
    command's wall seconds are printed too: they carry ~15 s of start-up that no per-item figure can);
  - peak RSS of the data stages at 50,000 items <= 2 GiB;
  - report.html at 50,000 items <= 5 MB;
  - ``status`` and ``gc`` (dry run) at 50,000 items <= 10 s each.

Results: see docs/scale.md (the command, the machine and its load, before/after figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from _common import ROOT
from demo_site import lazy_demo_site

STAGES = ("crawl", "convert", "caption", "encode")
GiB = 1024 ** 3
MB = 1000 ** 2


@dataclass
class StageFigures:
    seconds: float = 0.0
    record_seconds: float | None = None  # what the stage record says (its own clock)
    status: str = ""
    peak_rss: int = 0  # summed PSS of the tree (see the module's docstring)
    peak_rss_sum: int = 0  # summed RSS: shared pages counted once per process
    disk: int = 0


@dataclass
class RunFigures:
    size: int
    kind: str  # first | rerun | refresh
    new_items: int
    wall: float = 0.0
    peak_rss: int = 0
    peak_rss_data_stages: int = 0  # PSS summed over the tree, the highest sample while a data stage ran
    peak_rss_sum_data_stages: int = 0  # RSS summed over the tree, likewise
    peak_processes: list[str] = field(default_factory=list)
    report_bytes: int = 0
    data_dir_bytes: int = 0
    status_s: float = 0.0
    gc_s: float = 0.0
    image_gets: int = 0
    page_gets: int = 0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the machine's load averages when the run ended
    stages: dict[str, StageFigures] = field(default_factory=dict)

    def stage_seconds(self) -> float:
        return sum(s.seconds for s in self.stages.values())


class TreeSampler(threading.Thread):
    """Samples a process tree's summed PSS and RSS every ``interval`` seconds and attributes it to the stage whose
    running marker exists at that moment (``other`` between stages: start-up, report)."""

    def __init__(self, pid: int, markers: dict[str, Path], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.markers, self.interval = markers, interval
        self.peak: dict[str, int] = {}  # PSS
        self.peak_rss: dict[str, int] = {}
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.overall, self.overall_procs = 0, []
        self._halt = threading.Event()

    def _tree_memory(self) -> tuple[int, int, list[str]]:
        """(summed RSS, summed PSS, each process's name and PSS) of the tree now."""
        rss, pss, names = 0, 0, []
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0, 0, []
        for p in procs:
            try:
                info = p.memory_full_info()  # PSS: /proc/<pid>/smaps_rollup
                rss += info.rss
                pss += info.pss
                names.append(f"{p.name()}:{info.pss // 2**20}MiB")
            except psutil.Error:
                continue
        return rss, pss, names

    def run(self) -> None:
        while not self._halt.is_set():
            now = time.perf_counter()
            stage = next((s for s, m in self.markers.items() if m.exists()), "other")
            if stage != "other":
                self.first_seen.setdefault(stage, now)
                self.last_seen[stage] = now
            rss, pss, names = self._tree_memory()
            self.peak[stage] = max(self.peak.get(stage, 0), pss)
            self.peak_rss[stage] = max(self.peak_rss.get(stage, 0), rss)
            if pss > self.overall:
                self.overall, self.overall_procs = pss, names
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def span(self, stage: str) -> float:
        if stage not in self.first_seen:
            return 0.0
        return self.last_seen[stage] - self.first_seen[stage] + self.interval


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def timed_command(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "ab") as out:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=3600).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {rc}: see {log}")
    return seconds


def build_config(work: Path) -> Path:
    """The demo preset with a tiny pretrained VAE (built from a config and saved) instead of the trained one."""
    from tiny_models import build_tiny_vae

    from sd_core.config import config_to_toml, load_config, preset

    vae = work / "tiny-vae"
    if not (vae / "config.json").exists():
        build_tiny_vae(vae, sample_size=64)
    cfg = load_config(base=preset("demo"), overrides={"encode.vae.model_id": str(vae)})
    path = work / "scale.toml"
    path.write_text(config_to_toml(cfg), "utf-8")
    return path


def measure_run(size: int, kind: str, new_items: int, site, config: Path, data_dir: Path,  # type: ignore[no-untyped-def]
                log: Path) -> RunFigures:
    from sd_core.store.catalog import Catalog
    from sd_core.store.gc import size_of, sizes
    from sd_core.runtime.running import running_marker
    from sd_core.store.records import load_stage

    catalog = Catalog(data_dir)
    figures = RunFigures(size, kind, new_items)
    site.reset_counts()
    cmd = _cli("run", "--config", str(config), "--data-dir", str(data_dir), "--base-url", site.base_url,
               "--tag", site.tag, "--until", "encode", "--no-progress")
    with open(log, "ab") as out:
        out.write(f"\n=== {size} {kind}: {' '.join(cmd)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, {s: running_marker(catalog, s) for s in STAGES})
        sampler.start()
        rc = proc.wait(timeout=4 * 3600)
        figures.wall = time.perf_counter() - start
        sampler.stop()
    if rc != 0:
        raise RuntimeError(f"the {kind} run at {size} items exited {rc}: see {log}")
    figures.load = os.getloadavg()
    figures.image_gets = site.total_image_gets()
    figures.page_gets = site.page_gets
    figures.peak_rss = sampler.overall
    figures.peak_processes = sampler.overall_procs
    figures.peak_rss_data_stages = max((sampler.peak.get(s, 0) for s in STAGES), default=0)
    figures.peak_rss_sum_data_stages = max((sampler.peak_rss.get(s, 0) for s in STAGES), default=0)
    for stage in STAGES:
        record = load_stage(catalog, stage, warn=False)
        figures.stages[stage] = StageFigures(
            seconds=sampler.span(stage), record_seconds=record.seconds if record else None,
            status=record.status if record else "missing", peak_rss=sampler.peak.get(stage, 0),
            peak_rss_sum=sampler.peak_rss.get(stage, 0),
            disk=sizes(catalog.stage_paths(stage)))
    figures.report_bytes = size_of(catalog.report_html)
    figures.data_dir_bytes = size_of(data_dir)
    with open(log, "ab") as out:
        out.write(f"=== {size} {kind}: status, gc\n".encode())
    figures.status_s = timed_command(_cli("status", "--config", str(config), "--data-dir", str(data_dir)), log)
    figures.gc_s = timed_command(_cli("gc", "--config", str(config), "--data-dir", str(data_dir)), log)
    return figures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_size(n: int, grow: float, work: Path, config: Path, log: Path) -> list[RunFigures]:
    from sd_core.demo.emoji_art import build_growth_items

    site, build_s = lazy_demo_site(n, port=free_port())
    print(f"# {n} items: site built in {build_s:.1f}s", flush=True)
    data_dir = work / f"data-{n}"
    shutil.rmtree(data_dir, ignore_errors=True)
    out = []
    with site:
        for kind in ("first", "rerun", "refresh"):
            new = n if kind == "first" else 0
            if kind == "refresh":
                new = max(1, round(n * grow))
                site.prepend(build_growth_items(new, after=n, lazy=True))
            figures = measure_run(n, kind, new, site, config, data_dir, log)
            print(format_run(figures), flush=True)
            out.append(figures)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}MiB"


def format_run(r: RunFigures) -> str:
    head = (f"{r.size:>6} {r.kind:7s} wall={r.wall:.1f}s stages={r.stage_seconds():.1f}s peak_rss={_mib(r.peak_rss)} "
            f"(data stages {_mib(r.peak_rss_data_stages)}, RSS sum {_mib(r.peak_rss_sum_data_stages)}) report={r.report_bytes / MB:.2f}MB "
            f"data_dir={_mib(r.data_dir_bytes)} status={r.status_s:.1f}s gc={r.gc_s:.1f}s "
            f"image_gets={r.image_gets} page_gets={r.page_gets} load={'/'.join(f'{x:.1f}' for x in r.load)}")
    rows = [f"         {s:8s} {f.status:7s} {f.seconds:7.1f}s (record {f.record_seconds or 0:.1f}s) "
            f"rss={_mib(f.peak_rss):>8s} (RSS sum {_mib(f.peak_rss_sum):>8s}) disk={_mib(f.disk):>8s}" for s, f in r.stages.items()]
    return "\n".join([head, *rows])


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def targets(results: list[RunFigures]) -> list[str]:
    by = {(r.size, r.kind): r for r in results}
    sizes_ = sorted({r.size for r in results})
    small, large = sizes_[0], sizes_[-1]
    lines = [f"targets (largest size measured: {large}, smallest: {small})"]
    if small != large:
        a, b = by[(small, "rerun")].wall, by[(large, "rerun")].wall
        sa, sb = by[(small, "rerun")].stage_seconds(), by[(large, "rerun")].stage_seconds()
        lines.append(f"  rerun with nothing new: wall {b:.1f}s at {large} vs {a:.1f}s at {small}: {b / a:.2f}x "
                     f"(target <= 2x at 50000 vs 1000) {verdict(b <= 2 * a)}; stages {sb:.1f}s vs {sa:.1f}s: "
                     f"{sb / max(sa, 1e-9):.2f}x {verdict(sb <= 2 * sa)}")
    for n in sizes_:
        first, refresh = by[(n, "first")], by[(n, "refresh")]
        per_first = first.stage_seconds() / n
        per_new = refresh.stage_seconds() / refresh.new_items
        wall_first, wall_new = first.wall / n, refresh.wall / refresh.new_items
        marginal = (refresh.stage_seconds() - by[(n, "rerun")].stage_seconds()) / refresh.new_items
        lines.append(f"  refresh at {n} (+{refresh.new_items}): stages {per_new:.3f} s/new item vs first run "
                     f"{per_first:.3f} s/item: {per_new / per_first:.2f}x (target <= 2x) "
                     f"{verdict(per_new <= 2 * per_first)}; wall {wall_new:.3f} vs {wall_first:.3f} s/item: "
                     f"{wall_new / wall_first:.2f}x; beyond the rerun's seconds: {marginal:.3f} s/new item "
                     f"({marginal / per_first:.2f}x)")
    big = [by[(large, k)] for k in ("first", "rerun", "refresh")]
    rss = max(r.peak_rss_data_stages for r in big)
    rss_sum = max(r.peak_rss_sum_data_stages for r in big)
    lines.append(f"  peak memory of the data stages' process tree at {large}: {rss / GiB:.2f} GiB PSS "
                 f"(target <= 2 GiB at 50000) {verdict(rss <= 2 * GiB)}; summed RSS {rss_sum / GiB:.2f} GiB "
                 f"{verdict(rss_sum <= 2 * GiB)}")
    report = max(r.report_bytes for r in big)
    lines.append(f"  report.html at {large}: {report / MB:.2f} MB (target <= 5 MB at 50000) {verdict(report <= 5 * MB)}")
    for name in ("status", "gc"):
        s = max(getattr(r, f"{name}_s") for r in big)
        lines.append(f"  {name} at {large}: {s:.1f}s (slowest of the 3 runs; target <= 10 s at 50000) "
                     f"{verdict(s <= 10)}")
    return lines


def load_run(data: dict) -> RunFigures:
    """A :class:`RunFigures` as ``--json`` saved it."""
    stages = {k: StageFigures(**v) for k, v in data.pop("stages").items()}
    return RunFigures(**{**data, "load": tuple(data.get("load", (0.0, 0.0, 0.0))), "stages": stages})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000])
    ap.add_argument("--grow", type=float, default=0.01, help="share of new items before the refresh")
    ap.add_argument("--work", type=Path, help="folder for the data dirs and the log (default: a temp folder, "
                                               "removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep each size's data dir")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                    help="run nothing: print the figures and targets of results saved with --json (several files: "
                         "sizes measured in separate invocations are compared as one)")
    args = ap.parse_args()
    if args.summarize:
        results = [load_run(r) for path in args.summarize for r in json.loads(path.read_text("utf-8"))]
        print("\n".join([*map(format_run, results), *targets(results)]), flush=True)
        return
    own = args.work is None
    work = Path(tempfile.mkdtemp(prefix="emoji-sd-scale-")) if own else args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.log"
    print(f"# work dir {work}; the runs' output goes to {log}", flush=True)
    config = build_config(work)
    results: list[RunFigures] = []
    try:
        for n in args.sizes:
            results += measure_size(n, args.grow, work, config, log)
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=1), "utf-8")
            if not args.keep:
                shutil.rmtree(work / f"data-{n}", ignore_errors=True)
        print("\n".join(targets(results)), flush=True)
    finally:
        if own and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
