"""vlmtag bench, the seed's src/benchmark.py, the simulated server and vlmtag doctor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fakeserver import FakeServer
from vlmtag.measure.simulate import SimulatedProcess, parse_simulate

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_bench_simulated_reports_stages_and_efficiency():
    out = run("-m", "vlmtag", "bench", "--simulate", "2,0.05", "--count", "6", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["tagged"] == 6 and report["synthetic"] is True
    assert report["ideal_seconds"] == pytest.approx(0.15)
    assert 0 < report["efficiency"] <= 1.0
    assert {"hash", "decode", "infer"} <= set(report["stages"])
    assert report["server_seconds"] == pytest.approx(6 * 0.05, rel=0.01)


def test_seed_benchmark_entry_against_an_ollama_server(photos_dir):
    with FakeServer() as server:
        out = run(
            "src/benchmark.py",
            "--image-path",
            str(photos_dir),
            "--count",
            "3",
            "--model",
            "qwen3-vl:4b",
            "--api-base",
            server.url,
        )
        assert out.returncode == 0, out.stderr
        assert server.count("/api/chat") == 3
    assert "tagged 3" in out.stdout and "infer" in out.stdout


def test_simulated_server_queues_beyond_its_slots():
    import asyncio
    import time

    import httpx

    async def burst(url: str) -> float:
        body = {"model": "simulated", "messages": [{"role": "user", "content": "x"}]}
        async with httpx.AsyncClient(base_url=url) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(client.post("/api/chat", json=body) for _ in range(4)))
            return time.perf_counter() - t0

    with SimulatedProcess(2, 0.2) as sim:
        wall = asyncio.run(burst(sim.url))
    assert wall >= 0.4  # 4 requests on 2 slots take two rounds


def test_parse_simulate():
    assert parse_simulate("4,0.25") == (4, 0.25)
    from vlmtag.errors import UsageError

    with pytest.raises(UsageError):
        parse_simulate("four")


def test_doctor_measures_parallelism_and_advises():
    with SimulatedProcess(4, 0.2) as sim:
        out = run("-m", "vlmtag", "doctor", "--api-base", sim.url, "--model", "simulated", "--json")
    assert out.returncode == 0, out.stderr
    [report] = json.loads(out.stdout)
    assert report["parallel"] == 4
    assert all(c["ok"] for c in report["checks"])
    assert report["advice"]


def test_doctor_unknown_model_fails_with_the_fix():
    with FakeServer() as server:
        out = run("-m", "vlmtag", "doctor", "--api-base", server.url, "--model", "nope:1b")
    assert out.returncode == 2
    assert "ollama pull nope:1b" in out.stdout and "Traceback" not in out.stderr


def test_gpu_share_reads_an_api_ps_of_any_shape():
    from vlmtag.measure.doctor import gpu_share

    one = {"models": [{"name": "m:1b", "size": 2**31, "size_vram": 2**30}]}
    assert gpu_share(one, "m:1b") == "50% in GPU memory (1.0 GiB)"
    assert "CPU only" in gpu_share({"models": [{"model": "m:1b", "size": 5}]}, "m:1b")
    for odd in (
        [],
        "x",
        None,
        {"models": "m:1b"},
        {"models": [None, 3, "m:1b", ["m:1b"]]},
        {"models": [{"name": "m:1b", "size_vram": "lots"}]},
        {"models": [{"name": "m:1b", "size": -1, "size_vram": float("nan")}]},
        {"models": [{"name": "m:1b", "size": 10**400, "size_vram": 10**400}]},
        {"models": [{"name": ["m:1b"], "size_vram": 1}]},
    ):
        assert gpu_share(odd, "m:1b") is None, odd
