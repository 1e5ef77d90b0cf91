"""What every command shares: options, opening the library, and errors as one line.

Typed errors become one line on stderr and their exit code here and nowhere else; so do a
damaged database, a closed pipe and, as a last resort, a bug (VLMTAG_DEBUG=1 shows its
traceback). Every line goes through the redactor first: no key or password is ever printed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sqlite3
import sys
from typing import Any

import click

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # stop a command as Ctrl-C does
REDACTOR_KEY = "vlmtag.redact"

DB_HELP = (
    "SQLite database file. Default: $VLMTAG_DB, else vlmtag.db in your data folder "
    "(~/.local/share/vlmtag on Linux, ~/Library/Application Support/vlmtag on macOS)."
)
LANGUAGE_HELP = "Keywords in this language (en, zh, ...). Default: each image's newest."


def friendly_errors(f):
    """Errors from anywhere in a command: one line on stderr and an exit code."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from vlmtag.errors import VlmtagError

        try:
            return f(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except VlmtagError as exc:
            fail(str(exc), exc.exit_code)
        except sqlite3.DatabaseError as exc:
            from vlmtag.library.db import store_error

            fail(str(store_error(_db_of(kwargs), exc)), EXIT_USAGE)
        except KeyboardInterrupt as exc:
            fail(
                f"stopped by {exc}" if isinstance(exc, Stopped) else "interrupted", EXIT_INTERRUPTED
            )
        except ModuleNotFoundError as exc:  # run with a Python that has not got the deps
            fail(
                f"a module vlmtag needs is not installed ({exc.name}); install vlmtag with "
                "pip install -e . (or its extra), or run it with the Python it is installed in",
                EXIT_USAGE,
            )
        except BrokenPipeError:
            _quiet_exit()
        except Exception as exc:  # noqa: BLE001 - the last resort: a bug, in one line
            if os.environ.get("VLMTAG_DEBUG"):
                raise
            fail(
                f"internal error ({type(exc).__name__}: {exc}); please report it, with the "
                "traceback that VLMTAG_DEBUG=1 shows",
                EXIT_PARTIAL,
            )

    return wrapper


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, as Ctrl-C raises KeyboardInterrupt:
    every `finally` and cleanup runs (an export's temporary file is removed)."""


def stop_on_signals(ctx: click.Context) -> None:
    """SIGTERM and SIGHUP stop this command as Ctrl-C does, until its context closes.

    A signal the parent ignores (SIGHUP under nohup) stays ignored. Commands that handle
    signals themselves (tag, bench: run/control.py) do not call this.
    """

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        try:
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread (an embedding program): leave them be
            break

    def restore() -> None:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(sig, handler)

    ctx.call_on_close(restore)


class _WarningLine(logging.Handler):
    """The library's warnings as one line each on stderr, redacted and escaped like errors."""

    def emit(self, record: logging.LogRecord) -> None:
        from vlmtag.text import printable

        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a warning that cannot be formatted is not worth a crash
            message = str(record.msg)
        click.echo(f"vlmtag: warning: {printable(redact(message))}", err=True)


def show_warnings() -> None:
    """Print the library's warnings (a server that names its model by a path, a context too
    small for the request) for this command; info and debug stay quiet."""
    logger = logging.getLogger("vlmtag")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))


def fail(message: str, code: int = EXIT_USAGE):
    from vlmtag.text import printable

    # Whatever the message quotes (a server's answer, a name) cannot break the one line or
    # steer the terminal.
    click.echo(f"vlmtag: error: {printable(redact(message))}", err=True)
    sys.exit(code)


def redact(text: str) -> str:
    ctx = click.get_current_context(silent=True)
    redactor = ctx.find_root().meta.get(REDACTOR_KEY) if ctx is not None else None
    if redactor is None:
        from vlmtag.redact import Redactor

        redactor = Redactor.from_environment()
    return redactor(text)


def remember_redactor(redactor: Any) -> None:
    """The redactor of this command's settings (its key, URL passwords) for every message."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().meta[REDACTOR_KEY] = redactor


def _db_of(kwargs: dict[str, Any]) -> str:
    return str(kwargs.get("db") or os.environ.get("VLMTAG_DB") or "the database")


def _quiet_exit() -> None:
    """stdout went away (`vlmtag search cat | head`): stop without a word."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_OK)


def plural(n: int, word: str, many: str | None = None) -> str:
    """ "1 keyword", "2 keywords" (or the `many` form given)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def db_option(f):
    return click.option("--db", "db", type=click.Path(dir_okay=False), help=DB_HELP)(f)


def language_option(f):
    return click.option("--language", default=None, metavar="CODE", help=LANGUAGE_HELP)(f)


def language_code(value: str | None) -> str | None:
    """A language as the database keeps it ("zh_CN" -> "zh"); UsageError if unknown."""
    if value is None:
        return None
    from vlmtag.models.prompts import resolve_language

    return resolve_language(value)


def open_library(db: str | None, *, create: bool = False):
    from vlmtag.api import Library

    return Library.open(db, create=create)


def echo_paths(paths: list[str], print0: bool) -> None:
    """Paths one per line (non-UTF-8 names shown escaped), or as raw bytes ended by NUL for
    `xargs -0`, which must get the real name to find the file."""
    if print0:
        out = sys.stdout.buffer
        out.write(b"".join(os.fsencode(p) + b"\0" for p in paths))
        out.flush()
        return
    from vlmtag.text import display_path

    # One write: a line at a time costs seconds for a hundred thousand paths.
    click.echo("".join(display_path(p) + "\n" for p in paths), nl=False)


def echo_json(value: Any) -> None:
    import json

    click.echo(redact(json.dumps(value, ensure_ascii=False, indent=2)))
