"""`vlmtag serve`: the web app on this machine (extra: serve)."""

from __future__ import annotations

import secrets

import click

from vlmtag.cli.common import db_option, fail, friendly_errors

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command()
@db_option
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Another than this machine's own (e.g. 0.0.0.0) needs the "
    "access token printed at start (or --token).",
)
@click.option("--token", default=None, help="Access token when serving on a network.")
@click.option("--read-only", is_flag=True, help="Serve no change at all (look and search only).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a browser.")
@friendly_errors
def serve(
    db: str | None, port: int, host: str, token: str | None, read_only: bool, open_browser: bool
) -> None:
    """Look at, search and curate the library in a web browser.

    \b
    Keyboard in the viewer: j/k or arrows move, a accepts the model's keywords,
    x rejects the focused one, t adds one, e edits the description, u undoes, ? shows all.
    Decisions made here are a person's: no later run brings back a rejected keyword.
    """
    try:
        import uvicorn

        from vlmtag.web.app import create_app
        from vlmtag.web.guard import Guard
        from vlmtag.web.thumbs import default_folder
    except ImportError as exc:
        fail(f"the web app needs its extra ({exc.name} is missing): pip install 'vlmtag[serve]'")
    from vlmtag.library.db import default_db_path

    path = db or default_db_path()
    local = host in LOOPBACK
    access = None if local else (token or secrets.token_urlsafe(18))
    guard = Guard(port=port, host=host, read_only=read_only, access_token=access)
    _checked(path).close()
    _check_port(host, port)
    app = create_app(path, guard, default_folder(path))
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown if not local else '127.0.0.1'}:{port}/"
    if access:
        url += f"?token={access}"
        click.echo(
            f"serving on {host}:{port} for the network: whoever has the address with its"
            " token can see and change this library"
        )
    click.echo(f"vlmtag: {url}  ({path}{', read-only' if read_only else ''}; Ctrl-C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()


@click.command()
@db_option
@friendly_errors
def thumbs(db: str | None) -> None:
    """Make the web app's thumbnails of every picture now, not as each is first shown.

    They are kept beside the database (DB-thumbs/), one per picture's content and size;
    run it again after tagging more: only the missing ones are made.
    """
    try:
        from vlmtag.web.thumbs import default_folder, warm
    except ImportError as exc:
        fail(
            f"thumbnails need the extra serve ({exc.name} is missing): pip install 'vlmtag[serve]'"
        )
    from tqdm import tqdm

    from vlmtag.library.db import default_db_path

    path = db or default_db_path()
    _checked(path).close()
    with tqdm(unit="img", desc="thumbnails", leave=False) as bar:
        made, failed = warm(path, default_folder(path), on_done=bar.update)
    click.echo(f"thumbnails: made {made}, could not read {failed} ({default_folder(path)})")


def _checked(path: str):
    """Open the database once, so a missing or broken one is one line before the server starts."""
    from vlmtag.api import Library

    return Library.open(path)


def _check_port(host: str, port: int) -> None:
    """One line, before anything starts, when the address cannot be listened on."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            why = "is in use" if in_use else f"cannot be used ({exc.strerror})"
            fail(f"{host}:{port} {why}; pass another --port (or stop what listens there)")
