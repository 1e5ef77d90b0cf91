"""`vlmtag tag`, `vlmtag bench` and `vlmtag doctor`: parse flags, run, render."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import click

from vlmtag.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    db_option,
    echo_json,
    friendly_errors,
    redact,
    remember_redactor,
)
from vlmtag.cli.options import NumberRange, model_options, settings_from

TAG_EPILOG = """\b
Exit codes: 0 every image tagged or skipped; 1 some images failed (see `vlmtag failures`),
the servers went away or the database could not take the results; 2 usage or setup error;
130 interrupted (Ctrl-C, SIGTERM, SIGHUP): what was tagged is stored, rerun to go on."""


# What the extra counts of a summary mean, said only for those that are there.
SUMMARY_NOTES = {
    "duplicates": "duplicates share one answer",
    "left": "left: not reached before the run stopped; a rerun does them",
    "missing": "missing: gone from disk, or moved (found again by content)",
}


@click.command(epilog=TAG_EPILOG)
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
@click.option(
    "--force",
    "--reprocess",
    "force",
    is_flag=True,
    help="Redo images already tagged with these settings (--reprocess: the seed's name).",
)
@click.option("--retry-failed", is_flag=True, help="Only retry images that failed before.")
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=None,
    help="Refuse images larger than this many pixels (decompression bombs). Default 100000000.",
)
@click.option(
    "--server-wait",
    type=NumberRange(0, 86400),
    default=None,
    help="Seconds to wait for a server that stopped answering before stopping. Default 60.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where the work runs: local (this machine, the default) or ray (a Ray cluster's "
    "nodes decode and ask; needs the ray extra and the files at the same path on every node).",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="auto|HOST:PORT|local",
    help="The Ray cluster for --executor ray: auto (RAY_ADDRESS, or the one started here with "
    "`ray start --head`; the default), the head's HOST:PORT, or local (a throwaway one here).",
)
@click.option(
    "--ray-actors",
    type=click.IntRange(1, 1024),
    default=None,
    help="Inference actors for --executor ray. Default: one per GPU (transformers), else one "
    "per node (at least 2 for servers).",
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
    and duplicate files are recognised by content and not sent again. Keywords people
    added, rejected or wrote by hand stay, whatever a later run, model or --force says.
    """
    from vlmtag.run.job import redactor_for, run_tag

    settings = settings_from(ctx, [*paths, *image_paths], flags)
    remember_redactor(redactor_for(settings))
    progress = None if (quiet or as_json or not sys.stderr.isatty()) else _bar()
    result = run(run_tag(settings, progress))
    summary = result.summary()
    summary["db"] = settings.db
    if as_json:
        echo_json(summary)
    else:
        render_summary(summary)
    if result.interrupted:
        leave(EXIT_INTERRUPTED)
    leave(EXIT_PARTIAL if (result.failed or result.status != "done") else EXIT_OK)


def run(coro):
    """Run a coroutine to its end (typed errors are turned into lines by friendly_errors)."""
    import asyncio

    return asyncio.run(coro)


def leave(code: int) -> None:
    """Exit with code; a thread still stuck in a read (a hung network share) cannot hold the
    process: after a bounded wait it goes with os._exit, output flushed first."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in stuck:
        thread.join(timeout=2.0)
    if any(t.is_alive() for t in stuck):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _bar():
    from vlmtag.cli.progress import Bar

    return Bar()


def render_summary(s: dict[str, Any]) -> None:
    head = (
        f"tagged {s['tagged']}, skipped {s['skipped']}, failed {s['failed']} "
        f"of {s['found']} images in {s['wall_seconds']:.1f} s"
    )
    if s["tagged"] or s["failed"]:
        head += f" ({s['images_per_second']:.2f} images/s)"
    click.echo(f"{head} - {s['model']} via {s['backend']}")
    extras = [k for k in SUMMARY_NOTES if s.get(k)]
    if extras:
        counts = ", ".join(f"{s[k]} {k}" for k in extras)
        click.echo(f"  {counts} ({'; '.join(SUMMARY_NOTES[k] for k in extras)})")
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
            tried = f" (tried {tried})" if tried else ""
            away = " (stopped answering)" if server["away"] else ""
            click.echo(f"  {server['server']}: {server['workers']} in flight{tried}{away}")
    if s["failures"]:
        shown = "" if s["failed"] <= 5 else ", the first 5"
        click.echo(f"failures ({s['failed']}{shown}; all of them: vlmtag failures):")
        for f in s["failures"][:5]:
            click.echo(redact(f"  {f['path']}: {f['stage']}: {f['reason']}"))
    if s.get("stopped_reason"):
        click.echo(redact(f"stopped: {s['stopped_reason']}"), err=True)
    elif s["interrupted"]:
        click.echo(
            "interrupted: what was tagged is stored; rerun the same command to go on", err=True
        )
    click.echo(f"database: {s['db']}")


def _secs(value: float) -> str:
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


# The flags that name one model; in `bench` given more than once, they make groups to compare.
GROUP_FLAGS = {
    "--backend": "backend",
    "--model-type": "backend",
    "--model": "model",
    "--api-base": "api_base",
    "--api-key": "api_key",
    "--model-path": "model_path",
}


class BenchCommand(click.Command):
    """`bench` with several models on its command line: each --backend (or a --model after
    a group already has one) starts a group; the groups are compared as --compare's are."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        groups, rest = split_groups(args)
        if len(groups) > 1:
            ctx.meta["vlmtag.bench_groups"] = groups
            args = rest
        return super().parse_args(ctx, args)


def split_groups(args: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the model groups, the other arguments); one group or none: nothing to split."""
    groups: list[dict[str, Any]] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in GROUP_FLAGS and (eq or i + 1 < len(args)):
            if not eq:
                value = args[i + 1]
                i += 1
            name = GROUP_FLAGS[flag]
            opens = name == "backend" or (name == "model" and groups and "model" in groups[-1])
            if not groups or opens:
                groups.append({})
            if name in ("api_base", "api_key"):
                groups[-1].setdefault(name, []).append(value)
            else:
                groups[-1][name] = value
        else:
            rest.append(arg)
        i += 1
    return groups, rest


@click.command(cls=BenchCommand)
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
@click.option(
    "--compare",
    "compare_file",
    default=None,
    metavar="FILE",
    help="Run the same images through each model FILE lists (TOML [[model]] tables, or "
    "the seed's JSON) and compare them side by side.",
)
@click.option(
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the report as JSON to this file too.",
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
    compare_file: str | None,
    output: str | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Measure a run on COUNT images: per-stage times, images/s, client vs server time.

    Nothing is written to your database: the run goes to a temporary one.
    """
    from vlmtag.measure.bench import run_bench
    from vlmtag.measure.simulate import parse_simulate
    from vlmtag.run.job import redactor_for

    settings = settings_from(ctx, [], flags)
    remember_redactor(redactor_for(settings))
    simulated = simulate and parse_simulate(simulate)
    groups = ctx.meta.get("vlmtag.bench_groups")
    if compare_file or groups:
        if compare_file and groups:
            from vlmtag.errors import UsageError

            raise UsageError("compare the models of --compare FILE or of the flags, not both")
        _compare(settings, compare_file or groups, count, image_path, simulated, output, as_json)
        return
    report = run(run_bench(settings, count, image_path, simulated))
    if output:
        _write_report(output, report)
    if as_json:
        echo_json(report)
        _exit_if_nothing_tagged(report)
        return
    report["db"] = "(temporary)"
    render_summary(report)
    if report["server_seconds"]:
        click.echo(f"server time (sum over requests): {report['server_seconds']:.2f} s")
    if "ideal_seconds" in report:
        sim = report["simulated"]
        click.echo(
            f"simulated server {sim['slots']} slots x {sim['seconds']} s: ideal "
            f"{report['ideal_seconds']:.2f} s, vlmtag {report['wall_seconds']:.2f} s "
            f"(efficiency {report['efficiency']:.0%})"
        )
    _exit_if_nothing_tagged(report)


def _compare(settings, path, count, image_path, simulated, output, as_json) -> None:
    from vlmtag.measure.compare import compare, entries_of_groups, read_entries, render
    from vlmtag.run.job import redactor_for

    entries = read_entries(path) if isinstance(path, str) else entries_of_groups(path)
    redactor = redactor_for(settings)
    for entry in entries:  # the file's keys are never shown either
        for key in entry.api_keys:
            redactor.add(key)
    remember_redactor(redactor)
    report = run(compare(settings, entries, count, image_path, simulated))
    if output:
        _write_report(output, report)
    if as_json:
        echo_json(report)
    else:
        for line in render(report):
            click.echo(redact(line))
    if not any(row.get("tagged") for row in report["models"]):
        sys.exit(1)


def _write_report(path: str, report: dict[str, Any]) -> None:
    import json

    from vlmtag.output.files import replacing

    with replacing(path) as out:
        out.write(redact(json.dumps(report, ensure_ascii=False, indent=2)) + "\n")


def _exit_if_nothing_tagged(report: dict[str, Any]) -> None:
    """A bench whose every image failed measured nothing: exit 1, as `tag` does."""
    if report.get("failed") and not report.get("tagged"):
        sys.exit(1)


@click.command()
@model_options
@click.option("--no-parallel", is_flag=True, help="Do not measure parallelism (one request).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@friendly_errors
def doctor(ctx: click.Context, no_parallel: bool, as_json: bool, **flags: Any) -> None:
    """Check the server and model, measure how many requests it runs at once, advise settings.

    Sends a few small test images (at most 1 + 2 + 4 + ... + 32 requests).
    """
    from vlmtag.measure.doctor import examine_all
    from vlmtag.run.job import redactor_for

    settings = settings_from(ctx, [], flags)
    remember_redactor(redactor_for(settings))
    reports = run(examine_all(settings, measure_parallel=not no_parallel))
    if as_json:
        echo_json([r.as_dict() for r in reports])
    for r in reports if not as_json else []:
        click.echo(redact(f"{r.server} ({r.backend}, {r.model})"))
        for what, ok, detail in r.checks:
            click.echo(redact(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}"))
        if r.latency is not None:
            rates = ", ".join(f"{n}: {v:.2f}/s" for n, v in r.throughput.items())
            click.echo(f"  latency {r.latency:.2f} s; images/s by requests in flight: {rates}")
            click.echo(f"  runs {r.parallel} at once" + (f"; model {r.gpu}" if r.gpu else ""))
        for line in r.advice:
            click.echo(f"  advice: {line}")
    if any(not ok for r in reports for _, ok, _ in r.checks):
        ctx.exit(EXIT_USAGE)
