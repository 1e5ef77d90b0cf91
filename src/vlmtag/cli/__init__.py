"""The command line: parse flags, call the library, render the result. Nothing else.

Heavy modules (httpx, Pillow, torch) are imported inside commands so `vlmtag --help` is fast.
Typed errors become one line on stderr and an exit code, here and nowhere else.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from click.core import ParameterSource

from vlmtag import __version__
from vlmtag.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    db_option,
    fail,
    friendly_errors,
    open_store,
)


class WorkersType(click.ParamType):
    """--workers: a number, or auto."""

    name = "workers"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).lower() == "auto":
            return 0 if str(value).lower() == "auto" else value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if not 1 <= number <= 1024:
            self.fail(f"{value!r} is not a number from 1 to 1024, or auto", param, ctx)
        return number


WORKERS = WorkersType()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlmtag")
def cli() -> None:
    """Tag and describe every image in a folder with a vision-language model.

    Results go to an SQLite database; reruns only do new work.

    \b
    Quick start:
      vlmtag tag ~/Pictures                       # Ollama on localhost, qwen3-vl:4b
      vlmtag tag ~/Pictures --backend builtin     # offline, CPU, no server
      vlmtag export --format jsonl
    """


def model_options(f):
    """The flags that choose the model and what to ask it: shared by tag and bench."""
    for option in reversed(
        [
            click.option(
                "--backend",
                "--model-type",
                "backend",
                default=None,
                metavar="NAME",
                help="ollama (default), openai (vLLM, llama.cpp, LM Studio, SGLang, OpenAI), "
                "builtin (offline CPU classifier), transformers (alias: local).",
            ),
            click.option(
                "--model",
                default=None,
                help="Model name. Default: qwen3-vl:4b for Ollama; for openai, the one model "
                "the server serves.",
            ),
            click.option(
                "--api-base",
                "api_base",
                multiple=True,
                metavar="URL",
                help="Server URL; repeat or comma-separate for several servers. Default: "
                "http://localhost:11434 (ollama), http://localhost:8000/v1 (openai).",
            ),
            click.option(
                "--model-path",
                default=None,
                type=click.Path(),
                help="Local model folder for --backend transformers.",
            ),
            click.option(
                "--preset",
                type=click.Choice(["fast", "balanced", "quality"]),
                default=None,
                help="The seed's plans; explicit flags override (see README).",
            ),
            click.option(
                "--workers",
                type=WORKERS,
                default=None,
                metavar="N|auto",
                help="Requests in flight per server. Default auto: found as the run goes "
                "(1 for a server that runs one request at a time, dozens for vLLM).",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(1, 1024),
                default=None,
                help="Images per batch for in-process backends (builtin, transformers).",
            ),
            click.option(
                "--resize",
                default=None,
                metavar="WxH",
                help="Fit images inside this box before sending (aspect kept, never upscaled): "
                "512x512, 768, or none. Default 512x512.",
            ),
            click.option(
                "--tag-count",
                type=click.IntRange(1, 200),
                default=None,
                help="At most this many tags per image. Default 20.",
            ),
            click.option(
                "--description/--no-description",
                default=None,
                help="Ask for a one or two sentence description too. Default on (off for builtin).",
            ),
            click.option(
                "--language", default=None, help="Language of tags and description: en, zh, ..."
            ),
            click.option(
                "--timeout",
                type=click.FloatRange(1, 86400),
                default=None,
                help="Seconds to wait for one answer. Default 300.",
            ),
        ]
    ):
        f = option(f)
    return f


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option(
    "--image-path",
    "image_paths",
    multiple=True,
    type=click.Path(),
    help="Folder or image to tag (the seed's spelling; same as PATHS).",
)
@db_option
@model_options
@click.option("--force", is_flag=True, help="Redo images already tagged with these settings.")
@click.option("--retry-failed", is_flag=True, help="Only retry images that failed before.")
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=None,
    help="Refuse images larger than this many pixels (decompression bombs). Default 100000000.",
)
@click.option(
    "--server-wait",
    type=click.FloatRange(0, 86400),
    default=None,
    help="Seconds to wait for a server that stopped answering before stopping. Default 60.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
@friendly_errors
def tag(
    ctx: click.Context,
    paths: tuple[str, ...],
    image_paths: tuple[str, ...],
    as_json: bool,
    quiet: bool,
    **flags: Any,
) -> None:
    """Tag (and describe) every image under PATHS and store the results.

    Images already tagged with the same model and settings are skipped; renamed, moved
    and duplicate files are recognised by content and not sent again.

    \b
    Exit codes: 0 every image tagged or skipped; 1 some images failed (see
    `vlmtag failures`) or the server went away; 2 usage or setup error; 130 interrupted.
    """
    from vlmtag.run.job import run_tag

    settings = _settings(ctx, [*paths, *image_paths], flags)
    progress = None if (quiet or as_json or not sys.stderr.isatty()) else _bar()
    result = _run(run_tag(settings, progress))
    summary = result.summary()
    summary["db"] = settings.db
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        _render_summary(summary)
    if result.interrupted:
        ctx.exit(EXIT_INTERRUPTED)
    ctx.exit(EXIT_PARTIAL if (result.failed or result.stopped_reason) else EXIT_OK)


def _settings(ctx: click.Context, paths: list[str], flags: dict[str, Any]):
    import os

    from vlmtag.config import Settings, apply_preset, normalise_backend, parse_resize
    from vlmtag.library.db import default_db_path

    explicit = {
        name
        for name in flags
        if ctx.get_parameter_source(name)
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    settings = Settings(paths=paths)
    settings.backend = normalise_backend(flags["backend"] or "ollama")
    settings = apply_preset(settings, flags["preset"], explicit)
    for name, value in flags.items():
        if name in {"preset", "backend"} or value is None or name not in explicit:
            continue
        if name == "resize":
            value = parse_resize(value)
        elif name == "api_base":
            value = list(value)
        setattr(settings, name, value)
    settings.db = os.path.abspath(settings.db or str(default_db_path()))
    if settings.backend == "openai":
        settings.api_key = os.environ.get("OPENAI_API_KEY") or None
    if settings.language:
        settings.language = settings.language.lower()
    return settings


def _run(coro):
    """Run a coroutine; typed errors become one line on stderr and an exit code."""
    import asyncio

    from vlmtag.errors import VlmtagError

    try:
        return asyncio.run(coro)
    except VlmtagError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        click.echo("vlmtag: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _bar():
    from vlmtag.cli.progress import Bar

    return Bar()


def _render_summary(s: dict[str, Any]) -> None:
    head = (
        f"tagged {s['tagged']}, skipped {s['skipped']}, failed {s['failed']} "
        f"of {s['found']} images in {s['wall_seconds']:.1f} s"
    )
    if s["tagged"] or s["failed"]:
        head += f" ({s['images_per_second']:.2f} images/s)"
    click.echo(f"{head} - {s['model']} via {s['backend']}")
    extras = [f"{s[k]} {k}" for k in ("duplicates", "missing") if s[k]]
    if extras:
        click.echo(
            "  " + ", ".join(extras) + " (duplicates share one answer; missing: gone from disk)"
        )
    click.echo(f"  {'stage':<8}{'total':>10}{'p50':>10}{'p95':>10}{'images':>8}")
    for stage, t in s["stages"].items():
        p50 = _secs(t["p50_s"]) if "p50_s" in t else ""
        p95 = _secs(t["p95_s"]) if "p95_s" in t else ""
        click.echo(
            f"  {stage:<8}{_secs(t['total_s']):>10}{p50:>10}{p95:>10}{t.get('count', ''):>8}"
        )
    for server in s.get("servers") or []:
        if len(s["servers"]) > 1 or len(server["workers_tried"]) > 1:
            tried = " -> ".join(map(str, server["workers_tried"]))
            away = " (stopped answering)" if server["away"] else ""
            click.echo(f"  {server['server']}: {server['workers']} in flight (tried {tried}){away}")
    if s["failures"]:
        click.echo(f"failures ({s['failed']}; all of them: vlmtag failures):")
        for f in s["failures"][:5]:
            click.echo(f"  {f['path']}: {f['stage']}: {f['reason']}")
    if s.get("stopped_reason"):
        click.echo(f"stopped: {s['stopped_reason']}", err=True)
    elif s["interrupted"]:
        click.echo(
            "interrupted: what was tagged is stored; rerun the same command to go on", err=True
        )
    click.echo(f"database: {s['db']}")


def _secs(value: float) -> str:
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


@cli.command()
@click.option(
    "--image-path",
    type=click.Path(),
    default=None,
    help="Folder of images to use. Default: synthetic 12 MP JPEGs.",
)
@click.option("--count", type=click.IntRange(1), default=20, help="How many images. Default 20.")
@click.option(
    "--simulate",
    default=None,
    metavar="SLOTS,SECONDS",
    help="Use a simulated server with SLOTS parallel slots and SECONDS per request "
    "(no GPU needed), e.g. 4,0.25.",
)
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@friendly_errors
def bench(
    ctx: click.Context,
    image_path: str | None,
    count: int,
    simulate: str | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Measure a run on COUNT images: per-stage times, images/s, client vs server time.

    Nothing is written to your database: the run goes to a temporary one.
    """
    from vlmtag.measure.bench import run_bench
    from vlmtag.measure.simulate import parse_simulate

    settings = _settings(ctx, [], flags)
    report = _run(run_bench(settings, count, image_path, simulate and parse_simulate(simulate)))
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    report["db"] = "(temporary)"
    _render_summary(report)
    if report["server_seconds"]:
        click.echo(f"server time (sum over requests): {report['server_seconds']:.2f} s")
    if "ideal_seconds" in report:
        sim = report["simulated"]
        click.echo(
            f"simulated server {sim['slots']} slots x {sim['seconds']} s: ideal "
            f"{report['ideal_seconds']:.2f} s, vlmtag {report['wall_seconds']:.2f} s "
            f"(efficiency {report['efficiency']:.0%})"
        )


# ---- read back ---------------------------------------------------------------------------


@cli.command()
@model_options
@click.option("--no-parallel", is_flag=True, help="Do not measure parallelism (one request).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@friendly_errors
def doctor(ctx: click.Context, no_parallel: bool, as_json: bool, **flags: Any) -> None:
    """Check the server and model, measure how many requests it runs at once, advise settings.

    Sends a few small test images (at most 1 + 2 + 4 + ... + 32 requests).
    """
    from vlmtag.measure.doctor import examine
    from vlmtag.models.prompts import build_request
    from vlmtag.run.job import make_backends

    settings = _settings(ctx, [], flags)
    request = build_request(
        tag_count=settings.tag_count,
        description=settings.description is not False,
        language=settings.language,
    )

    async def check_all():
        reports = []
        for backend in make_backends(settings):
            try:
                reports.append(await examine(backend, request, measure_parallel=not no_parallel))
            finally:
                await backend.close()
        return reports

    reports = _run(check_all())
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], ensure_ascii=False, indent=2))
    for r in reports if not as_json else []:
        click.echo(f"{r.server} ({r.backend}, {r.model})")
        for what, ok, detail in r.checks:
            click.echo(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}")
        if r.latency is not None:
            rates = ", ".join(f"{n}: {v:.2f}/s" for n, v in r.throughput.items())
            click.echo(f"  latency {r.latency:.2f} s; images/s by requests in flight: {rates}")
            click.echo(f"  runs {r.parallel} at once" + (f"; model {r.gpu}" if r.gpu else ""))
        for line in r.advice:
            click.echo(f"  advice: {line}")
    if any(not ok for r in reports for _, ok, _ in r.checks):
        ctx.exit(EXIT_USAGE)


@cli.command()
@click.argument("path", type=click.Path())
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show(path: str, db: str | None, as_json: bool) -> None:
    """Show what is stored for one image: tags and description of each model."""
    import os

    store = open_store(db)
    path = os.path.abspath(path)
    file_row = store.file_row(path)
    if file_row is None:
        fail(f"{path} is not in the database; tag it first with `vlmtag tag {path}`", 1)
    annotations = store.annotations_for_path(path)
    if as_json:
        payload = {
            "path": path,
            "content_id": file_row["content_id"],
            "present": bool(file_row["present"]),
            "other_paths": [p for p in store.paths_of(file_row["content_id"]) if p != path],
            "annotations": annotations,
        }
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    click.echo(path + ("" if file_row["present"] else "  (gone from disk)"))
    if not annotations:
        click.echo("  not tagged yet")
    for a in annotations:
        click.echo(f"  {a['model']} via {a['backend']} ({a['created_at']}):")
        click.echo("    tags: " + ", ".join(a["tags"]))
        if a["description"]:
            click.echo("    description: " + a["description"])


@cli.command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def failures(db: str | None, as_json: bool) -> None:
    """List images that failed, with the stage and the reason. Retry: tag --retry-failed."""
    store = open_store(db)
    rows = store.failures()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for r in rows:
        click.echo(f"{r['path']}\t{r['stage']}\t{r['reason']}\t(attempts: {r['attempts']})")
    if not rows:
        click.echo("no failures", err=True)


def _register_commands() -> None:
    """Commands that live in their own modules (they import only click at the top)."""
    from importlib import import_module

    for module, names in COMMAND_MODULES:
        try:
            mod = import_module(module)
        except ModuleNotFoundError as exc:  # pragma: no cover - a broken install
            if exc.name != module:
                raise
            continue
        for name in names:
            cli.add_command(getattr(mod, name))


# (module, click commands it defines), registered on the `vlmtag` group.
COMMAND_MODULES: list[tuple[str, list[str]]] = [
    ("vlmtag.cli.find", ["search", "tags"]),
    ("vlmtag.cli.export", ["export"]),
]


def main() -> None:
    cli(prog_name="vlmtag")


_register_commands()

if __name__ == "__main__":
    main()
