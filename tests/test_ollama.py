"""The Ollama backend against a loopback server speaking Ollama's API."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest

from fakeserver import TEST_COLOURS, FakeServer, fingerprint_for_rgb
from serverkit import image, make_backend, run
from vlmtag.errors import InferenceError, SetupError
from vlmtag.models.base import Backend, PreparedImage, Reply, Request
from vlmtag.models.http import BrokenAnswer
from vlmtag.models.ollama import OllamaBackend, decode_chat, has_vision_hints, normalise_base

SCHEMA = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string"}}, "description": {}},
    "required": ["tags", "description"],
}
REQUEST = Request(
    prompt="Tag this photo.",
    system="You tag photos.",
    schema=SCHEMA,
    max_tokens=256,
    tag_count=5,
    description=True,
    language="en",
)


def backend(url: str, model: str = "qwen3-vl:4b", **options: Any) -> OllamaBackend:
    return make_backend(OllamaBackend, url, model, **options)


def tag(server: FakeServer, rgb=TEST_COLOURS["red"], **options: Any) -> Reply:
    return run(backend(server.url, **options), lambda b: b.infer(image(rgb), REQUEST))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_is_a_backend():
    ollama = backend("http://127.0.0.1:1")
    assert isinstance(ollama, Backend)
    assert (ollama.name, ollama.batch_size, ollama.wants_pixels) == ("ollama", 1, False)
    assert ollama.default_workers == 2


def test_each_answer_is_about_the_image_sent():
    colours = list(TEST_COLOURS.values())[:6]

    async def work(ollama: OllamaBackend) -> list[Reply]:
        return await asyncio.gather(*(ollama.infer(image(rgb), REQUEST) for rgb in colours))

    with FakeServer(slots=2) as server:
        replies = run(backend(server.url), work)
    for rgb, name, reply in zip(colours, TEST_COLOURS, replies, strict=False):
        answer = json.loads(reply.text)
        assert fingerprint_for_rgb(rgb) in answer["tags"]
        assert name in answer["tags"]
        assert "64x48" in answer["description"]


def test_request_follows_the_api():
    with FakeServer() as server:
        tag(server, num_ctx=4096, keep_alive="10m")
        body = server.last_body("/api/chat")
    assert body["model"] == "qwen3-vl:4b"
    assert body["stream"] is False
    assert body["options"] == {"temperature": 0, "num_predict": 256, "num_ctx": 4096}
    assert body["keep_alive"] == "10m"
    assert body["format"] == SCHEMA
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You tag photos."}
    assert user["content"] == "Tag this photo." and len(user["images"]) == 1
    assert body["think"] is False  # qwen3-vl declares "thinking": turn it off


def test_no_think_field_for_a_model_without_thinking():
    # The fake answers 400 "does not support thinking" as some Ollama versions do.
    with FakeServer() as server:
        reply = tag(server, model="qwen2.5vl:3b")
        assert "think" not in server.last_body("/api/chat")
    assert fingerprint_for_rgb(TEST_COLOURS["red"]) in reply.text


def test_timings_are_in_seconds():
    with FakeServer(latency=0.05) as server:
        reply = tag(server)
    assert reply.timings["total_duration"] == pytest.approx(0.052)
    assert reply.timings["load_duration"] == pytest.approx(0.001)
    assert reply.timings["prompt_eval_count"] == 20 + 64 * 48 // 784
    assert reply.timings["eval_count"] >= 1
    assert reply.timings["request_seconds"] > 0


@pytest.mark.parametrize("form", ["{host}", "{url}/", "{url}/api", "{url}"])
def test_base_url_forms(form: str):
    with FakeServer() as server:
        given = form.format(url=server.url, host=server.url.removeprefix("http://"))
        assert normalise_base(given) == server.url
        assert fingerprint_for_rgb(TEST_COLOURS["red"]) in tag(server).text


def test_start_without_a_server_says_how_to_start_one():
    with pytest.raises(SetupError) as caught:
        run(backend(f"http://127.0.0.1:{free_port()}"), lambda b: asyncio.sleep(0))
    message = str(caught.value)
    assert "cannot reach Ollama" in message and "connection refused" in message
    assert "ollama serve" in message and "--backend builtin" in message


def test_start_with_an_unknown_model_says_pull_it():
    with FakeServer() as server, pytest.raises(SetupError) as caught:
        run(backend(server.url, model="nosuch:7b"), lambda b: asyncio.sleep(0))
    assert "ollama pull nosuch:7b" in str(caught.value)


def test_start_with_a_text_model_asks_for_a_vision_model():
    with FakeServer() as server, pytest.raises(SetupError) as caught:
        run(backend(server.url, model="llama3.2:1b"), lambda b: asyncio.sleep(0))
    message = str(caught.value)
    assert "cannot see images" in message and "qwen3-vl:4b" in message


def test_start_on_an_old_server_reads_the_projector():
    models = {"llava:7b": ["completion", "vision"], "llama3.2:1b": ["completion"]}
    with FakeServer(models=models, legacy_show=True) as server:
        assert fingerprint_for_rgb(TEST_COLOURS["red"]) in tag(server, model="llava:7b").text
        with pytest.raises(SetupError) as caught:
            run(backend(server.url, model="llama3.2:1b"), lambda b: asyncio.sleep(0))
        assert server.count("/api/show") == 2
    assert "no vision encoder" in str(caught.value)


ODD_SHOWS = [
    "[]",
    '"a string"',
    "null",
    "42",
    '{"capabilities": null, "model_info": null, "details": null}',
    '{"capabilities": "vision"}',
    '{"capabilities": [null, 1, {"a": 1}, ["vision"]]}',
    '{"model_info": [1, 2, 3], "details": ["families"]}',
    '{"model_info": "vision", "details": {"families": 5}}',
    '{"details": {"families": "clip"}, "projector_info": null}',
    '{"details": {"families": [null, {"x": 1}, 3]}}',
    '{"capabilities": ["completion", "\\u001b[31mred"]}',
]


@pytest.mark.parametrize("body", ODD_SHOWS)
def test_an_api_show_of_any_shape_is_read_without_a_crash(body):
    with FakeServer(raw_routes={"/api/show": body}) as server:
        try:
            reply = tag(server)  # nothing to go on: the first answers tell
        except SetupError as exc:  # or a model that cannot see: one clear line
            assert "cannot see images" in str(exc) or "no vision encoder" in str(exc)
            assert "\x1b" not in str(exc) and "\n" not in str(exc)
        else:
            assert fingerprint_for_rgb(TEST_COLOURS["red"]) in reply.text
        assert server.count("/api/show") >= 1


def test_an_api_show_listing_no_vision_among_odd_items_asks_for_a_vision_model():
    odd = '{"capabilities": [7, null, "tools"]}'
    with (
        FakeServer(raw_routes={"/api/show": odd}) as server,
        pytest.raises(SetupError, match=r"cannot see images \(capabilities: tools\)"),
    ):
        run(backend(server.url), lambda b: asyncio.sleep(0))


def test_unknown_model_at_infer_is_not_retried():
    with FakeServer() as server:
        ollama = backend(server.url, model="gone:1b")
        with pytest.raises(InferenceError) as caught:
            run(ollama, lambda b: b.infer(image((16, 16, 16)), REQUEST), start=False)
        assert server.count("/api/chat") == 1
    assert not caught.value.retryable and caught.value.status == 404
    assert "ollama pull gone:1b" in str(caught.value)


def test_bad_request_is_not_retried():
    with FakeServer() as server:
        server.fail_next("400", 3)
        with pytest.raises(InferenceError) as caught:
            tag(server)
        assert server.count("/api/chat") == 1
    assert not caught.value.retryable and caught.value.status == 400


def test_busy_server_is_retried():
    with FakeServer() as server:
        server.fail_next("503", 2)
        reply = tag(server)
        assert server.count("/api/chat") == 3
    assert fingerprint_for_rgb(TEST_COLOURS["red"]) in reply.text


def test_failing_server_gives_up_after_the_retries():
    with FakeServer() as server:
        server.fail_next("500", 10)
        with pytest.raises(InferenceError) as caught:
            tag(server, retries=1)
        assert server.count("/api/chat") == 2
    assert caught.value.retryable and caught.value.status == 500
    assert "llama runner process has terminated" in str(caught.value)


def test_hanging_server_times_out():
    with FakeServer(hang_seconds=10) as server:
        server.fail_next("hang", 5)
        with pytest.raises(InferenceError) as caught:
            tag(server, timeout=0.3, retries=1)
        assert server.count("/api/chat") == 2
    assert caught.value.retryable and "no answer within" in str(caught.value)


def test_connection_closed_mid_answer_is_retried():
    with FakeServer() as server:
        server.fail_next("close")
        reply = tag(server)
        assert server.count("/api/chat") == 2
    assert fingerprint_for_rgb(TEST_COLOURS["red"]) in reply.text


def test_error_under_http_200_is_retried_once():
    with FakeServer() as server:
        server.fail_next("error200")
        assert "fp-" in tag(server).text
        server.fail_next("error200", 5)
        with pytest.raises(InferenceError) as caught:
            tag(server, retries=3)
        assert server.count("/api/chat") == 2 + 2
    assert caught.value.retryable
    assert "an error was encountered while running the model" in str(caught.value)


ANSWER = json.dumps({"tags": ["cat"], "description": "A cat."})


def test_an_integer_of_thousands_of_digits_fails_that_answer_in_one_line():
    huge = "9" * 5000  # Python's int() refuses more than 4300 digits
    content = json.dumps(ANSWER)
    whole = f'{{"message": {{"content": {content}}}, "done": true, "eval_count": {huge}}}'
    streamed = (
        f'{{"message": {{"content": "x"}}, "done": false}}\n{{"done": true, "eval_count": {huge}}}'
    )
    for body in (whole, streamed):
        with FakeServer() as server:
            server.fail_next("raw:" + body, 2)  # the retry of a broken answer too
            with pytest.raises(InferenceError, match="number too long to read") as caught:
                tag(server)
        assert caught.value.retryable and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "odd", ["9" * 400, "1e400", "-1e400", "NaN", "-5", "true", '"12"', "null", "[1]", "{}"]
)
def test_a_timing_that_is_no_duration_is_ignored(odd):
    fields = ", ".join(f'"{k}": {odd}' for k in ("total_duration", "eval_duration", "eval_count"))
    content = json.dumps(ANSWER)
    body = (
        f'{{"message": {{"content": {content}}}, "done": true, {fields}, "prompt_eval_count": 7}}'
    )
    with FakeServer() as server:
        server.fail_next("raw:" + body)
        reply = tag(server)
    assert reply.text == ANSWER
    assert reply.timings["prompt_eval_count"] == 7.0
    assert not {"total_duration", "eval_duration", "eval_count"} & set(reply.timings)


def test_streamed_answer_is_joined():
    with FakeServer(force_stream=True) as server:
        streamed = tag(server)
    with FakeServer() as server:
        whole = tag(server)
    assert streamed.text == whole.text
    assert streamed.timings["eval_count"] == whole.timings["eval_count"]


def test_error_line_in_a_stream_is_an_error():
    with FakeServer(force_stream=True) as server:
        server.fail_next("error200", 5)
        with pytest.raises(InferenceError) as caught:
            tag(server)
        assert server.count("/api/chat") == 2
    assert "an error was encountered" in str(caught.value)


def test_stream_closed_mid_answer_is_retried():
    with FakeServer(force_stream=True) as server:
        server.fail_next("close")
        assert "fp-" in tag(server).text
        assert server.count("/api/chat") == 2


def test_garbage_content_is_passed_on_for_parsing_not_retried():
    with FakeServer() as server:
        server.fail_next("garbage")
        reply = tag(server)
        assert server.count("/api/chat") == 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)


def test_batch_keeps_order_and_reports_a_bad_image_in_place():
    colours = [TEST_COLOURS["blue"], TEST_COLOURS["green"]]
    bad = PreparedImage(b"not an image", "image/jpeg", 1, 1, 1, 1)

    async def work(ollama: OllamaBackend) -> list[Any]:
        return await ollama.infer_batch([image(colours[0]), bad, image(colours[1])], REQUEST)

    with FakeServer() as server:
        first, failed, last = run(backend(server.url), work)
    assert fingerprint_for_rgb(colours[0]) in first.text
    assert isinstance(failed, InferenceError) and failed.status == 400
    assert fingerprint_for_rgb(colours[1]) in last.text


def ndjson(*lines: Any) -> httpx.Response:
    return httpx.Response(200, text="".join(json.dumps(line) + "\n" for line in lines))


def test_decode_chat_joins_chunks_until_done():
    reply = decode_chat(
        ndjson(
            {"message": {"content": '{"tags": '}, "done": False},
            {"message": {"content": "[]}"}, "done": False},
            {"message": {"content": ""}, "done": True, "eval_count": 3, "eval_duration": 2e9},
        )
    )
    assert reply.text == '{"tags": []}'
    assert reply.timings == {"eval_count": 3.0, "eval_duration": 2.0}


@pytest.mark.parametrize(
    "response",
    [
        ndjson({"message": {"content": "{"}, "done": False}),  # ended before done
        ndjson({"message": {"content": "{"}, "done": False}, {"error": "runner died"}),
        httpx.Response(200, json={"error": "runner died"}),
        httpx.Response(200, text="<html>proxy</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
)
def test_decode_chat_broken_answers(response: httpx.Response):
    with pytest.raises(BrokenAnswer):
        decode_chat(response)


def test_vision_hints_of_old_servers():
    assert has_vision_hints({"projector_info": {"clip.has_vision_encoder": True}})
    assert has_vision_hints({"model_info": {"mllama.vision.block_count": 32}})
    assert has_vision_hints({"details": {"families": ["llama", "clip"]}})
    assert not has_vision_hints({"model_info": {"llama.block_count": 32}})
    for odd in (
        [],
        "x",
        None,
        3,
        {"model_info": [1]},
        {"details": []},
        {"details": {"families": 1}},
    ):
        assert not has_vision_hints(odd)
