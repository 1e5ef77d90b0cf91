"""`vlmtag bench --compare`: the same images through several models, side by side, from a
TOML or the seed system's JSON list; simulated models of their own, a loopback OpenAI server
with a key, one that cannot run; the table and the JSON report checked against what the
servers answered."""

from __future__ import annotations

import json
import subprocess
import sys

from fakeserver import FakeServer
from test_cli import paint_folder
from vlmtag.measure.compare import jaccard, summarise

SECRET = "sk-compare-0a1b2c3d4e5f60718293a4b5"


def bench(*args: str, cwd, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmtag", "bench", *args], cwd=cwd,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_three_simulated_models_and_a_server_side_by_side(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 8)
    with FakeServer(api_key=SECRET) as server:
        (tmp_path / "models.json").write_text(json.dumps([
            {"name": "quick", "model_type": "ollama", "simulate": "4,0.02"},
            {"name": "steady", "simulate": "2,0.05"},
            {"name": "slow", "simulate": "1,0.1"},
            {"name": "fake-openai", "model_name": "qwen3-vl:4b", "model_type": "openai",
             "api_base": server.url + "/v1", "api_key": SECRET},
            {"name": "nowhere", "model_type": "openai", "api_base": "http://127.0.0.1:9/v1"},
        ]))  # fmt: skip
        out = bench("--compare", "models.json", "--image-path", str(pics), "--count", "8",
                    "--output", "report.json", "--workers", "2", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["name"]: r for r in report["models"]}
    assert list(rows) == ["quick", "steady", "slow", "fake-openai", "nowhere"]
    for name in ("quick", "steady", "slow", "fake-openai"):
        row = rows[name]
        assert row["images"] == 8 and row["tagged"] == 8 and row["success_rate"] == 1.0, row
        assert row["p50_seconds"] <= row["p95_seconds"] and row["mean_keywords"] > 0
        assert row["in_language"] == 1.0
    assert "could not" in out.stdout and "error" in rows["nowhere"]
    # the simulated models share their first three words on each picture, and no more
    pairs = report["agreement_pairs"]
    assert 0 < pairs["quick ~ steady"] < 1 and pairs["quick ~ fake-openai"] == 0.0
    assert rows["quick"]["images_per_second"] > rows["slow"]["images_per_second"]
    for name in ("quick", "steady", "slow", "fake-openai"):
        assert f"\n{name}" in "\n" + out.stdout  # a row of the table each
    assert SECRET not in out.stdout + out.stderr + (tmp_path / "report.json").read_text()


def test_a_toml_list_and_what_is_wrong_with_one(tmp_path):
    (tmp_path / "models.toml").write_text(
        '[[model]]\nname = "a"\nsimulate = "2,0.01"\n[[model]]\nname = "b"\nsimulate = "2,0.01"\n'
    )
    out = bench("--compare", "models.toml", "--count", "3", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["name"] for r in report["models"]] == ["a", "b"]
    assert all(r["tagged"] == 3 for r in report["models"])
    for text, said in (
        ('[[model]]\nname = "a"\ncolour = 1\n', "has 'colour'"),
        ("model = 3\n", "list the models"),
        ('[[model]]\nname = "a"\n[[model]]\nname = "a"\n', "share a name"),
        ('[[model]]\nsimulate = "fast"\n', "SLOTS,SECONDS"),
    ):
        (tmp_path / "bad.toml").write_text(text)
        bad = bench("--compare", "bad.toml", "--count", "2", cwd=tmp_path)
        assert bad.returncode == 2 and said in bad.stderr and bad.stderr.count("\n") == 1, (
            bad.stderr
        )


def test_agreement_and_language_share_are_what_the_answers_say():
    runs = [
        {"name": "x", "backend": "b", "model": "m", "images": 2, "tagged": 2, "failed": 0,
         "images_per_second": 1.0, "wall_seconds": 2.0, "stages": {},
         "answers": {"c1": ["猫", "沙发"], "c2": ["狗", "dog"]}},
        {"name": "y", "backend": "b", "model": "m", "images": 2, "tagged": 1, "failed": 1,
         "images_per_second": 1.0, "wall_seconds": 2.0, "stages": {},
         "answers": {"c1": ["猫", "窗户"]}},
    ]  # fmt: skip
    report = summarise(runs, "zh")
    x, y = report["models"]
    assert report["agreement_pairs"] == {"x ~ y": round(jaccard(["猫", "沙发"], ["猫", "窗户"]), 3)}
    assert x["in_language"] == 0.5 and y["in_language"] == 1.0  # "狗, dog": half is not "most"
    assert y["success_rate"] == 0.5 and x["mean_keywords"] == 2.0
    assert jaccard([], []) == 1.0 and jaccard(["A"], ["a"]) == 1.0


def test_models_as_groups_of_flags(tmp_path):
    from vlmtag.cli.tag import split_groups

    groups, rest = split_groups(
        ["--count", "3", "--backend", "openai", "--api-base", "http://a", "--api-key", "k1",
         "--model=m1", "--backend", "ollama", "--model", "m2", "--model", "m3", "--json"]
    )  # fmt: skip
    assert rest == ["--count", "3", "--json"]
    assert groups == [
        {"backend": "openai", "api_base": ["http://a"], "api_key": ["k1"], "model": "m1"},
        {"backend": "ollama", "model": "m2"},
        {"model": "m3"},
    ]
    pics = tmp_path / "pics"
    paint_folder(pics, 4)
    with FakeServer(api_key=SECRET) as one, FakeServer() as two:
        out = bench("--image-path", str(pics), "--count", "4", "--json",
                    "--backend", "openai", "--api-base", one.url, "--api-key", SECRET,
                    "--model", "qwen3-vl:4b",
                    "--backend", "ollama", "--api-base", two.url, "--model", "qwen3-vl:4b",
                    cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["backend"] for r in report["models"]] == ["openai", "ollama"]
    assert all(r["tagged"] == 4 for r in report["models"])
    # the same loopback answers through both protocols: they agree on every keyword
    assert list(report["agreement_pairs"].values()) == [1.0]
    assert SECRET not in out.stdout + out.stderr
