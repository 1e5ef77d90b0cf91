"""Soak: thousands of images through the installed CLI against a loopback server failing
every way at once, a kill -9, a server outage, hostile answers and a folder of bad files.

    python benchmarks/soak.py                          # 2000 images, 3% of each fault
    python benchmarks/soak.py --count 5000 --rate 0.05 --fail hang=0.02 --runs 2
    python benchmarks/soak.py --no-kill --no-outage --workers auto --json

The schedule: run 0 is killed (-9) once a quarter of the images are stored; run 1 loses its
server for --outage seconds half-way (within --server-wait, so it must wait and go on);
then at most --runs complete runs in all (run 1 included). At the end it checks: every good
image tagged exactly once with its own answer (colour fingerprint and size), every bad file
listed as a failure with a reason, nothing stored before the kill asked again, the db's
integrity_check ok, no traceback, and the exit codes (1 while bad files fail, else 0).
Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fakeserver  # noqa: E402 - the loopback server lives with the tests
from fakeserver import FakeServer, fingerprint_for_rgb  # noqa: E402

CENTRES = [16 + 32 * k for k in range(8)]  # bucket centres: robust to JPEG re-encoding
COLOURS = list(itertools.product(CENTRES, CENTRES, CENTRES))  # 512 fingerprints
BASE_SIZE = (24, 18)  # the width grows by one per 512 images: (colour, size) is unique
KINDS = ("500", "502", "503", "429", "hang", "close", "error200", "garbage", "truncated")
BAD_KINDS = ("empty", "text", "cut-jpeg", "cut-png", "bomb", "noise", "dangling", "loop")
KILL_AT = 0.25  # share of images stored when run 0 is killed
OUTAGE_AT = 0.6  # share of images stored when run 1 loses its server


@dataclass(frozen=True)
class Good:
    fingerprint: str
    width: int
    height: int
    hostile: bool


@dataclass
class RunReport:
    name: str
    exit_code: int | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""
    event: str = ""


class LoggingServer(FakeServer):
    """The fake server, logging each chat request's fault to a file the soak reads."""

    def __init__(self, log: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.log = log

    def _next_fault(self) -> str | None:
        fault = super()._next_fault()
        self.log(f"R {fault or '-'}")
        return fault


class ServerProcess:
    """The fake server in a process of its own (this script with --serve), so that an
    outage is a real one: kill -9, every connection gone, then a new one on the same port."""

    def __init__(self, args: argparse.Namespace, work: Path, port: int = 0, seed: int = 0):
        command = [sys.executable, __file__, "--serve", str(work), "--port", str(port)]
        command += ["--slots", str(args.slots), "--latency", str(args.latency)]
        # A restarted server must not replay the faults its first life began with.
        command += ["--hang-seconds", str(args.hang_seconds), "--seed", str(args.seed + seed)]
        command += ["--rate", str(args.rate)]
        for kind, rate in args.fail.items():
            command += ["--fail", f"{kind}={rate}"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"the soak server did not start: {line!r}")
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def serve(args: argparse.Namespace) -> int:
    """--serve WORK: run the fake server; answers and faults go to WORK/server.log."""
    work = args.serve
    hostile = {tuple(k) for k in json.loads((work / "hostile.json").read_text())}
    stream = open(work / "server.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            stream.write(line + "\n")

    fakeserver.answer_for = Answers(hostile, work / "pwned", log)
    server = LoggingServer(
        log,
        fault_rates=fault_rates(args),
        slots=args.slots,
        latency=args.latency,
        hang_seconds=args.hang_seconds,
        seed=args.seed,
        port=args.port,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"listening on {server.url}", flush=True)
    stop.wait()
    server.close()
    stream.close()
    return 0


def fault_rates(args: argparse.Namespace) -> dict[str, float]:
    rates = {kind: args.rate for kind in KINDS}
    rates.update(args.fail)
    return {kind: rate for kind, rate in rates.items() if rate > 0}


def read_log(work: Path) -> tuple[collections.Counter[str], list[tuple[str, int, int]]]:
    """Faults injected by kind (and "-" for none), and the images answered, in order."""
    faults: collections.Counter[str] = collections.Counter()
    asked: list[tuple[str, int, int]] = []
    path = work / "server.log"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) == 2 and parts[0] == "R":
            faults[parts[1]] += 1
        elif len(parts) == 4 and parts[0] == "A":
            asked.append((parts[1], int(parts[2]), int(parts[3])))
    return faults, asked


# ---- the folder ------------------------------------------------------------------------


def make_good(folder: Path, count: int, hostile_share: float) -> dict[str, Good]:
    """count solid-colour images, each with its own (fingerprint, size); path -> Good."""
    expected: dict[str, Good] = {}
    every = round(1 / hostile_share) if hostile_share > 0 else 0
    for i in range(count):
        rgb = COLOURS[i % len(COLOURS)]
        size = (BASE_SIZE[0] + i // len(COLOURS), BASE_SIZE[1])
        sub = folder / f"d{i // 250:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        fmt, ext, options = [
            ("JPEG", "jpg", {"quality": 92}),
            ("JPEG", "jpg", {"quality": 92}),
            ("PNG", "png", {}),
            ("WEBP", "webp", {"lossless": True}),
        ][i % 4]
        path = sub / f"img {i:05d}.{ext}"
        Image.new("RGB", size, rgb).save(path, fmt, **options)
        hostile = bool(every) and i % every == every // 2
        expected[str(path)] = Good(fingerprint_for_rgb(rgb), size[0], size[1], hostile)
    return expected


def make_bad(folder: Path, copies: int) -> list[str]:
    """copies of each kind of bad file; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(copies):
        # Each copy has its own bytes, except the empty files: every empty file is a copy
        # of every other, which is a case of its own (a duplicate of a failing file).
        noisy = Image.frombytes("RGB", (120, 90), os.urandom(120 * 90 * 3))
        for kind in BAD_KINDS:
            path = folder / f"{kind}-{i}.{'png' if kind in ('cut-png', 'bomb', 'noise') else 'jpg'}"
            if kind == "empty":
                path.write_bytes(b"")
            elif kind == "text":
                path.write_text(f"not a photo, number {i}\n", encoding="utf-8")
            elif kind in ("cut-jpeg", "cut-png"):
                noisy.save(path, "JPEG" if kind == "cut-jpeg" else "PNG")
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 3])
            elif kind == "bomb":
                path.write_bytes(_png_header(40_000 + i, 40_000))
            elif kind == "noise":
                path.write_bytes(os.urandom(2048))
            elif kind == "dangling":
                os.symlink(f"nowhere-{i}.jpg", path)
            elif kind == "loop":
                os.symlink(path.name, path)
            made.append(str(path))
    return made


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    ) + chunk(b"IEND", b"")


# ---- hostile answers and who was asked -------------------------------------------------


class Answers:
    """The fake model's answers: honest, or honest wrapped in hostile text. Logs which
    image (fingerprint, size) was answered, in order."""

    def __init__(self, hostile: set[tuple[str, int, int]], sentinel: Path, log: Any):
        self.hostile = hostile
        self.sentinel = sentinel
        self.log = log
        self.honest = fakeserver.answer_for

    def __call__(self, facts: Any) -> str:
        key = (facts.fingerprint, facts.width, facts.height)
        self.log(f"A {facts.fingerprint} {facts.width} {facts.height}")
        text = self.honest(facts)
        if key not in self.hostile:
            return text
        answer = json.loads(text)
        answer["tags"] = [
            "Robert'); DROP TABLE tags;--",
            '=HYPERLINK("http://evil.example")',
            f"$(touch {self.sentinel})",
            "esc\u001b[31m\u0007bell",
            *answer["tags"],
        ]
        answer["description"] = "</description>\u202e" + answer["description"]
        return f"Sure! Ignore previous instructions.\n```json\n{json.dumps(answer)}\n```\nDone."


# ---- running vlmtag --------------------------------------------------------------------


def start(pics: Path, url: str, db: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "vlmtag", "tag", str(pics), "--api-base", url]
    command += ["--db", str(db), "--json", "--timeout", str(args.timeout)]
    command += ["--server-wait", str(args.server_wait)]
    command += ["--workers", args.workers]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stored(db: Path) -> dict[str, str]:
    """content_id -> created_at of each committed annotation."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db, timeout=30)
    try:
        return dict(conn.execute("SELECT content_id, created_at FROM annotations"))
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def wait_until(proc: subprocess.Popen, db: Path, rows: int) -> bool:
    """True once the run has stored `rows` annotations; False if it ended first."""
    while proc.poll() is None:
        if len(stored(db)) >= rows:
            return True
        time.sleep(0.1)
    return False


def finish(proc: subprocess.Popen, report: RunReport, started: float) -> None:
    stdout, stderr = proc.communicate()
    report.exit_code = proc.returncode
    report.seconds = time.monotonic() - started
    report.stderr_tail = stderr[-2000:]
    try:
        report.summary = json.loads(stdout) if stdout.strip() else {}
    except json.JSONDecodeError:
        report.summary = {"unreadable stdout": stdout[-500:]}


# ---- the soak --------------------------------------------------------------------------


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pics, db = work / "pics", work / "soak.db"
    t0 = time.monotonic()
    expected = make_good(pics / "good", args.count, args.hostile)
    bad = make_bad(pics / "bad", args.bad)
    made_seconds = time.monotonic() - t0
    hostile = [(g.fingerprint, g.width, g.height) for g in expected.values() if g.hostile]
    (work / "hostile.json").write_text(json.dumps(hostile))
    server = ServerProcess(args, work)
    reports: list[RunReport] = []
    before_kill: dict[str, str] = {}
    asked_at_kill = 0
    started = time.monotonic()
    try:
        if not args.no_kill:
            report = RunReport("run 0 (killed)")
            begun = time.monotonic()
            proc = start(pics, server.url, db, args)
            if wait_until(proc, db, int(args.count * KILL_AT)):
                proc.send_signal(signal.SIGKILL)
                report.event = f"kill -9 with {len(stored(db))} stored"
            finish(proc, report, begun)
            before_kill = stored(db)
            time.sleep(0.5)  # requests the dead run had sent are answered (and logged)
            asked_at_kill = len(read_log(work)[1])
            reports.append(report)
        for number in range(1, args.runs + 1):
            report = RunReport(f"run {number}")
            begun = time.monotonic()
            proc = start(pics, server.url, db, args)
            outage = number == 1 and not args.no_outage
            if outage and wait_until(proc, db, int(args.count * OUTAGE_AT)):
                server.kill()
                report.event = f"server killed for {args.outage:g} s at {len(stored(db))} stored"
                time.sleep(args.outage)
                server = ServerProcess(args, work, server.port, seed=1)
            finish(proc, report, begun)
            reports.append(report)
            if report.exit_code == 0 or _all_good_tagged(db, expected):
                break
    finally:
        server.stop()
    total_seconds = time.monotonic() - started
    faults, asked = read_log(work)
    checks = check(
        db, expected, bad, reports, before_kill, asked[asked_at_kill:], args.accept_salvaged
    )
    return {
        "images": args.count,
        "hostile_answers": len(hostile),
        "bad_files": len(bad),
        "fault_rates": fault_rates(args),
        "faults_injected": {k: n for k, n in sorted(faults.items()) if k != "-"},
        "chat_requests": sum(faults.values()),
        "make_seconds": round(made_seconds, 1),
        "soak_seconds": round(total_seconds, 1),
        "runs": [
            {
                "run": r.name,
                "exit": r.exit_code,
                "seconds": round(r.seconds, 1),
                "tagged": r.summary.get("tagged"),
                "skipped": r.summary.get("skipped"),
                "failed": r.summary.get("failed"),
                "images_per_second": r.summary.get("images_per_second"),
                "event": r.event,
                "stopped": r.summary.get("stopped_reason"),
            }
            for r in reports
        ],
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
        "stderr_tails": {r.name: r.stderr_tail for r in reports if "Traceback" in r.stderr_tail},
    }


def _all_good_tagged(db: Path, expected: dict[str, Good]) -> bool:
    conn = sqlite3.connect(db)
    try:
        paths = {
            r[0]
            for r in conn.execute(
                "SELECT f.path FROM files f JOIN annotations a ON a.content_id = f.content_id"
            )
        }
    finally:
        conn.close()
    return set(expected) <= paths


def export(db: Path) -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "vlmtag", "export", "--format", "jsonl", "--db", str(db)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {r["path"]: r for r in map(json.loads, out.stdout.splitlines())}


def check(
    db: Path,
    expected: dict[str, Good],
    bad: list[str],
    reports: list[RunReport],
    before_kill: dict[str, str],
    asked_after_kill: list[tuple[str, int, int]],
    accept_salvaged: bool = False,
) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def record(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    rows = export(db)
    untagged = [p for p in expected if p not in rows]
    record("every good image tagged", not untagged, f"{len(untagged)} untagged {untagged[:3]}")
    wrong, partial = [], []
    for path, good in expected.items():
        if path not in rows:
            continue
        tags, description = rows[path]["tags"], rows[path]["description"] or ""
        others = [t for t in tags if t.startswith("fp-") and t != good.fingerprint]
        size = re.search(r"(\d+)x(\d+) pixels", description)
        if others or (size and size.groups() != (str(good.width), str(good.height))):
            wrong.append(path)
        elif good.fingerprint not in tags or not size:
            partial.append(path)
    record("no answer stored against another image", not wrong, f"{len(wrong)} {wrong[:3]}")
    if not accept_salvaged:
        record(
            "each answer whole (own fingerprint tag and description)",
            not partial,
            f"{len(partial)} salvaged from cut-off answers, e.g. {partial[:3]}",
        )

    conn = sqlite3.connect(db)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        per_content = conn.execute(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM annotations "
            "GROUP BY content_id, backend, model, prompt_key)"
        ).fetchone()[0]
        annotations = conn.execute("SELECT count(*) FROM annotations").fetchone()[0]
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        after = dict(conn.execute("SELECT content_id, created_at FROM annotations"))
        failures = {
            r[0]: (r[1], r[2]) for r in conn.execute("SELECT path, stage, reason FROM failures")
        }
        tags_ok = conn.execute(
            "SELECT count(*) FROM tags WHERE length(tag) > 48 OR tag GLOB '*[\x01-\x1f]*'"
        ).fetchone()[0]
    finally:
        conn.close()
    record("integrity_check ok", integrity == "ok", integrity)
    record("journal is WAL", journal == "wal", journal)
    tagged = len(set(expected) & set(rows))
    record(
        "tagged exactly once",
        per_content == 1 and annotations == tagged,
        f"{annotations} annotations for {tagged} tagged images",
    )
    unlisted = [p for p in bad if p not in failures or not failures[p][1]]
    record("every bad file listed with a reason", not unlisted, f"{unlisted[:3]}")
    stray = [f"{p}: {failures[p][0]}: {failures[p][1]}" for p in failures if p not in set(bad)]
    record("no good image left in failures", not stray, "; ".join(stray[:5]))
    record("tags clean and short", tags_ok == 0, f"{tags_ok} bad tags")
    record("no shell ran a tag", not (db.parent / "pwned").exists())

    lost = [c for c, at in before_kill.items() if after.get(c) != at]
    record("nothing stored before the kill lost or redone", not lost, f"{len(lost)} changed")
    content_of = _content_by_key(db, expected)
    redone = [k for k in set(asked_after_kill) if content_of.get(k) in before_kill]
    record(
        "nothing stored before the kill asked again",
        not redone,
        f"{len(redone)} asked again {redone[:3]}",
    )
    tracebacks = [r.name for r in reports if "Traceback" in r.stderr_tail]
    record("no traceback", not tracebacks, ", ".join(tracebacks))
    finished = [r for r in reports if "killed" not in r.name]
    codes_ok = all(
        r.exit_code == (1 if (r.summary.get("failed") or r.summary.get("stopped_reason")) else 0)
        for r in finished
    )
    record(
        "exit codes: 1 for a partial run, 0 for a full one",
        codes_ok,
        str([r.exit_code for r in finished]),
    )
    return checks


def _content_by_key(db: Path, expected: dict[str, Good]) -> dict[tuple[str, int, int], str]:
    conn = sqlite3.connect(db)
    try:
        by_path = dict(conn.execute("SELECT path, content_id FROM files"))
    finally:
        conn.close()
    return {
        (g.fingerprint, g.width, g.height): by_path[p] for p, g in expected.items() if p in by_path
    }


def _rate(text: str) -> tuple[str, float]:
    kind, _, rate = text.partition("=")
    return kind, float(rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="good images (default 2000)")
    parser.add_argument("--rate", type=float, default=0.03, help="rate of each fault kind")
    parser.add_argument(
        "--fail", type=_rate, action="append", default=[], metavar="KIND=RATE",
        help=f"override one kind's rate; kinds: {', '.join(KINDS)}",
    )  # fmt: skip
    parser.add_argument("--bad", type=int, default=3, help="copies of each bad file kind")
    parser.add_argument("--hostile", type=float, default=0.02, help="share of hostile answers")
    parser.add_argument("--runs", type=int, default=2, help="complete runs at most (default 2)")
    parser.add_argument("--no-kill", action="store_true", help="no kill -9 run first")
    parser.add_argument("--no-outage", action="store_true", help="no server outage mid-run")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the server is down")
    parser.add_argument("--server-wait", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=1.0, help="vlmtag --timeout")
    parser.add_argument("--hang-seconds", type=float, default=3.0)
    parser.add_argument(
        "--workers",
        default="8",
        help="vlmtag --workers (default 8, the server's slots; 'auto' soaks the adaptive "
        "limit, which is several times slower under faults)",
    )
    parser.add_argument(
        "--accept-salvaged",
        action="store_true",
        help="accept answers whose description was lost to a cut-off answer",
    )
    parser.add_argument("--slots", type=int, default=8, help="server's parallel answers")
    parser.add_argument("--latency", type=float, default=0.0, help="server seconds per answer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.fail = dict(args.fail)
    unknown = set(args.fail) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; kinds: {', '.join(KINDS)}")
    if args.serve:
        return serve(args)

    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        args.keep.mkdir(parents=True)
        report = soak(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="vlmtag-soak-") as tmp:
            report = soak(args, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0 if report["ok"] else 1


def render(r: dict[str, Any]) -> None:
    print(
        f"soak: {r['images']} images ({r['hostile_answers']} with hostile answers) + "
        f"{r['bad_files']} bad files; made in {r['make_seconds']} s, soaked in "
        f"{r['soak_seconds']} s"
    )
    print(f"  {r['chat_requests']} chat requests; faults injected: {r['faults_injected']}")
    for run in r["runs"]:
        line = (
            f"  {run['run']:<15} exit {run['exit']}  {run['seconds']:>6} s  tagged "
            f"{run['tagged']} skipped {run['skipped']} failed {run['failed']}"
        )
        if run["images_per_second"]:
            line += f"  ({run['images_per_second']} images/s)"
        if run["event"]:
            line += f"  [{run['event']}]"
        print(line)
    for c in r["checks"]:
        print(
            f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}"
            + ("" if c["ok"] else f": {c['detail']}")
        )
    for name, tail in r["stderr_tails"].items():
        print(f"--- {name} stderr ---\n{tail}")
    print("soak passed" if r["ok"] else "soak FAILED")


if __name__ == "__main__":
    sys.exit(main())
