"""Reading what servers publish about themselves: each documented shape, and any other."""

from __future__ import annotations

import pytest

from vlmtag.models.published import (
    Published,
    from_llamacpp_props,
    from_lmstudio_models,
    from_ollama_show,
    from_openai_models,
    looks_like_file_path,
    queue_from_metrics,
    request_tokens,
)
from vlmtag.run.limiter import Limiter

LLAMA_PROPS = {
    "default_generation_settings": {"n_ctx": 1024, "params": {}},
    "total_slots": 4,
    "model_path": "/models/qwen2-vl.gguf",
    "modalities": {"vision": True, "video": True, "audio": False},
}
LLAMA_MODELS = {
    "models": [{"name": "m.gguf", "model": "m.gguf", "capabilities": ["completion"]}],
    "object": "list",
    "data": [{"id": "m.gguf", "owned_by": "llamacpp", "meta": {"n_ctx": 2048}}],
}


def test_llama_cpp_props_and_models():
    props = from_llamacpp_props(LLAMA_PROPS)
    assert (props.vision, props.context, props.slots) == (True, 1024, 4)
    listed = from_openai_models(LLAMA_MODELS, "m.gguf")
    assert (listed.vision, listed.context) == (False, 2048)
    both = listed.merged(props)
    assert (both.vision, both.context, both.slots) == (False, 2048, 4)  # first said wins


def test_vllm_and_lm_studio_and_ollama():
    vllm = {"data": [{"id": "Qwen/Qwen2.5-VL-7B", "owned_by": "vllm", "max_model_len": 32768}]}
    assert from_openai_models(vllm, "Qwen/Qwen2.5-VL-7B").context == 32768
    lms = {
        "data": [{"id": "a", "type": "llm"}, {"id": "b", "type": "vlm", "max_context_length": 8}]
    }
    assert from_lmstudio_models(lms, "b") == Published(True, 8, source="/api/v0/models")
    assert from_lmstudio_models(lms, "a").vision is False
    assert from_lmstudio_models(lms, "nope") == Published()  # two entries, none named
    show = {
        "capabilities": ["completion", "vision"],
        "model_info": {"qwen3vl.context_length": 4096},
    }
    assert from_ollama_show(show, 8192) == Published(True, 4096, source="/api/show")
    assert from_ollama_show(show, 2048).context == 2048


@pytest.mark.parametrize(
    "body",
    [None, [], "x", 7, {"total_slots": True}, {"total_slots": "4"}, {"total_slots": float("nan")},
     {"modalities": ["vision"]}, {"default_generation_settings": {"n_ctx": -1}},
     {"total_slots": 10**400}, {"data": "x"}, {"data": [None, 3]}, {"models": {"a": 1}}],
)  # fmt: skip
def test_any_other_shape_says_nothing(body):
    for read in (
        from_llamacpp_props,
        lambda b: from_openai_models(b, "m"),
        lambda b: from_lmstudio_models(b, "m"),
        lambda b: from_ollama_show(b, None),
    ):
        facts = read(body)
        assert facts.vision in (None, False) and facts.slots is None
        assert facts.context is None or facts.context > 0


def test_vllm_queue_from_metrics():
    text = (
        "# HELP vllm:num_requests_running Number of requests running\n"
        'vllm:num_requests_running{model_name="m"} 8.0\n'
        'vllm:num_requests_waiting{model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{model_name="other"} 1.0\n'
    )
    assert queue_from_metrics(text) == (8, 4)
    assert queue_from_metrics("llamacpp:requests_processing 2\n") is None
    assert queue_from_metrics("vllm:num_requests_running nan\n") is None


def test_a_queue_the_server_reports_steps_auto_down():
    limiter = Limiter.auto()
    limiter.limit, limiter.active = 16, 16
    limiter.server_queue(running=12, waiting=4)
    assert limiter.limit == 12
    limiter.server_queue(running=12, waiting=0)  # nothing waiting: the guess goes on
    assert limiter.limit == 12
    fixed = Limiter(8)
    fixed.server_queue(running=2, waiting=6)  # --workers N is what the user asked for
    assert fixed.limit == 8


def test_model_ids_that_are_paths():
    for name in ("/models/q.gguf", "q.gguf", "./m", "~/w/x", "C:\\m\\q.gguf", "model.safetensors"):
        assert looks_like_file_path(name), name
    for name in ("qwen3-vl:4b", "Qwen/Qwen2.5-VL-7B-Instruct", "gpt-4o", "tiny-vl", ""):
        assert not looks_like_file_path(name), name


def test_request_tokens_grow_with_the_picture():
    small = request_tokens("x" * 300, (256, 256), 100)
    large = request_tokens("x" * 300, (1024, 1024), 100)
    assert 100 + 100 < small < large
