"""The OpenAI-compatible backend against a loopback server speaking /v1 as OpenAI, vLLM,
llama-server and LM Studio do (including what each refuses)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from fakeserver import TEST_COLOURS, FakeServer, fingerprint_for_rgb
from serverkit import image, make_backend, run
from vlmtag.errors import InferenceError, SetupError
from vlmtag.models.base import Backend, BackendOptions, Reply, Request
from vlmtag.models.openai import OpenAIBackend, is_strict_schema, normalise_base

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
RED = TEST_COLOURS["red"]


def backend(url: str, model: str = "qwen3-vl:4b", **options: Any) -> OpenAIBackend:
    return make_backend(OpenAIBackend, url, model, **options)


def tag(server: FakeServer, rgb=RED, **options: Any) -> Reply:
    return run(backend(server.url, **options), lambda b: b.infer(image(rgb), REQUEST))


def just_start(server_url: str, **options: Any) -> OpenAIBackend:
    client = backend(server_url, **options)
    run(client, lambda b: asyncio.sleep(0))
    return client


def test_is_a_backend():
    client = backend("http://127.0.0.1:1")
    assert isinstance(client, Backend)
    assert (client.name, client.batch_size, client.default_workers) == ("openai", 1, 8)


@pytest.mark.parametrize("form", ["{url}", "{url}/", "{url}/v1", "{url}/v1/", "{host}"])
def test_base_url_with_or_without_v1(form: str):
    with FakeServer() as server:
        given = form.format(url=server.url, host=server.url.removeprefix("http://"))
        assert normalise_base(given) == server.url + "/v1"
        client = OpenAIBackend(BackendOptions(model="qwen3-vl:4b", api_base=[given]))
        reply = run(client, lambda b: b.infer(image(RED), REQUEST))
    assert fingerprint_for_rgb(RED) in reply.text


def test_each_answer_is_about_the_image_sent():
    colours = list(TEST_COLOURS.values())

    async def work(client: OpenAIBackend) -> list[Reply]:
        return await asyncio.gather(*(client.infer(image(rgb), REQUEST) for rgb in colours))

    with FakeServer(slots=4) as server:
        replies = run(backend(server.url), work)
        assert server.max_active <= 4
    for rgb, reply in zip(colours, replies, strict=True):
        assert fingerprint_for_rgb(rgb) in json.loads(reply.text)["tags"]


def test_request_follows_the_api():
    with FakeServer() as server:
        reply = tag(server)
        body = server.last_body("/v1/chat/completions")
    assert body["temperature"] == 0 and body["max_tokens"] == 256 and body["stream"] is False
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You tag photos."}
    picture, text = user["content"]
    assert picture["type"] == "image_url"
    assert picture["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert text == {"type": "text", "text": "Tag this photo."}
    response_format = body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "image_tags"
    assert response_format["json_schema"]["schema"] == SCHEMA
    assert response_format["json_schema"]["strict"] is False  # SCHEMA has an open object
    assert reply.timings["prompt_eval_count"] == 20 + 64 * 48 // 784
    assert reply.timings["eval_count"] >= 1


def test_strict_only_for_schemas_openai_accepts_as_strict():
    strict = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["tags"],
        "additionalProperties": False,
    }
    assert is_strict_schema(strict)
    assert not is_strict_schema(SCHEMA)
    assert not is_strict_schema({**strict, "required": []})


def test_key_is_sent_as_bearer():
    with FakeServer(api_key="sk-test-123") as server:
        assert fingerprint_for_rgb(RED) in tag(server, api_key="sk-test-123").text


def test_start_without_a_key_says_set_it():
    with FakeServer(api_key="sk-test-123") as server, pytest.raises(SetupError) as caught:
        just_start(server.url)
    assert "needs an API key" in str(caught.value) and "OPENAI_API_KEY" in str(caught.value)


def test_start_with_a_wrong_key_never_shows_it():
    with FakeServer(api_key="sk-test-123") as server, pytest.raises(SetupError) as caught:
        just_start(server.url, api_key="sk-wrong-456")
    assert "refused the API key" in str(caught.value)
    assert "sk-wrong-456" not in str(caught.value)


def test_key_refused_mid_run_never_shows_it():
    with FakeServer(api_key="sk-test-123") as server:
        client = backend(server.url, api_key="sk-wrong-456")
        with pytest.raises(InferenceError) as caught:
            run(client, lambda b: b.infer(image(RED), REQUEST), start=False)
        assert server.count("/v1/chat/completions") == 1
    assert caught.value.status == 401 and not caught.value.retryable
    assert "sk-wrong-456" not in str(caught.value)


def test_start_without_a_server_says_how_to_start_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SetupError) as caught:
        just_start(f"http://127.0.0.1:{port}")
    assert "cannot reach" in str(caught.value) and "--api-base" in str(caught.value)


def test_start_with_an_unknown_model_lists_the_served_ones():
    models = {"model-a": ["vision"], "model-b": ["vision"]}
    with FakeServer(models=models) as server, pytest.raises(SetupError) as caught:
        just_start(server.url, model="model-c")
    assert "model 'model-c' is not served" in str(caught.value)
    assert "model-a, model-b" in str(caught.value)


def test_model_ids_that_are_no_names_are_skipped():
    listing = (
        '{"object": "list", "data": [{"id": null}, {"id": 7}, {"id": ""}, {"id": "  "},'
        ' {"id": ["x"]}, {"id": {"a": 1}}, "loose", 3, null, {"no": "id"},'
        ' {"id": "model-a"}, {"id": "model-b"}]}'
    )
    with (
        FakeServer(raw_routes={"/v1/models": listing}) as server,
        pytest.raises(SetupError) as caught,
    ):
        just_start(server.url, model="model-c")
    assert str(caught.value).count("available: model-a, model-b. Pass") == 1
    for odd in ["[]", '"models"', "null", '{"data": "x"}', '{"data": [null, 1]}']:
        with FakeServer(raw_routes={"/v1/models": odd}) as server:
            assert fingerprint_for_rgb(RED) in tag(server).text  # no list: nothing to check


def test_one_model_server_that_takes_any_name_is_accepted():
    # llama-server lists its one model but answers to whatever name is asked for.
    with FakeServer(models={"gemma-3-4b.gguf": ["vision"]}, any_model_name=True) as server:
        reply = tag(server, model="whatever")
        assert server.last_body("/v1/chat/completions")["model"] == "whatever"
    assert fingerprint_for_rgb(RED) in reply.text


def test_one_model_server_that_checks_the_name_is_refused():
    # vLLM lists its one model and answers 404 to another name.
    with FakeServer(models={"Qwen/Qwen2.5-VL-3B-Instruct": ["vision"]}) as server:
        with pytest.raises(SetupError) as caught:
            just_start(server.url, model="qwen2.5vl")
        assert server.count("/v1/chat/completions") == 1  # the probe, once
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in str(caught.value)


def test_no_model_named_takes_the_only_one_served():
    with FakeServer(models={"only-one": ["vision"]}) as server:
        client = just_start(server.url, model="")
    assert client.model == "only-one"


def test_unknown_model_at_infer_is_not_retried():
    with FakeServer() as server:
        client = backend(server.url, model="gone")
        with pytest.raises(InferenceError) as caught:
            run(client, lambda b: b.infer(image(RED), REQUEST), start=False)
        assert server.count("/v1/chat/completions") == 1
    assert caught.value.status == 404 and not caught.value.retryable
    assert "check --model" in str(caught.value)


def formats_sent(server: FakeServer) -> list[str | None]:
    return [
        (body.get("response_format") or {}).get("type")
        for path, body in server.bodies
        if path == "/v1/chat/completions"
    ]


def test_rejected_json_schema_falls_back_to_json_object_for_the_run():
    async def work(client: OpenAIBackend) -> list[Reply]:
        first = await client.infer(image(RED), REQUEST)
        second = await client.infer(image(TEST_COLOURS["blue"]), REQUEST)
        return [first, second]

    with FakeServer(reject_response_format=("json_schema",)) as server:
        client = backend(server.url)
        first, second = run(client, work)
        assert formats_sent(server) == ["json_schema", "json_object", "json_object"]
    assert client.shape.format == "json_object"
    assert fingerprint_for_rgb(RED) in first.text
    assert fingerprint_for_rgb(TEST_COLOURS["blue"]) in second.text


@pytest.mark.parametrize("status", [400, 422])
def test_server_without_structured_output_gets_none(status: int):
    rejected = ("json_schema", "json_object")
    with FakeServer(reject_response_format=rejected, reject_status=status) as server:
        reply = tag(server)
        assert formats_sent(server) == ["json_schema", "json_object", None]
    assert fingerprint_for_rgb(RED) in reply.text  # fenced JSON, left to the parser


def test_fallback_under_concurrency_steps_down_once():
    colours = list(TEST_COLOURS.values())

    async def work(client: OpenAIBackend) -> list[Reply]:
        return await asyncio.gather(*(client.infer(image(rgb), REQUEST) for rgb in colours))

    with FakeServer(reject_response_format=("json_schema",), slots=8) as server:
        client = backend(server.url)
        replies = run(client, work)
        sent = formats_sent(server)
    assert client.shape.format == "json_object"  # not past it to none
    assert None not in sent and sent.count("json_object") == len(colours)
    for rgb, reply in zip(colours, replies, strict=True):
        assert fingerprint_for_rgb(rgb) in reply.text


def test_max_tokens_refused_switches_to_max_completion_tokens():
    with FakeServer(reject_max_tokens=True) as server:
        client = backend(server.url)
        reply = run(client, lambda b: b.infer(image(RED), REQUEST))
        body = server.last_body("/v1/chat/completions")
    assert body["max_completion_tokens"] == 256 and "max_tokens" not in body
    assert client.shape.token_field == "max_completion_tokens"
    assert fingerprint_for_rgb(RED) in reply.text


def test_other_bad_request_is_not_retried_nor_adapted():
    with FakeServer() as server:
        server.fail_next("400", 3)
        client = backend(server.url)
        with pytest.raises(InferenceError) as caught:
            run(client, lambda b: b.infer(image(RED), REQUEST))
        assert server.count("/v1/chat/completions") == 1
    assert caught.value.status == 400 and not caught.value.retryable
    assert client.shape.format == "json_schema"


def test_busy_then_answers():
    with FakeServer() as server:
        server.fail_next("503", 2)
        assert fingerprint_for_rgb(RED) in tag(server).text
        assert server.count("/v1/chat/completions") == 3


def test_failing_server_gives_up_after_the_retries():
    with FakeServer() as server:
        server.fail_next("500", 10)
        with pytest.raises(InferenceError) as caught:
            tag(server, retries=1)
        assert server.count("/v1/chat/completions") == 2
    assert caught.value.retryable and caught.value.status == 500


def test_hanging_server_times_out():
    with FakeServer(hang_seconds=10) as server:
        server.fail_next("hang", 5)
        with pytest.raises(InferenceError) as caught:
            tag(server, timeout=0.3, retries=0)
        assert server.count("/v1/chat/completions") == 1
    assert caught.value.retryable and "no answer within" in str(caught.value)


def test_closed_mid_answer_is_retried():
    with FakeServer() as server:
        server.fail_next("close")
        assert fingerprint_for_rgb(RED) in tag(server).text
        assert server.count("/v1/chat/completions") == 2


def test_error_object_under_http_200_is_retried_once():
    with FakeServer() as server:
        server.fail_next("error200", 5)
        with pytest.raises(InferenceError) as caught:
            tag(server, retries=3)
        assert server.count("/v1/chat/completions") == 2
    assert "the model crashed" in str(caught.value)


def completion(content: str, extra: str = "") -> str:
    message = '{"role": "assistant", "content": ' + content + "}"
    return '{"choices": [{"message": ' + message + "}]" + extra + "}"


def test_content_parts_whose_text_is_not_text_add_nothing():
    parts = '[{"type": "text", "text": 5}, {"text": null}, {"text": ["a"]}, {"text": {"x": 1}},'
    parts += ' "loose", 7, {"type": "image_url"}, {"type": "text", "text": "{\\"tags\\": []}"}]'
    with FakeServer() as server:
        server.fail_next("raw:" + completion(parts))
        assert tag(server).text == '{"tags": []}'
        server.fail_next("raw:" + completion('[{"type": "text", "text": 5}]'))
        assert tag(server).text == ""  # nothing to read: the parser fails that image


@pytest.mark.parametrize("odd", ["9" * 400, "1e400", "NaN", "-1", "false", '"3"', "null"])
def test_usage_and_timings_that_are_no_numbers_are_ignored(odd):
    extra = (
        f', "usage": {{"prompt_tokens": {odd}, "completion_tokens": 12}},'
        f' "timings": {{"prompt_ms": {odd}, "predicted_ms": 250}}'
    )
    with FakeServer() as server:
        server.fail_next("raw:" + completion('"{}"', extra))
        reply = tag(server)
    assert reply.timings["eval_count"] == 12.0 and reply.timings["eval_duration"] == 0.25
    assert "prompt_eval_count" not in reply.timings
    assert "prompt_eval_duration" not in reply.timings


def test_an_integer_of_thousands_of_digits_fails_that_answer_in_one_line():
    body = completion('"{}"', ', "usage": {"prompt_tokens": %s}' % ("9" * 5000))
    with FakeServer() as server:
        server.fail_next("raw:" + body, 2)
        with pytest.raises(InferenceError) as caught:
            tag(server)
    assert caught.value.retryable and "\n" not in str(caught.value)


def test_truncated_content_is_passed_on_for_parsing():
    with FakeServer() as server:
        server.fail_next("truncated")
        reply = tag(server)
        assert server.count("/v1/chat/completions") == 1
    assert reply.text.startswith('{"tags"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)


def test_a_server_that_cannot_take_images_is_a_setup_error_not_an_image_failure():
    """Without /props to say so (LM Studio, older llama.cpp), the first answer tells: the lane
    retires instead of failing every image four times."""
    with FakeServer() as server:
        server.fail_next("status:500:image input is not supported - hint: provide the mmproj", 9)
        with pytest.raises(SetupError) as caught:
            tag(server)
        assert server.count("/v1/chat/completions") == 1
    assert "--mmproj" in str(caught.value)


def test_context_overflow_is_one_failure_with_the_fix_first():
    text = "request (1100 tokens) exceeds the available context size (1024 tokens), try increasing"
    with FakeServer() as server:
        server.fail_next(f"status:400:{text}", 9)
        with pytest.raises(InferenceError) as caught:
            tag(server)
        assert server.count("/v1/chat/completions") == 1  # neither retried nor adapted
    message = str(caught.value)
    assert not caught.value.retryable
    assert message.index("-c") < message.index("1100 tokens") and "--resize" in message


def test_finish_reason_is_read():
    body = {"choices": [{"message": {"content": '{"tags": ["a"'}, "finish_reason": "length"}]}
    with FakeServer() as server:
        server.fail_next("raw:" + json.dumps(body))
        reply = tag(server)
    assert reply.cut_off and reply.text.startswith('{"tags"')


def test_a_plain_web_server_is_no_model_server(tmp_path):
    import http.server
    import threading

    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SetupError) as caught:
            just_start(f"http://127.0.0.1:{web.server_port}")
    finally:
        web.shutdown()
    assert "not an OpenAI-compatible server" in str(caught.value)


def test_a_port_that_never_answers_is_checked_once_not_twice():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # takes connections, never answers
    try:
        port = listener.getsockname()[1]
        with pytest.raises(SetupError) as caught:
            just_start(f"http://127.0.0.1:{port}", timeout=0.5)
    finally:
        listener.close()
    assert "no answer within" in str(caught.value)
    assert "attempts" not in str(caught.value)
