"""Config files, VLMTAG_* variables and API keys, through the installed CLI as a user runs it:
vlmtag.toml with per-command tables and profiles, the user's file, the seed system's
config.yaml and .env used unchanged, precedence tried layer by layer, errors that name the
file and line, and keys that never show up anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fakeserver import FakeServer
from test_cli import paint_folder
from test_hostile import _everything_in

SECRET = "sk-config-5f0e1d2c3b4a69788796a5b4c3d2e1f0"


def run(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLMTAG_")}
    environment.pop("OPENAI_API_KEY", None)
    environment["XDG_CONFIG_HOME"] = str(cwd / "xdg")  # the user's file, for this test only
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vlmtag", *args], cwd=cwd, env=environment,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def settings(cwd: Path, *args: str, env: dict | None = None) -> dict[str, tuple]:
    out = run("config", *args, "--json", cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    return {r["setting"]: (r["value"], r["from"]) for r in json.loads(out.stdout)["settings"]}


def test_precedence_flag_by_flag(tmp_path):
    user = tmp_path / "xdg" / "vlmtag"
    user.mkdir(parents=True)
    (user / "config.toml").write_text(
        'model = "user-model"\ntag_count = 1\nlanguage = "de"\nresize = 128\ntimeout = 11\n'
    )
    (tmp_path / ".env").write_text("TAG_COUNT=2\nLANGUAGE=fr\nSOMETHING_ELSE=x\n")
    (tmp_path / "vlmtag.toml").write_text("[tag]\ntag_count = 3\nresize = [640, 480]\n")
    found = settings(tmp_path)
    assert found["model"][0] == "user-model" and "config.toml:1" in found["model"][1]
    assert found["language"] == ("fr", f"{tmp_path / '.env'}:2 LANGUAGE")
    assert found["tag_count"] == (3, f"{tmp_path / 'vlmtag.toml'}:2 [tag]")
    assert found["resize"][0] == "640x480"
    assert found["timeout"][0] == 11.0
    assert found["backend"] == ("ollama", "default")
    env = {"VLMTAG_TAG_COUNT": "4", "VLMTAG_LANGUAGE": "zh"}
    found = settings(tmp_path, env=env)
    assert found["tag_count"] == (4, "environment VLMTAG_TAG_COUNT")
    # --config replaces ./vlmtag.toml; the environment still wins over it
    (tmp_path / "other.toml").write_text("tag_count = 5\nmodel = 'other'\n")
    found = settings(tmp_path, "--config", "other.toml", env={"VLMTAG_MODEL": "env-model"})
    assert found["tag_count"][0] == 5 and found["model"][0] == "env-model"
    # and the flag wins over everything: a real run says which tag count it used
    pics = tmp_path / "pics"
    paint_folder(pics, 3)
    with FakeServer() as server:
        out = run("tag", str(pics), "--api-base", server.url, "--db", "v.db", "--json",
                  "--tag-count", "6", "--model", "qwen3-vl:4b", cwd=tmp_path, env=env)  # fmt: skip
        assert out.returncode == 0, out.stderr
        asked = json.dumps(server.last_body("/api/chat"))
    assert "up to 6 short tags" in asked and json.loads(out.stdout)["tagged"] == 3


def test_profiles_and_command_tables(tmp_path):
    (tmp_path / "vlmtag.toml").write_text(
        "db = 'lib.db'\n"
        "[tag]\nmodel = 'qwen3-vl:8b'\n"
        "[serve]\nport = 9000\n"
        "[profile.gpu-box]\nbackend = 'openai'\napi_base = ['http://a:8000/v1', 'http://b:8000/v1']\n"
        "[profile.gpu-box.tag]\nworkers = 16\n"
    )
    plain = settings(tmp_path)
    assert plain["model"][0] == "qwen3-vl:8b" and plain["db"][0] == str(tmp_path / "lib.db")
    assert plain["backend"][0] == "ollama"
    boxed = settings(tmp_path, "--profile", "gpu-box")
    assert boxed["backend"][0] == "openai" and boxed["workers"][0] == 16
    assert boxed["api_base"][0] == ["http://a:8000/v1", "http://b:8000/v1"]
    assert settings(tmp_path, "serve")["port"][0] == 9000
    served = settings(tmp_path, "serve", env={"VLMTAG_PROFILE": "gpu-box"})
    assert served["db"][0].endswith("lib.db")
    missing = run("tag", ".", "--profile", "laptop", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "[profile.laptop]" in missing.stderr and "gpu-box" in missing.stderr


def test_what_is_wrong_in_a_file_is_one_line_naming_the_file_and_line(tmp_path):
    cases = {
        "typo.toml": ("[tag]\nmodel = 'm'\ntag_cuont = 3\n", ":3 [tag]", "tag_count"),
        "value.toml": ("\n\ntag_count = 'lots'\n", ":3", "tag_count"),
        "toplevel.toml": ("colour = 'red'\n", ":1", "unknown setting 'colour'"),
        "serve.toml": ("[serve]\nworkers = 4\n", ":2 [serve]", "no setting 'workers'"),
        "broken.toml": ("[tag\n", "not valid TOML", ""),
        "seed.yaml": ("model: x\nlog_level: debug\n", ":2", "unknown setting 'log_level'"),
        "badyaml.yaml": ("model: [x\n", "not valid YAML", ""),
        "workers.yaml": ("max_workers: 0\n", ":1", "workers"),
        "key.toml": ("api_key_env = 'NO_SUCH_VARIABLE_HERE'\n", ":1", "is not set"),
    }
    for name, (text, where, what) in cases.items():
        (tmp_path / name).write_text(text)
        out = run("tag", ".", "--config", name, cwd=tmp_path)
        assert out.returncode == 2, (name, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert name in out.stderr and where in out.stderr and what in out.stderr, out.stderr
    absent = run("tag", ".", "--config", "nothing.toml", cwd=tmp_path)
    assert absent.returncode == 2 and "no such file" in absent.stderr


def test_the_seed_systems_config_yaml_and_env_unchanged_with_an_api_key(tmp_path):
    pics = tmp_path / "photos"
    expected = paint_folder(pics, 4)
    with FakeServer(api_key=SECRET) as server:
        (tmp_path / "config.yaml").write_text(
            f"model: qwen3-vl:4b\nmodel_type: openai\nimage_path: {pics}\nresize: 256x256\n"
            f"tag_count: 5\ngenerate_description: false\ndb_path: {tmp_path / 'seed.db'}\n"
            f"language: en\napi_base: {server.url}/v1\napi_key: {SECRET}\n"
        )
        out = run("tag", "--config", "config.yaml", "--json", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["tagged"] == 4
        # the seed's own entry point, and --reprocess (its name for --force)
        seed = subprocess.run(
            [sys.executable, str(Path(__file__).parents[1] / "src" / "main.py"), "--config",
             "config.yaml", "--reprocess", "--json"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")},
        )  # fmt: skip
        assert seed.returncode == 0, seed.stderr
        assert json.loads(seed.stdout)["tagged"] == 4  # redone: --reprocess is --force
        # the same from a .env, the key from a variable it names
        (tmp_path / "dot").mkdir()
        (tmp_path / "dot" / ".env").write_text(
            f"MODEL_NAME=qwen3-vl:4b\nMODEL_TYPE=openai\nTAG_COUNT=3\nIMAGE_RESIZE=256x256\n"
            f"GENERATE_DESCRIPTION=false\nMAX_WORKERS=2\nAPI_BASE={server.url}/v1\n"
            f"API_KEY={SECRET}\n"
        )
        dot = run("tag", str(pics), "--db", "dot.db", "--json", cwd=tmp_path / "dot")
        assert dot.returncode == 0, dot.stderr
        shown = run("config", cwd=tmp_path / "dot")
        listed = run("config", "--json", "--config", "../config.yaml", cwd=tmp_path / "dot")
        wrong = run("tag", str(pics), "--config", "config.yaml", "--reprocess",
                    "--api-key", "sk-not-the-one-0123456789", cwd=tmp_path)  # fmt: skip
        assert wrong.returncode == 2 and "--api-key" in wrong.stderr
    rows = json.loads(
        run("export", "--format", "json", "--db", str(tmp_path / "seed.db"), cwd=tmp_path).stdout
    )
    assert {r["path"] for r in rows} == set(expected)
    assert all(len(r["tags"]) <= 5 for r in rows)
    outputs = [out, seed, dot, shown, listed, wrong]
    for result in outputs:
        assert SECRET not in result.stdout + result.stderr
    assert "(set, hidden)" in shown.stdout
    for db in ("seed.db", "dot/dot.db"):
        assert SECRET not in _everything_in(tmp_path / db)
        assert SECRET[3:20] not in _everything_in(tmp_path / db)


def test_a_key_for_each_server(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 6)
    with (
        FakeServer(api_key="sk-first-000000000000") as one,
        FakeServer(api_key="sk-second-11111111111") as two,
    ):
        common = ["--backend", "openai", "--model", "qwen3-vl:4b", "--json"]
        both = run("tag", str(pics), "--api-base", one.url, "--api-base", two.url,
                   "--api-key", "sk-first-000000000000", "--api-key", "sk-second-11111111111",
                   "--db", "v.db", *common, cwd=tmp_path)  # fmt: skip
        assert both.returncode == 0, both.stderr
        assert json.loads(both.stdout)["tagged"] == 6
        chat = "/v1/chat/completions"
        assert one.count(chat) and two.count(chat)  # each server took work with its own key
        (tmp_path / "vlmtag.toml").write_text(
            f"[tag]\napi_base = ['{one.url}', '{two.url}']\n"
            "api_key_env = ['FIRST_KEY', 'SECOND_KEY']\n"
        )
        env = {"FIRST_KEY": "sk-first-000000000000", "SECOND_KEY": "sk-second-11111111111"}
        from_file = run("tag", str(pics), "--db", "w.db", *common, cwd=tmp_path, env=env)
        assert from_file.returncode == 0, from_file.stderr
        (tmp_path / "vlmtag.toml").unlink()
        mismatched = run("tag", str(pics), "--api-base", one.url, "--api-base", two.url,
                         "--api-key", "a", "--api-key", "b", "--api-key", "c", "--db", "x.db",
                         *common, cwd=tmp_path)  # fmt: skip
        assert mismatched.returncode == 2 and "3 API keys for 2 servers" in mismatched.stderr


def test_what_a_new_user_got_wrong_is_caught(tmp_path):
    # a profile wins over the rest of its file, its command table included
    (tmp_path / "vlmtag.toml").write_text(
        'language = "de"\n[tag]\nworkers = 4\n[profile.p]\nworkers = 32\n'
    )
    assert settings(tmp_path, "--profile", "p")["workers"][0] == 32
    assert settings(tmp_path)["workers"][0] == 4
    # a top-level language is what `tag` writes in, not a filter of what `export` reads
    assert settings(tmp_path, "export")["language"] == (None, "default")
    assert settings(tmp_path)["language"][0] == "de"
    # values the run would refuse naming a flag nobody typed, refused naming the file
    for text, said in (
        ('resize = "banana"', "not a size"),
        ('language = "xx"', "unknown language"),
        ('backend = "nope"', "no backend"),
        ("tag_count = true", "yes/no"),
        ("model = [1, 2]", "a list"),
        ("api_key = 42", "a key is text"),
        ('prompt_file = "nowhere.toml"', "no prompt file"),
    ):
        (tmp_path / "vlmtag.toml").write_text(text + "\n")
        out = run("config", cwd=tmp_path)
        assert out.returncode == 2 and "vlmtag.toml:1" in out.stderr and said in out.stderr, (
            text, out.stderr,
        )  # fmt: skip
    # a key put where it does not belong is never repeated
    pasted = "sk-proj-PASTEDkey0123456789abc"
    for text in (f'api_key_env = "{pasted}"', f'tag_count = "{pasted}"'):
        (tmp_path / "vlmtag.toml").write_text(text + "\n")
        out = run("config", cwd=tmp_path)
        assert out.returncode == 2 and pasted not in out.stderr and pasted[3:15] not in out.stderr
    (tmp_path / "vlmtag.toml").unlink()
    # relative paths in a file are the file's folder's
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.yaml").write_text("db_path: lib.db\nimage_path: photos\n")
    found = settings(tmp_path, "--config", "sub/config.yaml")
    assert found["db"][0] == str(tmp_path / "sub" / "lib.db")
    assert found["image_paths"][0] == [str(tmp_path / "sub" / "photos")]
    # a huge file or a folder is not a config
    (tmp_path / "big.toml").write_text("model = '" + "x" * 2_000_000 + "'\n")
    big = run("config", "--config", "big.toml", cwd=tmp_path)
    assert big.returncode == 2 and "not a config file" in big.stderr and len(big.stderr) < 300
    assert "is a folder" in run("config", "--config", "sub", cwd=tmp_path).stderr
    # what came from a .env is said before a run
    (tmp_path / ".env").write_text("MODEL_NAME=llava:7b\n")
    note = run("tag", str(tmp_path / "none"), cwd=tmp_path)
    assert "MODEL_NAME from ./.env" in note.stderr
