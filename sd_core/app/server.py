"""``emoji-sd app``: a local web page that draws from the champion, and shows the dataset and its evaluations.

A small FastAPI application (FastAPI is already installed for Prefect; uvicorn comes with Prefect): ``/`` takes a
prompt, a negative prompt, guidance, steps, the sampler, a seed and a count, and shows the images with the settings
and the ``emoji-sd sample`` command that draw each again; ``/data`` searches the dataset's captions (image beside
caption, paginated) and shows ``models/evaluations.csv``. One request cannot exhaust the machine: steps, images,
size, guidance and prompt length are capped (:class:`Limits`), and one drawing runs at a time (a second request
meanwhile is answered "busy"). It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sd_core.diffusion.config import SAMPLERS
from sd_core.publish import served_model
from sd_core.store.catalog import Catalog
from sd_core.store.metadata import read_csv_table, read_metadata

log = logging.getLogger(__name__)
PAGE_SIZE = 24


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for."""

    max_steps: int = 100
    max_images: int = 8
    max_side: int = 1024
    max_guidance: float = 30.0
    max_prompt_chars: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_images", "max_side", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


class BadRequest(ValueError):
    """A request the page answers with its message (HTTP 400)."""


def _number(body: dict[str, Any], name: str, label: str, kind: type, default: Any) -> Any:
    raw = body.get(name, default)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raw = default
    try:
        value = kind(raw)
        if kind is int and isinstance(raw, str) and not raw.strip().lstrip("-").isdigit():
            raise ValueError
    except (TypeError, ValueError):
        raise BadRequest(f"{label} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{label} must be a finite number")
    return value


def check_request(body: dict[str, Any], limits: Limits, native: tuple[int, int], factor: int) -> dict[str, Any]:
    """The drawing settings of a request, or :class:`BadRequest` naming the first field that is out of bounds."""
    prompt = str(body.get("prompt") or "").strip()
    if not prompt:
        raise BadRequest("Prompt is empty: type what to draw")
    if len(prompt) > limits.max_prompt_chars:
        raise BadRequest(f"Prompt is {len(prompt)} characters long; at most {limits.max_prompt_chars}")
    negative = str(body.get("negative_prompt") or "").strip()
    if len(negative) > limits.max_prompt_chars:
        raise BadRequest(f"Negative prompt is longer than {limits.max_prompt_chars} characters")
    guidance = _number(body, "guidance_scale", "Guidance", float, 7.5)
    if not 0 <= guidance <= limits.max_guidance or 0 < guidance < 1:
        raise BadRequest(f"Guidance must be 0 (no text), 1 (text, no guidance) or between 1 and "
                         f"{limits.max_guidance:g}, got {guidance:g}")
    steps = _number(body, "steps", "Steps", int, 30)
    if not 1 <= steps <= limits.max_steps:
        raise BadRequest(f"Steps must be between 1 and {limits.max_steps}, got {steps}")
    count = _number(body, "count", "Count", int, 1)
    if not 1 <= count <= limits.max_images:
        raise BadRequest(f"Count must be between 1 and {limits.max_images} images, got {count}")
    seed = _number(body, "seed", "Seed", int, 0)
    if not 0 <= seed < 2**63:
        raise BadRequest(f"Seed must be between 0 and 2^63 - 1, got {seed}")
    scheduler = str(body.get("scheduler") or "ddim")
    if scheduler not in SAMPLERS:
        raise BadRequest(f"Sampler must be one of {', '.join(SAMPLERS)}, got {scheduler!r}")
    size = []
    for name, label, fallback in (("width", "Width", native[0]), ("height", "Height", native[1])):
        value = _number(body, name, label, int, fallback)
        if not factor <= value <= limits.max_side or value % factor:
            raise BadRequest(f"{label} must be a multiple of {factor} between {factor} and {limits.max_side}, "
                             f"got {value}")
        size.append(value)
    return {"prompt": prompt, "negative_prompt": negative, "guidance_scale": guidance, "steps": steps,
            "scheduler": scheduler, "seed": seed, "count": count, "width": size[0], "height": size[1]}


class Drawer:
    """The champion's pipeline, loaded once, drawing one request at a time."""

    def __init__(self, model: Path, *, device: str = "auto", limits: Limits = Limits()) -> None:
        from sd_core.diffusion.export import load_pipeline, model_digest
        from sd_core.sample.stage import resolve_device

        self.model, self.limits = Path(model), limits
        self.digest = model_digest(self.model)
        self.pipe = load_pipeline(self.model, device=resolve_device(device))
        self.factor = int(self.pipe.vae_scale_factor)
        side = int(self.pipe.unet.config.sample_size) * self.factor
        self.native = (side, side)
        self._lock = threading.Lock()

    def draw(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """PNG images (base64) of a request with the settings and the command that draw each again."""
        from sd_core.diffusion.generate import generate
        from sd_core.sample.stage import command_line

        s = check_request(body, self.limits, self.native, self.factor)
        if not self._lock.acquire(blocking=False):
            raise Busy("Busy: another drawing is in progress; try again when it is done")
        try:
            started = time.perf_counter()
            seeds = [s["seed"] + j for j in range(s["count"])]
            (row,) = generate(self.pipe, [s["prompt"]], seeds, guidance_scale=s["guidance_scale"], steps=s["steps"],
                              sampler_name=s["scheduler"], batch_size=s["count"], negative_prompt=s["negative_prompt"],
                              width=s["width"], height=s["height"])
            log.info("app: %d image(s) in %.1f s", len(row), time.perf_counter() - started)
        finally:
            self._lock.release()
        out = []
        for seed, image in zip(seeds, row):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            settings = {"prompt": s["prompt"], "negative_prompt": s["negative_prompt"], "seed": seed,
                        "guidance_scale": s["guidance_scale"], "steps": s["steps"], "scheduler": s["scheduler"],
                        "width": s["width"], "height": s["height"], "model_digest": self.digest}
            out.append({"png": base64.b64encode(buf.getvalue()).decode("ascii"), "settings": settings,
                        "command": command_line(settings, str(self.model))})
        return out


class Busy(RuntimeError):
    """Another drawing is running (HTTP 429)."""


class DatasetIndex:
    """metadata.csv's rows, read again when the file changes; search by caption or title."""

    def __init__(self, catalog: Catalog, page_size: int = PAGE_SIZE) -> None:
        self.catalog, self.page_size = catalog, page_size
        self._stamp: tuple[float, int] | None = None
        self._rows: list[dict[str, str]] = []
        self._files: set[str] = set()
        self._lock = threading.Lock()

    def rows(self) -> list[dict[str, str]]:
        try:
            st = os.stat(self.catalog.metadata_csv)
            stamp = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._rows = read_metadata(self.catalog) if stamp else []
                self._files = {r["file_name"] for r in self._rows}
                self._stamp = stamp
            return self._rows

    def search(self, query: str, page: int) -> tuple[list[dict[str, str]], int, int]:
        """The rows of ``page`` (1-based) among those whose caption or title holds ``query``; also the match count
        and the number of pages."""
        words = query.lower().split()
        rows = self.rows()
        hits = [r for r in rows if all(w in f"{r.get('prompt', '')} {r.get('image_title', '')}".lower() for w in words)]
        pages = max(1, math.ceil(len(hits) / self.page_size))
        page = min(max(1, page), pages)
        return hits[(page - 1) * self.page_size : page * self.page_size], len(hits), pages

    def image(self, file_name: str) -> Path | None:
        """The image file of a dataset row (None for anything that is not one)."""
        self.rows()
        return self.catalog.image_path(file_name) if file_name in self._files else None


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
nav a { margin-right: 1.2em; } label { display: block; margin: .4em 0 .1em; font-weight: 600; }
textarea, input, select { font: inherit; padding: .25em; } textarea { width: 100%; }
.row { display: flex; gap: 1.2em; flex-wrap: wrap; } .row > div { min-width: 8em; }
button { font: inherit; padding: .4em 1.4em; margin-top: .8em; }
#message { min-height: 1.4em; font-weight: 600; } #message.error { color: #b00020; }
figure { display: inline-block; margin: .6em; vertical-align: top; max-width: 330px; }
figure img { width: 256px; image-rendering: pixelated; border: 1px solid #ccc; }
pre { white-space: pre-wrap; font-size: 12px; background: #f5f5f5; padding: .4em; }
table { border-collapse: collapse; font-size: 14px; } td, th { border: 1px solid #ddd; padding: .3em .5em; }
td img { width: 64px; height: 64px; image-rendering: pixelated; }
"""

DRAW_JS = """
const form = document.getElementById('draw-form');
const message = document.getElementById('message');
const results = document.getElementById('results');
const button = document.getElementById('draw-button');
form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const body = {};
  for (const el of form.elements) { if (el.name) body[el.name] = el.value; }
  button.disabled = true;
  message.className = ''; message.textContent = 'Drawing…';
  try {
    const resp = await fetch('api/draw', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                          body: JSON.stringify(body)});
    let data = {};
    try { data = await resp.json(); } catch (e) { data = {error: 'the server answered ' + resp.status}; }
    if (!resp.ok) { message.className = 'error'; message.textContent = data.error || ('error ' + resp.status); return; }
    results.replaceChildren();
    for (const item of data.images) {
      const fig = document.createElement('figure');
      const img = document.createElement('img');
      img.className = 'result'; img.alt = item.settings.prompt;
      img.src = 'data:image/png;base64,' + item.png;
      const pre = document.createElement('pre');
      pre.className = 'settings';
      pre.textContent = JSON.stringify(item.settings, null, 1) + '\\n\\n' + item.command;
      fig.append(img, pre); results.append(fig);
    }
    message.textContent = data.images.length + ' image(s) in ' + data.seconds + ' s';
  } catch (e) {
    message.className = 'error'; message.textContent = 'The app did not answer: ' + e;
  } finally { button.disabled = false; }
});
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><nav><a href='/'>Draw</a><a href='/data'>Dataset and evaluations</a>"
            f"</nav>{body}</body></html>")


def draw_page(drawer: Drawer, catalog: Catalog) -> str:
    lim = drawer.limits
    options = "".join(f"<option{' selected' if s == 'ddim' else ''}>{s}</option>" for s in SAMPLERS)
    return _page("emoji-sd", f"""
<h1>Draw emoji</h1>
<p>Model: <code>{html.escape(str(drawer.model))}</code> (digest <code>{drawer.digest}</code>),
{drawer.native[0]}×{drawer.native[1]} px. At most {lim.max_steps} steps and {lim.max_images} images a request,
one drawing at a time.</p>
<form id="draw-form" autocomplete="off">
<label for="prompt">Prompt</label><textarea id="prompt" name="prompt" rows="3"></textarea>
<label for="negative_prompt">Negative prompt</label><input id="negative_prompt" name="negative_prompt" size="80">
<div class="row">
<div><label for="guidance_scale">Guidance</label><input id="guidance_scale" name="guidance_scale" value="7.5" size="6"></div>
<div><label for="steps">Steps</label><input id="steps" name="steps" value="30" size="6"></div>
<div><label for="scheduler">Sampler</label><select id="scheduler" name="scheduler">{options}</select></div>
<div><label for="seed">Seed</label><input id="seed" name="seed" value="0" size="10"></div>
<div><label for="count">Count</label><input id="count" name="count" value="4" size="4"></div>
</div>
<button id="draw-button" type="submit">Draw</button>
</form>
<p id="message" role="status"></p>
<div id="results"></div>
<script>{DRAW_JS}</script>""")


def data_page(index: DatasetIndex, catalog: Catalog, query: str, page: int) -> str:
    rows, hits, pages = index.search(query, page)
    page = min(max(1, page), pages)
    cells = "".join(
        f"<tr class='item'><td><img loading='lazy' src='/images/{quote(r['file_name'])}' alt=''></td>"
        f"<td class='caption'>{html.escape(r.get('prompt', ''))}</td><td>{html.escape(r.get('image_title', ''))}</td>"
        f"<td>{html.escape(r.get('captioner', ''))}</td></tr>" for r in rows)

    def link(p: int, label: str) -> str:
        return f"<a class='page-link' href='/data?{urlencode({'q': query, 'page': p})}'>{label}</a>"

    nav = " ".join(([link(page - 1, "← previous")] if page > 1 else [])
                   + [f"page {page} of {pages}"] + ([link(page + 1, "next →")] if page < pages else []))
    history = read_csv_table(catalog.eval_history_csv) if catalog.eval_history_csv.exists() else []
    if history:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in history[0])
        body = "".join("<tr class='evaluation'>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values())
                       + "</tr>" for row in history)
        evaluations = f"<table id='evaluations'><tr>{head}</tr>{body}</table>"
    else:
        evaluations = "<p id='evaluations'>No run has been evaluated yet.</p>"
    return _page("emoji-sd dataset", f"""
<h1>Dataset</h1>
<form method="get" action="/data"><input id="q" name="q" value="{html.escape(query)}" size="50"
 placeholder="search the captions"> <button id="search-button" type="submit">Search</button></form>
<p id="hits">{hits} of {len(index.rows())} images{' match' if query else ''}.</p>
<table id="items"><tr><th>image</th><th>caption</th><th>title</th><th>captioner</th></tr>{cells}</table>
<p class="pages">{nav}</p>
<h1>Evaluations</h1>
<p>One row per evaluated run (<code>models/evaluations.csv</code>).</p>
{evaluations}""")


def create_app(catalog: Catalog, *, device: str = "auto", limits: Limits = Limits(), model: Path | None = None,
               page_size: int = PAGE_SIZE) -> Any:
    """The FastAPI application serving ``catalog``'s champion (``model``: another export, for tests and tools);
    ``page_size``: dataset rows a page."""
    drawer = Drawer(model or served_model(catalog), device=device, limits=limits)
    index = DatasetIndex(catalog, page_size)
    app = FastAPI(title="emoji-sd", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.drawer, app.state.index = drawer, index

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return draw_page(drawer, catalog)

    @app.post("/api/draw")
    async def draw(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the request must be a JSON object"}, status_code=400)
        started = time.perf_counter()
        try:
            images = await run_in_threadpool(drawer.draw, body)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Busy as e:
            return JSONResponse({"error": str(e)}, status_code=429)
        return JSONResponse({"images": images, "seconds": round(time.perf_counter() - started, 1)})

    @app.get("/data", response_class=HTMLResponse)
    def data(q: str = "", page: str = "1") -> str:
        number = int(page) if page.isdigit() else 1
        return data_page(index, catalog, q[:200], number)

    @app.get("/images/{file_name:path}")
    def image(file_name: str) -> Response:
        path = index.image(file_name)
        if path is None or not path.is_file():
            return JSONResponse({"error": "no such image"}, status_code=404)
        return FileResponse(path)

    return app


class AppServer:
    """``with AppServer(catalog, port=0) as server:`` the app served by uvicorn in a background thread at
    ``server.url`` (port 0: a free one)."""

    def __init__(self, catalog: Catalog, *, host: str = "127.0.0.1", port: int = 7860, **kw: Any) -> None:
        import uvicorn

        self.app = create_app(catalog, **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                                    lifespan="off", access_log=False))
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="emoji-sd-app", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def __enter__(self) -> "AppServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the app could not listen on {self.host}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def serve_forever(catalog: Catalog, *, host: str = "127.0.0.1", port: int = 7860, **kw: Any) -> None:
    """``emoji-sd app``: serve until Ctrl-C or SIGTERM."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"emoji-sd app: listening on {host}: anyone who can reach this machine can draw from the model",
              flush=True)
    with AppServer(catalog, host=host, port=port, **kw) as server:
        print(f"emoji-sd app: {server.url} (Ctrl-C stops it)", flush=True)
        try:
            while server._thread.is_alive():
                server._thread.join(timeout=0.5)
        finally:
            server.server.should_exit = True
