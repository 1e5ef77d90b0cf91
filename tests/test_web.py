"""`vlmtag serve`: the web app over a real library, in-process over HTTP and in a real browser.

The library is tagged by the installed CLI against the loopback Ollama server (each answer
names the colour of its own picture). The browser tests drive Debian's chromium through
Playwright (never a downloaded browser); they are skipped where no chromium is installed,
and fail instead when VLMTAG_BROWSER=required (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from starlette.testclient import TestClient  # noqa: E402

from fakeserver import FakeServer  # noqa: E402
from test_cli import paint_folder, vlmtag  # noqa: E402
from vlmtag.web.app import create_app  # noqa: E402
from vlmtag.web.guard import Guard  # noqa: E402

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tagged library of 90 pictures; path -> fingerprint, and the database."""
    root = tmp_path_factory.mktemp("web")
    pics = root / "pics"
    expected = paint_folder(pics, 90)
    db = root / "v.db"
    with FakeServer() as server:
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--workers", "4", db=db)
        assert out.returncode == 0, out.stderr
    return expected, db, pics


@pytest.fixture
def db_copy(library, tmp_path):
    """A copy of the library's database this test may change."""
    expected, db, pics = library
    copy = tmp_path / "v.db"
    shutil.copy(db, copy)
    return expected, copy, pics


def client(db: Path, tmp_path: Path, **guard) -> TestClient:
    app = create_app(str(db), Guard(port=PORT, **guard), tmp_path / "thumbs")
    return TestClient(app, base_url=BASE)


def token_of(page: str) -> str:
    start = page.index('<script id="config" type="application/json">') + 44
    return json.loads(page[start : page.index("</script>", start)])["token"]


def all_tiles(web: TestClient, **query) -> list[dict]:
    tiles, after = [], None
    for _ in range(100):
        answer = web.get(
            "/api/images", params={**query, "limit": 7, **({"after": after} if after else {})}
        ).json()
        tiles += answer["tiles"]
        after = answer["after"]
        if after is None:
            return tiles
    raise AssertionError("paging did not end")


def test_pages_hold_every_image_once_in_every_sort(db_copy, tmp_path):
    expected, db, _ = db_copy
    with client(db, tmp_path) as web:
        for sort in ("path", "newest", "oldest"):
            tiles = all_tiles(web, sort=sort)
            assert sorted(t["path"] for t in tiles) == sorted(expected), sort
        assert web.get("/api/count").json()["total"] == 90
        for tile in all_tiles(web):
            assert expected[tile["path"]] in [k["text"] for k in tile["keywords"]]


def test_search_and_tag_filters(db_copy, tmp_path):
    expected, db, _ = db_copy
    path, fingerprint = next(iter(expected.items()))
    with client(db, tmp_path) as web:
        hits = web.get("/api/images", params={"q": f'"{fingerprint}"'}).json()["tiles"]
        assert [h["path"] for h in hits] == [path]
        filtered = all_tiles(web, tag=fingerprint)
        assert [t["path"] for t in filtered] == [path]
        cloud = web.get("/api/tags").json()
        assert cloud["tags"] and cloud["tags"][0]["count"] >= cloud["tags"][-1]["count"]
        bad = web.get("/api/images", params={"q": "tag:"})
        assert bad.status_code in (200, 400) and "Traceback" not in bad.text


def test_a_decision_made_here_survives_a_forced_rerun_and_reaches_the_export(db_copy, tmp_path):
    expected, db, pics = db_copy
    path, fingerprint = next(iter(expected.items()))
    with client(db, tmp_path) as web:
        token = token_of(web.get("/").text)
        tile = next(t for t in all_tiles(web) if t["path"] == path)
        headers = {"x-vlmtag-token": token, "origin": BASE, "sec-fetch-site": "same-origin"}
        reject = {"ids": [tile["id"]], "action": "reject", "keywords": [fingerprint]}
        rejected = web.post("/api/decide", headers=headers, json=reject)
        assert rejected.status_code == 200, rejected.text
        add = {"ids": [tile["id"]], "action": "add", "keywords": ["Felix"]}
        added = web.post("/api/decide", headers=headers, json=add)
        assert added.json()["changed"] == 1
    with FakeServer() as server:
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--force", db=db)
        assert out.returncode == 0, out.stderr
    with client(db, tmp_path) as web:
        shown = [k["text"] for k in web.get(f"/api/image/{tile['id']}").json()["keywords"]]
    assert fingerprint not in shown and "Felix" in shown
    exported = vlmtag("export", "--format", "jsonl", db=db)
    row = next(json.loads(r) for r in exported.stdout.splitlines() if json.loads(r)["path"] == path)
    assert fingerprint not in row["tags"] and "Felix" in row["tags"]


def test_the_guard(db_copy, tmp_path):
    expected, db, _ = db_copy
    with client(db, tmp_path) as web:
        page = web.get("/")
        assert page.status_code == 200
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        token = token_of(page.text)
        tile = web.get("/api/images").json()["tiles"][0]
        body = {"ids": [tile["id"]], "action": "add", "keywords": ["x"]}
        assert web.get("/", headers={"host": "evil.example:8765"}).status_code == 400
        assert web.get("/", headers={"host": "127.0.0.1:9999"}).status_code == 400
        evil = {"x-vlmtag-token": token, "origin": "http://evil.example"}
        cross = web.post("/api/decide", json=body, headers=evil)
        assert cross.status_code == 403
        framed = {"x-vlmtag-token": token, "sec-fetch-site": "cross-site"}
        site = web.post("/api/decide", json=body, headers=framed)
        assert site.status_code == 403
        assert web.post("/api/decide", json=body).status_code == 403  # no token
        assert (
            web.post("/api/decide", json=body, headers={"x-vlmtag-token": "x" + token}).status_code
            == 403
        )
        for path in ("/picture/../../etc/passwd/grid", "/picture/%2e%2e%2fetc%2fpasswd/grid",
                     "/picture/" + "a" * 64 + "/grid", f"/picture/{tile['id']}/huge",
                     f"/api/image/{tile['path']}"):  # fmt: skip
            assert web.get(path).status_code == 404, path
        for junk in (b"not json", b"[1,2]", b'{"ids": "x"}', b"[" * 100000):
            answer = web.post("/api/decide", content=junk, headers={"x-vlmtag-token": token})
            assert answer.status_code == 400, junk[:20]
    with client(db, tmp_path, read_only=True) as web:
        token = token_of(web.get("/").text)
        assert (
            web.post("/api/decide", json=body, headers={"x-vlmtag-token": token}).status_code == 403
        )
        for path in ("/api/vocab", "/api/undo", "/api/describe"):
            assert web.post(path, json={}, headers={"x-vlmtag-token": token}).status_code == 403
        # a download changes nothing: served; sidecars would write files: refused
        got = web.post("/api/export", json={"format": "csv"}, headers={"x-vlmtag-token": token})
        assert got.status_code == 200 and got.text.count("\n") == 91  # header + 90
        xmp = web.post("/api/export", json={"format": "xmp"}, headers={"x-vlmtag-token": token})
        assert xmp.status_code == 403 and "read-only" in xmp.json()["error"]
        assert web.post("/api/export", json={"format": "csv"}).status_code == 403  # no token
    with client(db, tmp_path, host="0.0.0.0", access_token="sesame") as web:
        assert web.get("/").status_code == 401
        assert web.get("/?token=sesame").status_code == 200
        assert web.get("/api/images").status_code == 200  # the cookie it set


def test_thumbnails_are_made_once_and_cached_by_content(db_copy, tmp_path):
    expected, db, pics = db_copy
    with client(db, tmp_path) as web:
        tile = web.get("/api/images").json()["tiles"][0]
        first = web.get(f"/picture/{tile['id']}/grid")
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        assert "immutable" in first.headers["cache-control"]
        again = web.get(
            f"/picture/{tile['id']}/grid", headers={"if-none-match": first.headers["etag"]}
        )
        assert again.status_code == 304
        made = list((tmp_path / "thumbs" / "grid").rglob("*.jpg"))
        assert [p.stem for p in made] == [tile["id"]]
        # The picture is found by its id from the path the database holds, and that path
        # must still be a regular file: a FIFO in its place is not read.
        other = web.get("/api/images").json()["tiles"][1]
        target = Path(web.get(f"/api/image/{other['id']}").json()["path"])
        original = target.read_bytes()
        target.unlink()
        os.mkfifo(target)
        try:
            assert web.get(f"/picture/{other['id']}/grid").status_code == 404
        finally:  # the pictures are the module's: put it back as it was
            target.unlink()
            target.write_bytes(original)


def test_model_text_is_escaped_in_pages(db_copy, tmp_path):
    expected, db, _ = db_copy
    from vlmtag.api import Library

    with Library.open(db) as lib:
        content = lib.browse().tiles[0].content_id
        lib.describe_content(
            [content], "<script>alert(1)</script><img src=x onerror=alert(2)>", via="test"
        )
        lib.decide([content], "add", ["<b>bold</b>"], via="test")
    with client(db, tmp_path) as web:
        page = web.get("/failures").text + web.get("/runs").text + web.get("/").text
        assert "<script>alert" not in page and "<b>bold" not in page
        detail = web.get(f"/api/image/{content}").json()
        assert detail["description"].startswith("<script>")  # JSON; the page uses textContent


# ---- in a real browser ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    if CHROMIUM is None or not _playwright():
        if os.environ.get("VLMTAG_BROWSER") == "required":
            pytest.fail(
                "no chromium or playwright: apt-get install chromium; pip install playwright"
            )
        pytest.skip("no chromium (apt-get install chromium) or playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # The page's CSP forbids eval, and Playwright's waits evaluate strings: the
            # test lifts it for itself (test_the_guard checks the header the app sends).
            yield _Browser(launched)
        finally:
            launched.close()


class _Browser:
    def __init__(self, browser):
        self.browser = browser

    def new_page(self, **options):
        return self.browser.new_page(bypass_csp=True, **options)


def _playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def served(db_copy):
    """`vlmtag serve` itself, as a user starts it, on a free port."""
    expected, db, pics = db_copy
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmtag", "serve", "--db", str(db), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    try:
        yield url, expected, db, pics
    finally:
        process.terminate()
        process.wait(10)


def watch_errors(page) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return errors


def test_the_grid_the_viewer_and_the_keys_in_a_browser(served, browser, tmp_path):
    url, expected, db, pics = served
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = watch_errors(page)
    page.goto(url)
    page.wait_for_selector(".tile img")
    page.wait_for_function("document.querySelectorAll('.tile').length >= 60")
    assert page.locator("#count").inner_text().startswith("90")
    # thumbnails really load
    page.wait_for_function(
        "Array.from(document.querySelectorAll('.tile img')).slice(0, 5)"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(tmp_path / "grid-1280.png"))
    # scrolling loads the next page
    page.mouse.wheel(0, 20000)
    page.wait_for_function("document.querySelectorAll('.tile').length == 90")
    # the viewer, j/k, and a keyword rejected with the keyboard
    page.locator(".tile").first.click()
    page.wait_for_selector("#view-chips .chip")
    first_path = page.locator("#view-path").inner_text()
    page.keyboard.press("j")
    page.wait_for_function(
        f"document.getElementById('view-path').textContent !== {json.dumps(first_path)}"
    )
    page.keyboard.press("k")
    page.wait_for_function(
        f"document.getElementById('view-path').textContent === {json.dumps(first_path)}"
    )
    fingerprint = expected[first_path]
    chips = page.locator("#view-chips .chip")
    texts = [chips.nth(i).inner_text() for i in range(chips.count())]
    position = next(i for i, t in enumerate(texts) if t.startswith(fingerprint))
    for _ in range(position + 1):
        page.keyboard.press("ArrowDown")
    page.keyboard.press("x")
    page.wait_for_function(
        "!Array.from(document.querySelectorAll('#view-chips .chip'))"
        f".some(c => c.textContent.startsWith({json.dumps(fingerprint)}))"
    )
    # add one with t, typing does not trigger keys
    page.keyboard.press("t")
    page.keyboard.type("jaxk")  # j, a, x, k typed into the field, not taken as keys
    page.keyboard.press("Enter")
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#view-chips .chip.person'))"
        ".some(c => c.textContent.startsWith('jaxk'))"
    )
    page.screenshot(path=str(tmp_path / "viewer-1280.png"))
    page.keyboard.press("Escape")
    assert not errors, errors

    with FakeServer() as server:
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--force", db=db)
        assert out.returncode == 0, out.stderr
    rows = map(json.loads, vlmtag("export", "--format", "jsonl", db=db).stdout.splitlines())
    row = next(r for r in rows if r["path"] == first_path)
    assert fingerprint not in row["tags"] and "jaxk" in row["tags"]


def test_search_a_tag_filter_bulk_add_and_chinese_in_a_browser(served, browser, tmp_path):
    url, expected, db, pics = served
    page = browser.new_page(viewport={"width": 1280, "height": 800}, locale="zh-CN")
    errors = watch_errors(page)
    page.goto(url)
    page.wait_for_selector(".tile img")
    assert page.locator("#q").get_attribute("placeholder") == "搜索关键词和描述"
    # shift-click a range of three, add a Chinese keyword to all of them
    tiles = page.locator(".tile")
    tiles.nth(0).click(modifiers=["Control"])
    tiles.nth(2).click(modifiers=["Shift"])
    assert page.locator(".tile.selected").count() == 3
    page.fill("#bulk-input", "小猫")
    page.click("#bulk-add")
    page.wait_for_function("document.getElementById('bulk-status').textContent.includes('3')")
    # search for it in Chinese: those three
    page.fill("#q", "小猫")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.tile').length === 3")
    assert "q=" in page.url
    # a tag from the cloud narrows the grid; the state is in the URL
    page.goto(url)
    page.wait_for_selector("#cloud button")
    page.locator("#cloud button").first.click()
    page.wait_for_function("location.search.includes('tag=')")
    page.wait_for_selector(".tile")
    page.screenshot(path=str(tmp_path / "filtered-zh.png"))
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(url)
    phone.wait_for_selector(".tile img")
    phone.screenshot(path=str(tmp_path / "grid-phone.png"))
    box = phone.locator(".tile").first.bounding_box()
    assert box and box["width"] < 390
    assert not errors, errors


def test_results_of_a_running_tag_appear_without_a_restart(served, tmp_path):
    url, expected, db, pics = served
    import urllib.request

    def total() -> int:
        with urllib.request.urlopen(url + "api/count") as reply:
            return json.load(reply)["total"]

    before = total()
    more = tmp_path / "more"
    paint_folder(more, 5)
    with FakeServer() as server:
        out = vlmtag("tag", str(more), "--api-base", server.url, db=db)
        assert out.returncode == 0, out.stderr
    assert total() == before + 5


def test_serve_says_in_one_line_what_stops_it(library, tmp_path):
    expected, db, pics = library
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "vlmtag", "serve", "--db", str(db), "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1, busy.stderr
    assert "in use" in busy.stderr and "--port" in busy.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "vlmtag", "serve", "--db", str(tmp_path / "none.db")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "vlmtag tag" in missing.stderr, missing.stderr


def test_thumbs_makes_what_is_missing_once(db_copy):
    expected, db, pics = db_copy
    out = vlmtag("thumbs", db=db)
    assert out.returncode == 0, out.stderr
    assert "made 180, could not read 0" in out.stdout  # 90 pictures, two sizes each
    made = {p.stem for p in Path(str(db) + "-thumbs").rglob("*.jpg")}
    assert len(made) == 90
    again = vlmtag("thumbs", db=db)
    assert "made 0" in again.stdout


def test_export_from_the_page_is_vlmtag_exports_own(db_copy, tmp_path):
    expected, db, pics = db_copy
    (path, fingerprint), (other, _) = list(expected.items())[:2]
    with client(db, tmp_path) as web:
        token = {"x-vlmtag-token": token_of(web.get("/").text)}
        tiles = {t["path"]: t for t in all_tiles(web)}
        ids = [tiles[path]["id"], tiles[other]["id"]]
        web.post("/api/decide", headers=token,
                 json={"ids": ids[:1], "action": "reject", "keywords": [fingerprint]})  # fmt: skip
        web.post("/api/decide", headers=token,
                 json={"ids": ids[:1], "action": "add", "keywords": ["Grace Hopper"]})  # fmt: skip
        chosen = web.post("/api/export", headers=token, json={"format": "jsonl", "ids": ids})
        assert chosen.status_code == 200 and "attachment" in chosen.headers["content-disposition"]
        rows = {r["path"]: r for r in map(json.loads, chosen.text.splitlines())}
        assert set(rows) == {path, other}
        assert fingerprint not in rows[path]["tags"] and "Grace Hopper" in rows[path]["tags"]
        filtered = web.post("/api/export?tag=Grace%20Hopper", headers=token, json={"format": "csv"})
        assert filtered.text.count("\n") == 2 and path in filtered.text  # header + one row
        sidecars = web.post("/api/export", headers=token, json={"format": "xmp", "ids": ids[:1]})
        assert sidecars.json()["written"] == {"created": 1}, sidecars.text
        assert web.post("/api/export", headers=token, json={"format": "exe"}).status_code == 400
    xmp = Path(path + ".xmp").read_text()
    assert "<rdf:li>Grace Hopper</rdf:li>" in xmp and f"<rdf:li>{fingerprint}</rdf:li>" not in xmp
    # the page's view and the CLI's export agree
    cli_rows = map(json.loads, vlmtag("export", "--format", "jsonl", db=db).stdout.splitlines())
    assert next(r for r in cli_rows if r["path"] == path)["tags"] == rows[path]["tags"]
    Path(path + ".xmp").unlink()  # the pictures are the module's


def test_keyword_suggestions_start_with_what_is_typed_most_used_first(db_copy, tmp_path):
    expected, db, pics = db_copy
    with client(db, tmp_path) as web:
        answer = web.get("/api/tags", params={"prefix": "fp-", "limit": 5}).json()
        assert len(answer["tags"]) == 5 and all(t["text"].startswith("fp-") for t in answer["tags"])
        counts = [t["count"] for t in web.get("/api/tags", params={"prefix": "b"}).json()["tags"]]
        assert counts == sorted(counts, reverse=True) and counts
        assert web.get("/api/tags", params={"prefix": "zzzz"}).json()["tags"] == []
        assert web.get("/api/tags", params={"limit": "x"}).status_code == 200
