"""`vlmtag bench --compare FILE`: the same images through several models, side by side.

For each model: success rate, p50/p95 seconds per image, images/s with the chosen workers,
mean keyword count, the share of answers written in the asked language's script, and how
much it agrees with the others (mean Jaccard of keyword sets, image by image). Each model
runs as `vlmtag bench` runs one (a throw-away database), on the same pictures.

The file is TOML (a [[model]] table each) or the seed system's JSON (a list, or {"models":
[...]}) with name, model_name, model_type, api_base, api_key, model_path; a model may also
say `simulate = "SLOTS,SECONDS"` to be a simulated server of its own.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

from vlmtag.config import Settings, normalise_backend
from vlmtag.errors import Interrupted, UsageError, VlmtagError

FIELDS = {
    "name": "name",
    "model_name": "model",
    "model": "model",
    "model_type": "backend",
    "backend": "backend",
    "api_base": "api_base",
    "api_key": "api_key",
    "api_key_env": "api_key_env",
    "model_path": "model_path",
    "simulate": "simulate",
}
MAX_MODELS = 20

# What a keyword written in a language's script looks like (the share in the language).
SCRIPTS = {
    "zh": re.compile(r"[\u4e00-\u9fff]"),
    "ja": re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]"),
    "ko": re.compile(r"[\uac00-\ud7af]"),
    "ru": re.compile(r"[\u0400-\u04ff]"),
}
LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


@dataclass
class Entry:
    name: str
    backend: str | None = None
    model: str | None = None
    api_base: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list, repr=False)
    model_path: str | None = None
    simulate: tuple[int, float] | None = None


def read_entries(path: str) -> list[Entry]:
    from vlmtag.measure.simulate import parse_simulate

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise UsageError(f"--compare {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--compare {path}: cannot read it ({exc})") from None
    if path.lower().endswith(".json"):
        try:
            data: Any = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc})") from None
        items = data.get("models") if isinstance(data, dict) else data
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML ({exc})") from None
        items = data.get("model")
    if not isinstance(items, list) or not items:
        raise UsageError(
            f"{path}: list the models to compare ([[model]] tables in TOML; a JSON list)"
        )
    if len(items) > MAX_MODELS:
        raise UsageError(f"{path}: {len(items)} models; compare at most {MAX_MODELS} at once")
    entries = []
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise UsageError(f"{path}: model {n} is not a table of settings")
        unknown = [k for k in item if k not in FIELDS]
        if unknown:
            raise UsageError(
                f"{path}: model {n} has {unknown[0]!r}; a model has {', '.join(sorted(FIELDS))}"
            )
        values = {FIELDS[k]: v for k, v in item.items()}
        name = str(values.get("name") or values.get("model") or f"model {n}")
        entry = Entry(name=name)
        if values.get("backend"):
            entry.backend = normalise_backend(str(values["backend"]))
        if values.get("model"):
            entry.model = str(values["model"])
        base = values.get("api_base")
        entry.api_base = (
            [str(b) for b in base] if isinstance(base, list) else [str(base)] * bool(base)
        )
        keys = values.get("api_key")
        if values.get("api_key_env"):
            variable = str(values["api_key_env"])
            if not os.environ.get(variable):
                raise UsageError(f"{path}: model {name!r} names {variable}, which is not set")
            keys = os.environ[variable]
        entry.api_keys = (
            [str(k) for k in keys] if isinstance(keys, list) else [str(keys)] * bool(keys)
        )
        entry.model_path = str(values["model_path"]) if values.get("model_path") else None
        if values.get("simulate"):
            entry.simulate = parse_simulate(str(values["simulate"]))
        entries.append(entry)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: two models share a name; give each its own `name`")
    return entries


def entries_of_groups(groups: list[dict[str, Any]]) -> list[Entry]:
    """Models given as flag groups on bench's command line (--backend, --model, ...)."""
    entries = []
    for n, group in enumerate(groups, 1):
        backend = normalise_backend(group["backend"]) if group.get("backend") else None
        name = group.get("model") or backend or f"model {n}"
        if name in {e.name for e in entries}:
            name = f"{name} ({n})"
        entries.append(
            Entry(
                name=name,
                backend=backend,
                model=group.get("model"),
                api_base=list(group.get("api_base", [])),
                api_keys=list(group.get("api_key", [])),
                model_path=group.get("model_path"),
            )
        )
    return entries


def settings_for(base: Settings, entry: Entry) -> Settings:
    """The bench's settings (flags, config) with what the entry names in their place."""
    changes: dict[str, Any] = {}
    if entry.backend:
        changes["backend"] = entry.backend
    if entry.model:
        changes["model"] = entry.model
    if entry.api_base:
        changes["api_base"] = entry.api_base
    if entry.api_keys:
        changes["api_keys"] = entry.api_keys
    if entry.model_path:
        changes["model_path"] = entry.model_path
    chosen = replace(base, **changes)
    if entry.backend and entry.backend != base.backend and not entry.api_base:
        chosen.api_base = []  # another backend: its own default address, not the bench's
    return chosen


async def compare(
    settings: Settings,
    entries: list[Entry],
    count: int,
    image_path: str | None,
    simulate: tuple[int, float] | None,
) -> dict[str, Any]:
    from vlmtag.config import resolve_api_base
    from vlmtag.measure.bench import run_bench

    runs: list[dict[str, Any]] = []
    for entry in entries:
        chosen = settings_for(settings, entry)
        resolve_api_base(chosen)  # a wrong URL in the file: one line before anything runs
        sim = entry.simulate or simulate
        try:
            report = await run_bench(
                chosen, count, image_path, sim, flavour=entry.name if sim else "",
                keep_answers=True,
            )  # fmt: skip
        except Interrupted:
            raise
        except VlmtagError as exc:  # this model cannot run (no server, no such model)
            runs.append({"name": entry.name, "error": str(exc)})
            continue
        report["name"] = entry.name
        runs.append(report)
    return summarise(runs, settings.language)


def summarise(runs: list[dict[str, Any]], language: str) -> dict[str, Any]:
    """The side-by-side table (and the JSON report) from each model's bench report."""
    answered = {r["name"]: r.get("answers", {}) for r in runs if "error" not in r}
    agreement = _agreement(answered)
    rows = []
    for run in runs:
        if "error" in run:
            rows.append({"name": run["name"], "error": run["error"]})
            continue
        given = answered[run["name"]]
        tried = run["tagged"] + run["failed"]
        infer = run.get("stages", {}).get("infer", {})
        total = run.get("stages", {}).get("total", {})
        sets = list(given.values())
        rows.append(
            {
                "name": run["name"],
                "backend": run["backend"],
                "model": run["model"],
                "images": run["images"],
                "tagged": run["tagged"],
                "failed": run["failed"],
                "success_rate": round(run["tagged"] / tried, 3) if tried else 0.0,
                "p50_seconds": total.get("p50_s", infer.get("p50_s")),
                "p95_seconds": total.get("p95_s", infer.get("p95_s")),
                "images_per_second": run["images_per_second"],
                "mean_keywords": round(sum(map(len, sets)) / len(sets), 2) if sets else 0.0,
                "in_language": _in_language(sets, language),
                "agreement": agreement.get(run["name"]),
                "wall_seconds": run["wall_seconds"],
            }
        )
    pairs = {f"{a} ~ {b}": v for (a, b), v in agreement.get("_pairs", {}).items()}
    return {"language": language, "models": rows, "agreement_pairs": pairs}


def jaccard(a: list[str], b: list[str]) -> float:
    x, y = {t.casefold() for t in a}, {t.casefold() for t in b}
    return len(x & y) / len(x | y) if x | y else 1.0


def _agreement(answered: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """Mean Jaccard of keyword sets over the images both models answered: per pair, and per
    model its mean over the others."""
    pairs: dict[tuple[str, str], float] = {}
    for a, b in combinations(answered, 2):
        both = set(answered[a]) & set(answered[b])
        if both:
            scores = [jaccard(answered[a][c], answered[b][c]) for c in both]
            pairs[(a, b)] = round(sum(scores) / len(scores), 3)
    out: dict[str, Any] = {"_pairs": pairs}
    for name in answered:
        mine = [v for (a, b), v in pairs.items() if name in (a, b)]
        out[name] = round(sum(mine) / len(mine), 3) if mine else None
    return out


def _in_language(sets: list[list[str]], language: str) -> float | None:
    """The share of answers whose keywords are mostly written in the language's script
    (Han for zh, kana or Han for ja, Hangul, Cyrillic; Latin letters for the others: a
    script, not a language, so German keywords count as English ones do)."""
    if not sets:
        return None
    script = SCRIPTS.get(language, LATIN)
    hits = 0
    for tags in sets:
        written = [t for t in tags if script.search(t)]
        hits += len(written) * 2 > len(tags)
    return round(hits / len(sets), 3)


def render(report: dict[str, Any]) -> list[str]:
    """The table for a terminal."""
    head = (
        f"{'model':<22}{'ok':>7}{'p50 s':>8}{'p95 s':>8}{'img/s':>8}{'kw':>6}"
        f"{'agree':>7}{'lang':>7}"
    )
    lines = [head]
    for row in report["models"]:
        if "error" in row:
            lines.append(f"{row['name'][:21]:<22}  could not run: {row['error']}")
            continue
        lines.append(
            f"{row['name'][:21]:<22}{row['success_rate']:>7.0%}{_num(row['p50_seconds']):>8}"
            f"{_num(row['p95_seconds']):>8}{row['images_per_second']:>8.2f}"
            f"{row['mean_keywords']:>6.1f}{_pct(row['agreement']):>7}{_pct(row['in_language']):>7}"
        )
    lines.append(
        "ok: share tagged; p50/p95: seconds per image; kw: mean keywords; agree: mean Jaccard "
        f"with the others; lang: answers in {report['language']}'s script"
    )
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
