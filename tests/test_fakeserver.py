"""The fake server itself: it must speak the protocols as documented, and its fingerprints
must identify an image after the resizing and re-encoding the pipeline does."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fakeserver import (
    TEST_COLOURS,
    FakeServer,
    colour_name,
    describe_image,
    fingerprint_for_rgb,
    solid_jpeg,
)

HERE = Path(__file__).parent
CHAT = {
    "model": "qwen3-vl:4b",
    "messages": [
        {
            "role": "user",
            "content": "tag",
            "images": [base64.b64encode(solid_jpeg(TEST_COLOURS["green"])).decode()],
        }
    ],
}


def test_ollama_streams_ndjson_when_stream_is_absent():
    with FakeServer() as server:
        streamed = httpx.post(f"{server.url}/api/chat", json=CHAT)
        whole = httpx.post(f"{server.url}/api/chat", json={**CHAT, "stream": False})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert len(lines) > 2
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] > 0
    joined = "".join(line["message"]["content"] for line in lines)
    assert joined == whole.json()["message"]["content"]
    assert fingerprint_for_rgb(TEST_COLOURS["green"]) in joined


def test_ollama_metadata_endpoints():
    with FakeServer() as server:
        assert httpx.get(f"{server.url}/api/version").json()["version"]
        names = [m["name"] for m in httpx.get(f"{server.url}/api/tags").json()["models"]]
        shown = httpx.post(f"{server.url}/api/show", json={"model": "qwen3-vl:4b"}).json()
        missing = httpx.post(f"{server.url}/api/show", json={"model": "nope"})
    assert "qwen3-vl:4b" in names
    assert "vision" in shown["capabilities"]
    assert missing.status_code == 404 and "not found" in missing.json()["error"]


def test_openai_models_and_key():
    with FakeServer(api_key="sk-1") as server:
        refused = httpx.get(f"{server.url}/v1/models")
        listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-1"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert listed.json()["object"] == "list"
    assert "qwen3-vl:4b" in [m["id"] for m in listed.json()["data"]]


def test_slots_queue_requests_and_counters_see_every_image():
    with FakeServer(slots=1, latency=0.05) as server:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(3):
                client.post("/api/chat", json={**CHAT, "stream": False})
        assert server.max_active == 1
        assert server.fingerprints == [fingerprint_for_rgb(TEST_COLOURS["green"])] * 3


def test_test_colours_are_named_and_told_apart():
    assert all(colour_name(rgb) == name for name, rgb in TEST_COLOURS.items())
    prints = {fingerprint_for_rgb(rgb) for rgb in TEST_COLOURS.values()}
    assert len(prints) == len(TEST_COLOURS)


@settings(max_examples=40, deadline=None)
@given(
    colour=st.sampled_from(list(TEST_COLOURS.values())),
    width=st.integers(32, 900),
    height=st.integers(32, 900),
    box=st.integers(16, 512),
    quality=st.integers(50, 95),
)
def test_fingerprint_survives_resize_and_jpeg(colour, width, height, box, quality):
    original = Image.new("RGB", (width, height), colour)
    original.thumbnail((box, box), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    original.save(out, "JPEG", quality=quality)
    facts = describe_image(out.getvalue())
    assert facts.fingerprint == fingerprint_for_rgb(colour)
    assert (facts.width, facts.height) == original.size


def test_runs_as_a_script():
    process = subprocess.Popen(
        [sys.executable, str(HERE / "fakeserver.py"), "--port", "0", "--model", "m1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        names = [m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]]
        assert names == ["m1:latest"]
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "GET /api/tags: 1" in err
