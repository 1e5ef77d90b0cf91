"""The transformers backend for real: a tiny random Llava model built in a temp folder.

Backend level (load, batched generate on real photos, failures inside a batch, setup
errors), then the CLI end to end over tests/photos into a real SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from vlmtag.errors import InferenceError, SetupError
from vlmtag.ingest import imaging
from vlmtag.models.base import Backend, BackendOptions, PreparedImage, Reply, get_backend
from vlmtag.models.prompts import build_request

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".tif", ".tiff", ".bmp", ".gif"}
# Enough tokens to see an answer come back; the tiny model's answers are gibberish anyway.
FEW_TOKENS = 8
REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["tinymodel"]  # the tiny_vlm_dir fixture


def _backend(model_path: str | Path | None, model: str = "") -> Backend:
    path = None if model_path is None else str(model_path)
    return get_backend("transformers", BackendOptions(model=model, model_path=path))


def _request(max_tokens: int = FEW_TOKENS):
    return build_request(tag_count=5, description=False, language="en", max_tokens=max_tokens)


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


async def _tag(backend: Backend, images: list[PreparedImage]) -> list[Reply | Exception]:
    await backend.start()
    try:
        return await backend.infer_batch(images, _request())
    finally:
        await backend.close()


def test_transformers_backend_tags_a_batch_of_real_photos(tiny_vlm_dir, photos_dir):
    photos = _photos(photos_dir)[:4]
    # Different boxes give a batch of mixed sizes and shapes, as a real folder does.
    boxes = [(512, 512), (256, 256), (128, 96), None]
    images = [
        imaging.prepare(p, box, keep_pixels=True) for p, box in zip(photos, boxes, strict=True)
    ]
    assert len({(i.width, i.height) for i in images}) > 1
    backend = _backend(tiny_vlm_dir)
    assert isinstance(backend, Backend)
    assert (backend.name, backend.model) == ("transformers", "tiny-llava")
    assert backend.wants_pixels and backend.input_box is None
    assert backend.batch_size > 1 and backend.default_workers == 1

    replies = asyncio.run(_tag(backend, images))

    assert len(replies) == len(images)
    for reply in replies:
        assert isinstance(reply, Reply), reply
        assert reply.text.strip()
        assert 0 < reply.timings["eval_count"] <= FEW_TOKENS
        assert reply.timings["prompt_eval_count"] > 0


def test_transformers_backend_keeps_answers_in_order(tiny_vlm_dir, photos_dir):
    photos = _photos(photos_dir)
    # The first and last photos, not two neighbours: a folder may hold a rotated copy.
    a, b = (imaging.prepare(p, (256, 256), keep_pixels=True) for p in (photos[0], photos[-1]))
    backend = _backend(tiny_vlm_dir)

    async def three_batches():
        await backend.start()
        try:
            # Batches of the same size, so each row is computed exactly alike.
            return [
                await backend.infer_batch(batch, _request()) for batch in ([a, b], [a, a], [b, b])
            ]
        finally:
            await backend.close()

    mixed, only_a, only_b = ([r.text for r in replies] for replies in asyncio.run(three_batches()))
    assert mixed == [only_a[0], only_b[0]]
    # Different pixels, different answers: the check above could not pass by accident.
    assert only_a[0] != only_b[0]


def test_transformers_backend_decodes_bytes_when_no_pixels(tiny_vlm_dir, photos_dir):
    image = imaging.prepare(_photos(photos_dir)[0], (256, 256), keep_pixels=False)
    assert image.pixels is None
    backend = _backend(tiny_vlm_dir)

    async def one():
        await backend.start()
        try:
            return await backend.infer(image, _request())
        finally:
            await backend.close()

    reply = asyncio.run(one())
    assert isinstance(reply, Reply) and reply.text.strip()


def test_transformers_backend_one_bad_image_does_not_fail_the_batch(tiny_vlm_dir, photos_dir):
    from PIL import Image

    good = [imaging.prepare(p, (256, 256), keep_pixels=True) for p in _photos(photos_dir)[:2]]
    empty = Image.new("RGB", (0, 0))  # decodes, but no processor can resize it: generate fails
    no_pixels = PreparedImage(b"", "image/jpeg", 0, 0, 0, 0, pixels=empty)
    garbage = PreparedImage(b"not an image", "image/jpeg", 1, 1, 1, 1)
    batch = [good[0], no_pixels, garbage, good[1]]

    replies = asyncio.run(_tag(_backend(tiny_vlm_dir), batch))

    assert isinstance(replies[0], Reply) and replies[0].text.strip()
    assert isinstance(replies[3], Reply) and replies[3].text.strip()
    for failed in replies[1:3]:
        assert isinstance(failed, InferenceError)
        assert str(failed) and "\n" not in str(failed)


def _start_error(backend: Backend) -> str:
    with pytest.raises(SetupError) as caught:
        asyncio.run(backend.start())
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_transformers_backend_missing_folder_is_a_setup_error(tmp_path):
    missing = tmp_path / "no-such-model"
    message = _start_error(_backend(missing))
    assert str(missing) in message and "--model-path" in message


def test_transformers_backend_folder_without_config_is_a_setup_error(tmp_path):
    (tmp_path / "photos-not-a-model").mkdir()
    (tmp_path / "photos-not-a-model" / "cat.jpg").write_bytes(b"\xff\xd8")
    message = _start_error(_backend(tmp_path / "photos-not-a-model"))
    assert "photos-not-a-model" in message and "config.json" in message


def test_transformers_backend_folder_without_weights_is_a_setup_error(tiny_vlm_dir, tmp_path):
    broken = tmp_path / "config-only"
    shutil.copytree(tiny_vlm_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    message = _start_error(_backend(broken))
    assert str(broken) in message and "model.safetensors" in message


def test_transformers_backend_needs_a_model_path():
    # No --model-path, and a model name that is an Ollama tag, not a hub id.
    message = _start_error(_backend(None, model="qwen3-vl:4b"))
    assert "--model-path" in message and "hf download" in message


def test_transformers_backend_never_downloads_a_hub_id():
    backend = _backend(None, model="vlmtag-tests/no-such-model")
    assert backend.model == "vlmtag-tests/no-such-model"
    message = _start_error(backend)
    assert "vlmtag-tests/no-such-model" in message
    assert "hf download vlmtag-tests/no-such-model" in message


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    # One thread: the tiny model's matrices are too small to share across cores, and
    # the test runner's other work competes for the same cores.
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "vlmtag", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_transformers_backend_cli_tags_photos_into_sqlite(tiny_vlm_dir, photos_dir, tmp_path):
    db = tmp_path / "tags.db"
    result = _run_cli(
        "tag", str(photos_dir), "--db", str(db), "--backend", "transformers",
        "--model-path", str(tiny_vlm_dir), "--json", "--no-description", "--tag-count", "5",
    )  # fmt: skip

    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert isinstance(json.loads(result.stdout), dict)
    with sqlite3.connect(db) as conn:
        files = dict(conn.execute("SELECT path, content_id FROM files WHERE present"))
        annotated = {
            row[0]
            for row in conn.execute(
                "SELECT content_id FROM annotations WHERE backend = ? AND model = ?",
                ("transformers", "tiny-llava"),
            )
        }
        failures = {Path(path).name: (stage, reason) for path, stage, reason in conn.execute(
            "SELECT path, stage, reason FROM failures")}  # fmt: skip
    by_name = {Path(path).name: content_id for path, content_id in files.items()}
    for photo in _photos(photos_dir):
        assert photo.name in by_name, f"{photo.name} not in files"
        if by_name[photo.name] in annotated:
            continue
        assert photo.name in failures, f"{photo.name}: neither annotated nor failed"
        stage, reason = failures[photo.name]
        assert stage == "parse" and reason.strip(), (photo.name, stage, reason)


def test_transformers_backend_cli_model_type_local_bad_path(tmp_path):
    missing = tmp_path / "missing-model"
    result = _run_cli(
        "tag", str(REPO / "tests" / "photos"), "--db", str(tmp_path / "tags.db"),
        "--model-type", "local", "--model-path", str(missing),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert str(missing) in result.stderr
