"""`emoji-sd app` in a real headless Chromium: type a prompt, press the button, an image appears with the settings
that draw it again; bad input gets a message on the page; the dataset view searches captions and pages through
them, images beside captions; the evaluation history is shown. The model is a tiny export (64 px, seconds)."""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pytest
import requests
from polling import wait_for
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from served_data_dir import RUN, tiny_served_data_dir
from tiny_diffusion import one_torch_thread

from sd_core.app.server import AppServer, Limits
from sd_core.diffusion.export import load_pipeline, model_digest
from sd_core.diffusion.generate import generate
from sd_core.ingest.browser import BASE_ARGS
from sd_core.ingest.settings import CrawlConfig
from sd_core.store.catalog import Catalog
from sd_core.runtime.process import child_popen_kw
from sd_core.store.metadata import read_metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("served")
    return tiny_served_data_dir(root)


@pytest.fixture(scope="module")
def app(served: Catalog) -> Iterator[AppServer]:
    with AppServer(served, port=0, device="cpu", limits=Limits(max_steps=50, max_images=4), page_size=5) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium with the crawler's flags, images on (the crawler switches them off)."""
    cfg = CrawlConfig()
    opts = webdriver.ChromeOptions()
    opts.binary_location = cfg.chromium_path
    for arg in BASE_ARGS:
        if not arg.startswith("--blink-settings"):
            opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=cfg.chromedriver_path, popen_kw=child_popen_kw()),
                              options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def fill(driver: webdriver.Chrome, **fields: str) -> None:
    for name, value in fields.items():
        box = driver.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)


def text_now(driver: webdriver.Chrome, by: str, selector: str) -> str:
    """The element's text, or "" while the page is being replaced (a form submit or a link navigates)."""
    try:
        return driver.find_element(by, selector).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def message(driver: webdriver.Chrome, contains: str) -> str:
    def text() -> str:
        m = text_now(driver, By.ID, "message")
        return m if contains in m else ""
    return wait_for(text, 120, f"the message {contains!r}")


def loaded_images(driver: webdriver.Chrome, css: str) -> list:
    return [im for im in driver.find_elements(By.CSS_SELECTOR, css)
            if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)]


def test_listens_on_loopback_by_default(app: AppServer) -> None:
    from flows.cli import build_parser

    assert app.url.startswith("http://127.0.0.1:")
    assert build_parser().parse_args(["app", "--data-dir", "d"]).host == "127.0.0.1"


def test_type_a_prompt_press_the_button_and_the_images_appear(app: AppServer, browser: webdriver.Chrome,
                                                              served: Catalog) -> None:
    browser.get(app.url)
    prompt = read_metadata(served)[0]["prompt"]
    fill(browser, prompt=prompt, steps="3", seed="7", count="2", guidance_scale="4")
    browser.find_element(By.ID, "draw-button").click()
    images = wait_for(lambda: loaded_images(browser, "img.result"), 120, "the drawn images")
    assert len(images) == 2 and images[0].get_attribute("naturalWidth") == "64"
    message(browser, "2 image(s) in")
    settings = [json.loads(pre.text.split("\n\n")[0]) for pre in browser.find_elements(By.CSS_SELECTOR, "pre.settings")]
    model = served.run_dir(RUN) / "model"
    assert [s["seed"] for s in settings] == [7, 8]
    assert settings[0] | {"seed": 0} == {"prompt": prompt, "negative_prompt": "", "seed": 0, "guidance_scale": 4.0,
                                         "steps": 3, "scheduler": "ddim", "width": 64, "height": 64,
                                         "model_digest": model_digest(model)}
    assert "emoji-sd sample --model" in browser.find_element(By.CSS_SELECTOR, "pre.settings").text
    # the settings shown draw the same image again
    import base64
    import io

    from PIL import Image

    shown = Image.open(io.BytesIO(base64.b64decode(images[1].get_attribute("src").split(",", 1)[1]))).convert("RGB")
    again = generate(load_pipeline(model), [prompt], [8], guidance_scale=4.0, steps=3, sampler_name="ddim")[0][0]
    diff = np.abs(np.asarray(shown, dtype=int) - np.asarray(again, dtype=int))  # batch of 2 against 1: rounding
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("fields, says", [
    ({"prompt": ""}, "Prompt is empty"),
    ({"steps": "10000"}, "Steps must be between 1 and 50, got 10000"),
    ({"guidance_scale": "-1"}, "Guidance must be 0 (no text), 1 (text, no guidance) or between 1 and 30, got -1"),
    ({"count": "500"}, "Count must be between 1 and 4 images, got 500"),
    ({"seed": "abc"}, "Seed must be a whole number, got 'abc'"),
])
def test_bad_input_gets_a_message_on_the_page(app: AppServer, browser: webdriver.Chrome, fields: dict[str, str],
                                              says: str) -> None:
    browser.get(app.url)
    fill(browser, **{"prompt": "Frog emoji with a round head", "steps": "2", "count": "1", **fields})
    browser.find_element(By.ID, "draw-button").click()
    message(browser, says)
    assert "error" in browser.find_element(By.ID, "message").get_attribute("class")
    assert not browser.find_elements(By.CSS_SELECTOR, "img.result")
    assert requests.get(app.url, timeout=10).status_code == 200  # the app is still up


def test_one_drawing_at_a_time(app: AppServer) -> None:
    drawer = app.app.state.drawer
    with drawer._lock:  # a drawing in progress
        r = requests.post(app.url + "api/draw", json={"prompt": "Frog emoji", "steps": 2, "count": 1}, timeout=30)
    assert r.status_code == 429 and r.json()["error"].startswith("Busy: another drawing is in progress")
    r = requests.post(app.url + "api/draw", json={"prompt": "Frog emoji", "steps": 2, "count": 1, "width": 100},
                      timeout=60)
    assert r.status_code == 400 and r.json()["error"] == "Width must be a multiple of 8 between 8 and 1024, got 100"


def test_dataset_view_searches_captions_and_pages(app: AppServer, browser: webdriver.Chrome, served: Catalog) -> None:
    rows = read_metadata(served)
    browser.get(app.url + "data")
    assert browser.find_element(By.ID, "hits").text == f"{len(rows)} of {len(rows)} images."
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.item")) == 5
    pages = -(-len(rows) // 5)
    assert f"page 1 of {pages}" in browser.find_element(By.CSS_SELECTOR, ".pages").text
    browser.find_element(By.LINK_TEXT, "next →").click()
    wait_for(lambda: f"page 2 of {pages}" in text_now(browser, By.CSS_SELECTOR, ".pages"), 30, "page 2")
    shown = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "td.caption")]
    assert shown == [r["prompt"] for r in rows[5:10]]
    assert len(wait_for(lambda: loaded_images(browser, "tr.item img"), 30, "the thumbnails")) == 5

    word = rows[3]["prompt"].split(" emoji")[0]  # the emoji's name, e.g. "Face With Cowboy Hat"
    want = [r["prompt"] for r in rows if word.lower() in f"{r['prompt']} {r['image_title']}".lower()]
    fill(browser, q=word)
    browser.find_element(By.ID, "search-button").click()
    wait_for(lambda: text_now(browser, By.ID, "hits").startswith(f"{len(want)} of"), 30, "the search")
    assert [c.text for c in browser.find_elements(By.CSS_SELECTOR, "td.caption")] == want[:5]
    assert requests.get(app.url + "images/../metadata.csv", timeout=10).status_code == 404


def test_evaluation_history_is_shown(app: AppServer, browser: webdriver.Chrome) -> None:
    browser.get(app.url + "data")
    rows = browser.find_elements(By.CSS_SELECTOR, "#evaluations tr.evaluation")
    assert len(rows) == 1 and RUN in rows[0].text and "promoted" in rows[0].text
