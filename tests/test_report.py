"""report.html as a newcomer reads it: alerts first, then the served model (its pictures for held-out prompts
beside the real emoji, the headline κ with its interval, the code that loads it), every figure rounded to what it
means, the dataset as counts and a fixed sample (small and fast at 50,000 images), and the page in Chromium
showing the model on the first screen."""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import pytest
from served_data_dir import RUN, tiny_served_data_dir
from tiny_diffusion import one_torch_thread

from sd_core.diffusion.card import load_snippet
from sd_core.diffusion.export import read_manifest
from sd_core.report import format as fmt
from sd_core.report.page import stages_markdown, write_report
from sd_core.sample.config import SampleConfig
from sd_core.sample.stage import run_sampling
from sd_core.store.catalog import Catalog
from sd_core.store.files import atomic_write_json, read_json
from sd_core.store.metadata import read_metadata, update_metadata, write_csv_table, write_metadata
from sd_core.store.records import StageResult


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """A data dir with a verified champion, evaluated, and sampled on two held-out prompts."""
    root = tmp_path_factory.mktemp("report")
    catalog = tiny_served_data_dir(root)
    run_sampling(SampleConfig(steps=2, images_per_prompt=2, guidance_sweep=(), held_out_prompts=2), catalog)
    return catalog


def section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}">')
    return page[start:page.index("</section>", start)]


def srcs(fragment: str) -> list[str]:
    return [html.unescape(s) for s in re.findall(r'<img src="([^"]+)"', fragment)]


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._skip += tag in ("style", "script")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def text(fragment: str) -> str:
    parser = _Text()
    parser.feed(fragment)
    return " ".join(" ".join(parser.parts).split())


def stage(name: str, status: str = "ran", seconds: float = 1.0, **summary) -> StageResult:
    return StageResult(stage=name, status=status, key="k", summary=summary, seconds=seconds)


def test_the_top_shows_the_champions_pictures_beside_the_real_ones_and_the_headline(served: Catalog,
                                                                                   tmp_path: Path) -> None:
    page = write_report(served, []).read_text("utf-8")
    sections = re.findall(r'<section id="([a-z-]+)">', page)
    assert sections[:5] == ["model", "prompt-following", "training", "dataset", "stages"]
    top = section(page, "model")
    champion = read_json(served.current_json)
    assert champion["run"] == RUN and RUN in text(top)

    # the gallery: every picture of the model is one the sample stage drew from the champion's digest, each row
    # beside the dataset's image with that caption (held out of training)
    about = read_json(served.samples_dir / "samples.json")
    drawn = {str((served.samples_dir / i["file"]).relative_to(served.root)): i for i in about["images"]}
    assert all(i["model_digest"] == champion["digest"] for i in drawn.values())
    gallery = section(page, "model").split('id="gallery"')[1].split("</table>")[0]
    rows = gallery.split("<tr>")[2:]
    assert len(rows) == 2
    by_caption = {r["prompt"]: r for r in read_metadata(served)}
    for row in rows:
        real, *model = srcs(row)
        prompt = html.unescape(re.search(r'<td class="prompt">([^<]*)', row).group(1)).strip()
        assert real == by_caption[prompt]["file_name"] and "held out" in row
        assert model and all(m in drawn and drawn[m]["prompt"] == prompt for m in model)
        assert all((served.root / s).is_file() for s in (real, *model))

    # the headline: mean κ with its 90 % interval, beside unguided, real images and through the VAE
    scores = read_json(served.eval_json(served.run_dir(RUN)))
    s, iv = scores["scores"], scores["intervals"]
    head = text(top.split('id="headline"')[1])
    assert f"{fmt.kappa(s['prompt_kappa'])} [{fmt.kappa(iv['prompt_kappa'][0])}, {fmt.kappa(iv['prompt_kappa'][1])}]" \
        in head
    for label, name in (("unguided (w = 0)", "prompt_kappa_g0"), ("real images", "prompt_kappa_real"),
                        ("through the VAE", "prompt_kappa_vae")):
        assert f"{label} {fmt.kappa(s[name], iv.get(name))}" in head
    assert f"Held-out loss (ε-MSE): {fmt.loss(s['held_out_loss'], iv['held_out_loss'])}" in head
    assert top.index('id="gallery"') < top.index('id="use"')

    # "use this model": the model card's snippet for this export, and it loads the model and draws
    model = served.run_dir(RUN) / "model"
    code = html.unescape(re.search(r'<div class="use" id="use">.*?<code>(.*?)</code>', top, re.S).group(1))
    assert code == load_snippet(read_manifest(model), str(model.resolve()), about["images"][0]["prompt"])
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "report.html", "exec"), {"__name__": "__report__"})  # noqa: S102
    finally:
        os.chdir(before)
    from PIL import Image

    assert Image.open(tmp_path / "emoji.png").size == (64, 64)


def test_pictures_of_any_other_export_are_never_shown_as_the_model(served: Catalog, tmp_path: Path) -> None:
    d = Catalog(shutil.copytree(served.root, tmp_path / "d"))
    champion = read_json(d.current_json)

    # a later run (trained last, rejected) with its own eval grid: shown apart, as the run it is
    other = d.run_dir("run-other")
    shutil.copytree(d.run_dir(RUN), other)
    ev = read_json(d.eval_json(other))
    atomic_write_json(d.eval_json(other), {**ev, "digest": "another", "status": "rejected",
                                           "reason": "worse than the champion", "champion_scores": ev["scores"]})
    atomic_write_json(d.latest_run_json, {"run": other.name, "key": "other"})
    # samples recorded as drawn from another export
    key = read_json(d.samples_dir / "samples_key.json")
    atomic_write_json(d.samples_dir / "samples_key.json", {**key, "digest": "another"})

    page = write_report(d, []).read_text("utf-8")
    top = section(page, "model")
    assert RUN in text(top) and "run-other" not in top
    assert not any(s.startswith("samples/") for s in srcs(top))
    # without the champion's samples, its own eval grid (scored on its digest) is the picture on top
    assert srcs(top) == [f"models/unet/{RUN}/scores/grid.png"]
    assert read_json(d.eval_json(d.run_dir(RUN)))["digest"] == champion["digest"]
    latest = section(page, "prompt-following")
    assert "The latest run, run-other" in text(latest) and "rejected" in text(latest)
    assert "not the served model" in text(latest) and "run-other/scores/grid.png" not in page
    assert "samples/grid.png" not in page  # the sample stage's grid is not the served model's

    # the champion's export changed on disk: no model is served, and no picture is shown as its
    weights = next((d.run_dir(RUN) / "model" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    page = write_report(d, []).read_text("utf-8")
    top = section(page, "model")
    assert "No model is served: the champion's export does not verify" in text(top)
    assert srcs(top) == [] and 'id="use"' not in top


def test_every_figure_is_rounded_to_what_it_means(served: Catalog) -> None:
    assert fmt.decibels(21.395986557006836) == "21.4 dB"
    assert fmt.duration(192.4) == "3 min 12 s" and fmt.duration(9.536) == "9.5 s" and fmt.duration(4000) == "1 h 06 min"
    assert fmt.count(1234) == "1,234" and fmt.count(1234, "items") == "1,234 items"
    assert fmt.kappa(0.3123, [0.2311, 0.3944]) == "0.31 [0.23, 0.39]"
    assert fmt.loss(1.003267) == "1.00" and fmt.loss(0.955235, [0.946436, 0.965099]) == "0.955 [0.946, 0.965]"
    assert fmt.share(0.366667, [0.333333, 0.433333]) == "37 % [33, 43]"
    assert fmt.timestamp("2026-12-06T03:14:03+00:00") == "2026-12-06 03:14 UTC"
    assert fmt.size(4_812_345) == "4.8 MB"

    # stage records as the stages write them, raw floats and the eval's "value [lo, hi]" strings
    results = [
        stage("crawl", seconds=4.836041244999549, downloaded=1234, walk="full", failed={}),
        stage("vae", seconds=70.51594633499917, heldout_psnr_db=21.395986557006836, heldout_colours_kept=0.8421052,
              seconds_=None),
        stage("train", seconds=192.4, train_loss=0.980612345, ema_val_loss=0.99142123, steps=900),
        stage("eval", seconds=9.536880441000903, prompt_kappa="0.011 [0.0, 0.046]",
              held_out_loss="1.01264 [1.00327, 1.02299]", prompt_following="0.333 [0.333, 0.433]", eval_seconds=9.5),
        stage("sample", "skipped", 0.0, why="not selected", last_run="2026-12-06T03:12:36+00:00"),
    ]
    page = write_report(served, results).read_text("utf-8")
    rows = {r.split("</td>")[0].split(">")[-1]: text(r) for r in section(page, "stages").split("<tr>")[2:]}
    assert rows["crawl"].startswith("crawl ran 4.8 s") and "downloaded 1,234" in rows["crawl"]
    assert "held-out PSNR 21.4 dB" in rows["vae"] and "held-out colours kept 84 %" in rows["vae"]
    assert "1 min 11 s" in rows["vae"] and "3 min 12 s" in rows["train"] and "training loss 0.981" in rows["train"]
    assert "κ (guided) 0.01 [0.00, 0.05]" in rows["eval"] and "held-out loss 1.01 [1.00, 1.02]" in rows["eval"]
    assert "read back (guided) 33 % [33, 43]" in rows["eval"]
    assert "not selected" in rows["sample"] and "last ran 2026-12-06 03:12 UTC" in rows["sample"]
    assert "=" not in rows["crawl"] + rows["vae"] + rows["train"] + rows["eval"]
    # nowhere on the page, nor in the Prefect artifact, a figure with more digits than it means
    visible = text(page.split("<body>")[1])
    markdown = stages_markdown(served, results)
    for where in (visible, markdown):
        assert not re.findall(r"\d\.\d{5,}", where), re.findall(r".{30}\d\.\d{5,}.{10}", where)
    assert "| vae | **ran** | 1 min 11 s | held-out PSNR 21.4 dB" in markdown


def test_the_prefect_artifact_leads_with_the_same_headline(served: Catalog) -> None:
    results = [stage("crawl", "failed", 2.0, reason="listing page http://x/1 shows no items", error="ListingError"),
               stage("convert", "skipped", 0.0, why="not run: crawl failed")]
    page = write_report(served, results).read_text("utf-8")
    markdown = stages_markdown(served, results)
    lines = markdown.splitlines()
    assert lines[0] == "- **crawl failed: listing page http://x/1 shows no items**"
    assert lines[2].startswith(f"**Served model**: models/unet/{RUN}/model: a UNet trained from scratch")
    head = text(section(page, "model").split('id="headline"')[1])
    kappa = re.search(r"κ (\S+ \[[^\]]+\])", lines[4]).group(1)
    assert kappa in head and "unguided (w = 0)" in lines[4]
    assert "| crawl | **failed** | 2.0 s | listing page http://x/1 shows no items |" in markdown
    assert "| convert | **skipped** | – | why not run: crawl failed |" in markdown


def test_a_failed_run_shows_its_alert_before_the_model(served: Catalog) -> None:
    results = [stage("crawl", "ran", 3.0, alert="the listing walk was cut: the page limit crawl.max_pages = 1 was "
                                               "reached"),
               stage("convert", "failed", 0.5, reason="IsADirectoryError: state/convert.json", error="OSError"),
               stage("caption", "skipped", 0.0, why="not run: convert failed")]
    page = write_report(served, results).read_text("utf-8")
    alerts = page.index('<div class="alerts" id="alerts">')
    assert alerts < page.index('<section id="model">') < page.index("<h2>Stages</h2>")
    box = text(page[alerts:page.index("</div>", alerts) + 6])
    assert box.startswith("This run failed convert failed: IsADirectoryError: state/convert.json")
    assert box.index("convert failed") < box.index("crawl: the listing walk was cut")
    failed_row = next(r for r in section(page, "stages").split("<tr>") if "<td>convert</td>" in r)
    assert 'class="failed"' in failed_row and "IsADirectoryError" in text(failed_row)
    # the model that is still served shows under the alert
    assert 'id="gallery"' in section(page, "model")


def grow(catalog: Catalog, n: int) -> None:
    """metadata.csv with ``n`` captioned rows (two captioners, some flagged), a duplicates list and a quarantine
    list, written by the dataset's own writers."""
    rows = [{"file_name": catalog.image_file_name(f"Blobs_{i:07d}.jpg"),
             "image_url": f"https://emoji.example/emoji/{i}.png", "image_title": f"emoji {i}", "tag": "Blobs",
             "md5": hashlib.md5(str(i).encode()).hexdigest(), "width": 128, "height": 128, "source_format": "PNG",
             "animated": False} for i in range(n)]
    write_metadata(catalog, rows)
    update_metadata(catalog, {r["md5"]: {"prompt": f"{r['image_title']} emoji with a round head, yellow skin color, "
                                                   "with a white background.",
                                         "captioner": "qwen2.5-vl" if i % 10 else "offline",
                                         "caption_flagged": i % 97 == 0} for i, r in enumerate(rows)})
    write_csv_table(catalog.duplicates_csv, ("image_url", "image_title", "md5", "original_url", "original_title"),
                    [(f"https://emoji.example/d/{i}.png", f"dup {i}", "0" * 32, "", "") for i in range(n // 100)])
    write_csv_table(catalog.quarantine_csv, ("md5", "image_url", "image_title", "reason"),
                    [("f" * 32, f"https://emoji.example/q/{i}.png", f"q {i}", "decoder error: truncated")
                     for i in range(7)])


def test_a_50000_image_dataset_gives_a_small_page_quickly(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "big")
    grow(catalog, 50_000)
    start = time.perf_counter()
    path = write_report(catalog, [stage("convert", dataset_rows=50_000)])
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    assert size <= 5_000_000 and seconds < 20, (size, seconds)
    page = path.read_text("utf-8")
    counts = text(section(page, "dataset").split('id="counts"')[1].split("</table>")[0])
    assert "images in the dataset 50,000" in counts
    assert "captioned 50,000 (qwen2.5-vl: 45,000, offline: 5,000)" in counts
    assert "flagged) 516" in counts and "duplicates skipped (the same bytes listed again) 500" in counts
    assert "quarantined (did not decode) 7 (decoder error: 7)" in counts
    sample = srcs(section(page, "dataset"))
    rows = read_metadata(catalog)
    lowest = sorted(rows, key=lambda r: r["md5"])[:24]
    assert sample == [r["file_name"] for r in lowest]  # a fixed sample: the lowest md5s, the same every run
    assert '<a href="metadata.csv">metadata.csv</a>' in page and "of the 50,000 images" in page
    assert "No model is served" in text(section(page, "model"))
    print(f"report.html at 50,000 images: {fmt.size(size)} in {seconds:.2f} s")


def test_the_page_in_chromium_shows_the_model_on_the_first_screen(served: Catalog, tmp_path: Path) -> None:
    """Headless Chromium at 1280×900: the gallery's pictures (the real one and the model's) load, and the gallery
    and the headline κ are on the first screen, under the title."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from sd_core.ingest.browser import BASE_ARGS

    path = write_report(served, [])
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in BASE_ARGS:
        if "imagesEnabled" not in arg and "window-size" not in arg:
            opts.add_argument(arg)
    opts.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(path.as_uri())
        from polling import wait_for

        images = wait_for(lambda: driver.execute_script(
            "const im = [...document.querySelectorAll('#gallery img')];"
            "return im.length && im.every(i => i.complete) ? im.map(i => i.naturalWidth) : null;"), 20,
            "the gallery's images")
        assert len(images) == 2 * (1 + 2) and all(w > 0 for w in images)  # two rows: real + 2 seeds
        screen = driver.execute_script("return window.innerHeight")
        for selector in ("#gallery", "#headline .big"):
            top = driver.execute_script(f"return document.querySelector('{selector}').getBoundingClientRect().top")
            assert top < screen, (selector, top, screen)
        kappa = driver.execute_script("return document.querySelector('#headline .big').innerText")
        scores = read_json(served.eval_json(served.run_dir(RUN)))["scores"]
        assert kappa.startswith(fmt.kappa(scores["prompt_kappa"]))
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
