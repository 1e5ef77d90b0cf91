"""The redactor: what a key, a URL password or an Authorization header looks like by the time
it reaches a message, and that it is masked there: whole, in another case, cut short,
percent-decoded or base64'd."""

from __future__ import annotations

import base64

import pytest

from vlmtag.config import Settings
from vlmtag.redact import Redactor, url_secrets, without_credentials
from vlmtag.run.job import redactor_for

KEY = "sk-proj-Abc123def456GHI789"


@pytest.mark.parametrize(
    "text",
    [
        f"Incorrect API key provided: {KEY}.",
        f"incorrect api key provided: {KEY.lower()}",
        f"INCORRECT API KEY PROVIDED: {KEY.upper()}",
        f"Incorrect API key provided: {KEY[:12]}...",
        f"Incorrect API key provided: {KEY[:15]}\u2026",
        f"the key was {KEY[:-3]}",
    ],
)
def test_a_key_is_masked_whole_in_any_case_and_cut_short(text):
    masked = Redactor([KEY])(text)
    assert "***" in masked
    assert KEY[:10].lower() not in masked.lower()


def test_a_prefix_that_is_not_at_a_cut_and_ordinary_words_stay():
    redact = Redactor([KEY, "hunter2hunter2"])
    assert redact("sk-proj- is how project keys begin") == "sk-proj- is how project keys begin"
    assert redact("hunter2h is not a cut, it goes on") == "hunter2h is not a cut, it goes on"
    assert redact("no secret here") == "no secret here"


def test_url_credentials_as_written_decoded_and_as_basic_auth():
    url = "http://bob:p%40ss%2Fw0rd@gpu-box:11434"
    secrets = url_secrets(url)
    assert {"p%40ss%2Fw0rd", "p@ss/w0rd"} <= set(secrets)
    redact = Redactor()
    redact.add_url(url)
    basic = base64.b64encode(b"bob:p@ss/w0rd").decode()
    for text in (
        "proxy refused p@ss/w0rd",
        "proxy refused p%40ss%2Fw0rd",
        f"Authorization: Basic {basic}",
        f"header was {basic}",
    ):
        assert "w0rd" not in redact(text) and basic not in redact(text), text
    assert redact("Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==") == "Authorization: Basic ***"
    assert redact("authorization: bearer abcdefghijkl") == "authorization: bearer ***"


def test_a_url_without_a_scheme_loses_its_credentials_too():
    assert without_credentials("alice:hunter22@gpu:11434/api") == "gpu:11434/api"
    assert without_credentials("gpu:11434") == "gpu:11434"
    assert without_credentials("http://alice:hunter22@gpu:11434") == "http://gpu:11434"
    assert "hunter22" in url_secrets("alice:hunter22@gpu:11434")


def test_servers_named_by_the_environment_have_their_passwords_masked(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "carol:ollama-pass-1@10.0.0.5:11434")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://dave:openai-pass-2@api.example/v1")
    for redact in (Redactor.from_environment(), redactor_for(Settings(paths=["."]))):
        masked = redact("ollama-pass-1 and openai-pass-2")
        assert "pass-1" not in masked and "pass-2" not in masked


def test_a_scheme_less_api_base_is_masked_in_a_run(monkeypatch):
    settings = Settings(paths=["."], api_base=["erin:erins-secret@box:8000"])
    assert redactor_for(settings)("erins-secret") == "***"


def test_deep_masks_keys_and_values():
    redact = Redactor([KEY])
    assert redact.deep({KEY: [KEY, 1, None], "ok": f"x{KEY}"}) == {
        "***": ["***", 1, None],
        "ok": "x***",
    }


def test_pieces_of_a_key_a_server_echoes_back_are_masked():
    key = "sk-proj-AbCdEf0123456789xyz"
    redact = Redactor([key])
    for echoed in (key[1:], key[:-1], key[:14], key[5:20], "x" + key + "y", key.upper()[2:]):
        shown = redact(f"error: {echoed} is wrong")
        assert shown.startswith("error: ") and shown.endswith(" is wrong") and "***" in shown
        assert not any(key[i : i + 12].lower() in shown.lower() for i in range(len(key) - 11))
    assert key[12:] not in redact(f"key {key[:12]} {key[12:]}")  # split by a space
    import base64

    assert redact(base64.b64encode(key.encode()).decode()) == "***"
    # ordinary words and short pieces stay: masking them would hide the message itself
    assert redact("cat, animal, tabby brown sofa") == "cat, animal, tabby brown sofa"
    assert redact("sk-proj is a prefix") == "sk-proj is a prefix"
