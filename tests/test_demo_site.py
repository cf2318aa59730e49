"""Tests for the offline demo emoji site and its generated items."""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from PIL import Image
from polling import wait_for

from sd_core.demo.emoji_art import SiteItem, build_demo_items, build_growth_items
from sd_core.demo.site import DemoSite

TAG = "Blobs"


@pytest.fixture(scope="module")
def items60() -> list[SiteItem]:
    return build_demo_items(60, seed=0)


def _fake_items(n: int, prefix: str = "e") -> list[SiteItem]:
    return [
        SiteItem(f"/emoji/{prefix}{i:04d}.png", f"{prefix} {i}", f"{prefix}{i}".encode(), "image/png")
        for i in range(n)
    ]


def _api(site: DemoSite, page: int, tag: str = TAG) -> dict:
    resp = requests.get(f"{site.base_url}/api/emoji-list", params={"tag": tag, "page": page}, timeout=5)
    resp.raise_for_status()
    return resp.json()


@pytest.fixture
def site() -> Iterator[DemoSite]:
    with DemoSite(_fake_items(80), tag=TAG, per_page=36, render_delay_ms=150) as s:
        yield s


def test_listing_html_has_container_and_script(site: DemoSite) -> None:
    assert site.base_url.startswith("http://127.0.0.1:") and not site.base_url.endswith("/")
    url = site.listing_url(3)
    assert url == f"{site.base_url}/emoji-list/tag/Blobs?page=3"
    resp = requests.get(url, timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    html = resp.text
    assert '<div class="FS5UE28h container">' in html
    assert re.search(r'<div class="LQY5mtmC"[^>]*></div>', html), "grid must be empty before JS runs"
    assert '<div class="G020KZik">' in html
    assert "aLnnpRah" in html and "Mw1EAtrx" in html  # only inside the script
    assert "setTimeout" in html and "/api/emoji-list" in html and "DELAY = 150" in html
    assert "PAGE = 3" in html
    assert site.page_gets == 1


def test_api_pages_newest_first_and_past_end(site: DemoSite) -> None:
    assert site.n_pages == 3
    first = _api(site, 1)
    assert [it["src"] for it in first["items"]] == [f"/emoji/e{i:04d}.png" for i in range(36)]
    assert first["items"][0]["title"] == "e 0"
    assert first["pages"] == 3 and first["total"] == 80
    assert len(_api(site, 2)["items"]) == 36
    assert [it["src"] for it in _api(site, 3)["items"]] == [f"/emoji/e{i:04d}.png" for i in range(72, 80)]
    assert _api(site, 4)["items"] == []
    assert _api(site, 1, tag="Cats")["items"] == []
    assert requests.get(site.listing_url(1, tag="Cats"), timeout=5).status_code == 200


def test_unknown_path_is_404(site: DemoSite) -> None:
    for path in ("/nope", "/emoji/e0000.png?x=1", "/emoji/E0000.png"):
        assert requests.get(site.base_url + path, timeout=5).status_code == 404
    assert site.total_image_gets() == 0


def test_image_faults_and_counts(items60: list[SiteItem]) -> None:
    webp = next(i for i in items60 if i.content_type == "image/webp" and i.path.startswith("/emoji/"))
    nxt = next(i for i in items60 if i.path.startswith("/_next/image?"))
    faulty = [
        SiteItem("/emoji/missing.webp", "Missing", webp.body, "image/webp", fault="404"),
        SiteItem("/emoji/flaky.webp", "Flaky", webp.body, "image/webp", fault="500-once"),
        SiteItem("/emoji/cut.webp", "Cut", webp.body, "image/webp", fault="truncated"),
    ]
    with DemoSite([webp, nxt, *faulty]) as s:
        for item in (webp, nxt):
            resp = requests.get(s.base_url + item.path, timeout=5)
            assert resp.status_code == 200
            assert resp.content == item.body
            assert resp.headers["Content-Type"] == item.content_type
            assert resp.headers["Cache-Control"] == "no-store"

        assert requests.get(s.base_url + "/emoji/missing.webp", timeout=5).status_code == 404
        assert requests.get(s.base_url + "/emoji/missing.webp", timeout=5).status_code == 404

        first = requests.get(s.base_url + "/emoji/flaky.webp", timeout=5)
        second = requests.get(s.base_url + "/emoji/flaky.webp", timeout=5)
        assert first.status_code == 500
        assert second.status_code == 200 and second.content == webp.body

        cut = requests.get(s.base_url + "/emoji/cut.webp", timeout=5)
        assert cut.status_code == 200 and cut.content == webp.body[: len(webp.body) // 2]
        with pytest.raises(OSError):
            Image.open(io.BytesIO(cut.content)).load()

        assert s.image_gets[webp.path] == 1
        assert s.image_gets[nxt.path] == 1
        assert s.image_gets["/emoji/missing.webp"] == 2
        assert s.image_gets["/emoji/flaky.webp"] == 2
        assert s.image_gets["/emoji/cut.webp"] == 1
        assert s.total_image_gets() == sum(s.image_gets.values()) == 7

        # A browser's <img> load is counted apart and does not use up the one-shot 500.
        s.reset_counts()
        assert s.total_image_gets() == 0 and s.page_gets == 0
        render = requests.get(s.base_url + webp.path, headers={"Sec-Fetch-Dest": "image"}, timeout=5)
        assert render.status_code == 200
        assert s.browser_image_gets[webp.path] == 1 and s.total_image_gets() == 0


def test_browser_load_does_not_consume_500_once(items60: list[SiteItem]) -> None:
    body = items60[0].body
    with DemoSite([SiteItem("/emoji/flaky.webp", "Flaky", body, "image/webp", fault="500-once")]) as s:
        url = s.base_url + "/emoji/flaky.webp"
        assert requests.get(url, headers={"Sec-Fetch-Dest": "image"}, timeout=5).status_code == 500
        assert requests.get(url, timeout=5).status_code == 500
        assert requests.get(url, timeout=5).status_code == 200


def test_prepend_pushes_old_items_down(site: DemoSite) -> None:
    old_first = _api(site, 1)["items"]
    site.prepend(_fake_items(10, prefix="new"))
    assert site.n_pages == 3
    page1 = _api(site, 1)["items"]
    assert [it["src"] for it in page1[:10]] == [f"/emoji/new{i:04d}.png" for i in range(10)]
    assert page1[10:] == old_first[:26]
    assert _api(site, 2)["items"][:10] == old_first[26:]
    assert len(_api(site, 3)["items"]) == 18
    with pytest.raises(ValueError):
        site.prepend(_fake_items(1, prefix="new"))


def test_build_demo_items_deterministic_and_valid(items60: list[SiteItem]) -> None:
    again = build_demo_items(60, seed=0)
    assert [(i.path, i.title, i.body, i.content_type) for i in again] == [
        (i.path, i.title, i.body, i.content_type) for i in items60
    ]
    assert build_demo_items(60, seed=1)[0].body != items60[0].body
    assert len(items60) == 60
    assert len({i.path for i in items60}) == 60
    assert all(i.path.startswith("/") and i.fault == "none" for i in items60)

    ext_for = {"image/webp": "webp", "image/gif": "gif", "image/png": "png", "image/jpeg": "jpg"}
    animated: Counter[str] = Counter()
    for item in items60:
        assert re.search(rf"(/emoji/|%2Femoji%2F)\d{{7}}\.{ext_for[item.content_type]}", item.path)
        img = Image.open(io.BytesIO(item.body))
        img.load()
        assert img.size == (128, 128)
        assert Image.MIME[img.format] == item.content_type
        if getattr(img, "is_animated", False):
            animated[item.content_type] += 1
    assert animated["image/gif"] >= 1 and animated["image/webp"] >= 1

    kinds = Counter(i.content_type for i in items60)
    assert 4 <= kinds["image/gif"] <= 8
    assert kinds["image/webp"] >= 45
    assert kinds["image/png"] >= 1
    assert any("_" in i.title for i in items60) and any(" " in i.title for i in items60)


def test_reuploads_are_byte_identical(items60: list[SiteItem]) -> None:
    first_seen: dict[bytes, int] = {}
    reuploads = 0
    # Listing is newest first, so walk from the oldest item upwards.
    for pos in range(len(items60) - 1, -1, -1):
        item = items60[pos]
        if item.body in first_seen:
            orig = items60[first_seen[item.body]]
            assert orig.path != item.path and orig.title != item.title
            assert item.title.startswith(orig.title) and item.title[-1].isdigit()
            reuploads += 1
        else:
            first_seen[item.body] = pos
    assert reuploads == 3


def test_growth_items_are_new(items60: list[SiteItem]) -> None:
    growth = build_growth_items(10, seed=0, after=60)
    assert len(growth) == 10
    assert not {g.body for g in growth} & {i.body for i in items60}
    assert not {g.path for g in growth} & {i.path for i in items60}
    assert len({g.body for g in growth}) == 10
    with DemoSite(items60, per_page=36) as s:
        s.prepend(growth)
        assert s.n_pages == 2
        assert _api(s, 1)["items"][0]["src"] == growth[0].path


def test_fixed_port_is_kept_and_a_taken_port_falls_back() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with DemoSite([], port=port) as first:
        assert first.base_url == f"http://127.0.0.1:{port}"
        with DemoSite([], port=port) as second:
            assert second.base_url != first.base_url
            assert requests.get(second.listing_url(1), timeout=5).ok


def test_misbehaving_servers(items60: list[SiteItem]) -> None:
    import gzip
    import socket
    import time

    body = items60[0].body
    faults = [
        SiteItem("/e/always.webp", "Always", body, "image/webp", fault="500"),
        SiteItem("/e/slow.webp", "Slow", body, "image/webp", fault="slow"),
        SiteItem("/e/drip.webp", "Drip", body, "image/webp", fault="drip"),
        SiteItem("/e/moved.webp", "Moved", body, "image/webp", fault="redirect", location="/e/slow.webp"),
        SiteItem("/e/bomb.png", "Bomb", body, "image/png", fault="gzip-bomb"),
        SiteItem("/e/huge.png", "Huge", body, "image/png", fault="huge"),
        SiteItem("/e/short.png", "Short", body, "image/png", fault="short-body"),
        SiteItem("/e/away.png", "Away", body, "image/png", src="http://127.0.0.1:9/e/away.png"),
    ]
    with DemoSite(faults, slow_s=0.3, drip_s=0.2, bomb_bytes=8 << 20, huge_bytes=3 << 20) as s:
        url = s.base_url
        assert [requests.get(url + "/e/always.webp", timeout=5).status_code for _ in range(3)] == [500] * 3
        start = time.monotonic()
        assert requests.get(url + "/e/slow.webp", timeout=5).content == body
        assert time.monotonic() - start >= 0.3
        moved = requests.get(url + "/e/moved.webp", timeout=5, allow_redirects=False)
        assert moved.status_code == 302 and moved.headers["Location"] == "/e/slow.webp"
        bomb = requests.get(url + "/e/bomb.png", timeout=5, stream=True)
        assert bomb.headers["Content-Encoding"] == "gzip"
        assert len(gzip.decompress(bomb.raw.read(decode_content=False))) == 8 << 20
        huge = requests.get(url + "/e/huge.png", timeout=5)
        assert int(huge.headers["Content-Length"]) == len(huge.content) == 3 << 20
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(url + "/e/short.png", timeout=5)
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as sock:
            start = time.monotonic()
            sock.sendall(b"GET /e/drip.webp HTTP/1.0\r\n\r\n")
            got = b""
            while len(got.partition(b"\r\n\r\n")[2]) < 3:  # the head and three bytes of the body
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the drip after {got!r}"
                got += chunk
            took = time.monotonic() - start
        head, _, part = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and f"Content-Length: {len(body)}".encode() in head
        assert body.startswith(part) and len(part) < len(body)
        assert took >= 2 * 0.2 * 0.95, f"three bytes of the body in {took:.2f}s: not a byte every 0.2s"
        assert [it["src"] for it in _api(s, 1)["items"]][-1] == "http://127.0.0.1:9/e/away.png"
        wait_for(lambda: s.image_aborted["/e/drip.webp"] == 1, 10, "the server to see the hang-up on the drip")
        assert s.image_done["/e/slow.webp"] == 1 and s.image_done["/e/huge.png"] == 1


def test_error_pages_rate_limits_and_an_outage(items60: list[SiteItem]) -> None:
    body = items60[0].body
    faults = [
        SiteItem("/e/page.webp", "Page", body, "image/webp", fault="html-200"),
        SiteItem("/e/empty.webp", "Empty", body, "image/webp", fault="empty-200"),
        SiteItem("/e/limited.webp", "Limited", body, "image/webp", fault="429"),
        SiteItem("/e/once.webp", "Once", body, "image/webp", fault="429-once"),
        SiteItem("/e/fine.webp", "Fine", body, "image/webp"),
    ]
    with DemoSite(faults, retry_after="3600") as s:
        url = s.base_url
        page = requests.get(url + "/e/page.webp", timeout=5)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert page.content.startswith(b"<!DOCTYPE html>")
        empty = requests.get(url + "/e/empty.webp", timeout=5)
        assert empty.status_code == 200 and empty.content == b""
        for _ in range(2):
            limited = requests.get(url + "/e/limited.webp", timeout=5)
            assert limited.status_code == 429 and limited.headers["Retry-After"] == "3600"
        assert requests.get(url + "/e/once.webp", timeout=5).status_code == 429
        assert requests.get(url + "/e/once.webp", timeout=5).content == body
        s.image_fault = "html-200"  # an outage: every item answers the same error page
        assert requests.get(url + "/e/fine.webp", timeout=5).content == page.content
        s.image_fault = None  # ... and the recovery
        assert requests.get(url + "/e/fine.webp", timeout=5).content == body
        assert len(s.image_times["/e/once.webp"]) == 2 and s.image_gets["/e/fine.webp"] == 2
    with DemoSite(faults[2:3], retry_after=None) as s:
        assert "Retry-After" not in requests.get(s.base_url + "/e/limited.webp", timeout=5).headers
