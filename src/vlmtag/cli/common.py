"""What every command shares: the --db option, typed errors as one line and an exit code."""

from __future__ import annotations

import functools
import sys

import click

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DB_HELP = (
    "SQLite database file. Default: $VLMTAG_DB, else vlmtag.db in your data folder "
    "(~/.local/share/vlmtag on Linux, ~/Library/Application Support/vlmtag on macOS)."
)


def friendly_errors(f):
    """Typed errors from anywhere in a command: one line on stderr and their exit code."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from vlmtag.errors import VlmtagError

        try:
            return f(*args, **kwargs)
        except VlmtagError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper


def db_option(f):
    return click.option("--db", "db", type=click.Path(dir_okay=False), help=DB_HELP)(f)


def fail(message: str, code: int = EXIT_USAGE):
    click.echo(f"vlmtag: error: {message}", err=True)
    sys.exit(code)


def open_store(db: str | None):
    from vlmtag.errors import VlmtagError
    from vlmtag.library.db import Store, default_db_path

    try:
        return Store.open(db or default_db_path(), create=False)
    except VlmtagError as exc:
        fail(str(exc), exc.exit_code)
