"""The command line: parse flags, call the library (vlmtag.api), render the result.

One module per command group; heavy modules (httpx, Pillow, torch) are imported inside the
commands so `vlmtag --help` is fast. Errors become one line and an exit code in
cli/common.py, and nowhere else.
"""

from __future__ import annotations

import click

from vlmtag import __version__

# Commands that turn signals into a clean stop of their own run (run/control.py).
# uvicorn stops `serve` cleanly on Ctrl-C and SIGTERM itself.
OWN_SIGNAL_HANDLING = frozenset({"tag", "bench", "serve"})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlmtag")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Tag and describe every image in a folder with a vision-language model.

    Results go to an SQLite database; reruns only do new work. Keywords you add, remove
    or write by hand (tags add/remove, describe) stay, whatever later runs say.

    \b
    Quick start:
      vlmtag tag ~/Pictures                       # Ollama on localhost, qwen3-vl:4b
      vlmtag tag ~/Pictures --backend builtin     # offline, CPU, no server
      vlmtag search cat
      vlmtag export ~/Pictures --format xmp       # sidecars Lightroom, digiKam read
    """
    from vlmtag.cli.common import show_warnings, stop_on_signals

    show_warnings()
    if ctx.invoked_subcommand not in OWN_SIGNAL_HANDLING:
        stop_on_signals(ctx)


# (module, click commands it defines), registered on the `vlmtag` group in this order.
COMMAND_MODULES: list[tuple[str, list[str]]] = [
    ("vlmtag.cli.tag", ["tag", "bench", "doctor"]),
    ("vlmtag.cli.read", ["show", "failures"]),
    ("vlmtag.cli.find", ["search", "tags", "describe"]),
    ("vlmtag.cli.export", ["export"]),
    ("vlmtag.cli.serve", ["serve", "thumbs"]),
    ("vlmtag.cli.configured", ["config", "prompts"]),
]


def _register_commands() -> None:
    from importlib import import_module

    from vlmtag.cli.configured import add_config_options

    for module, names in COMMAND_MODULES:
        mod = import_module(module)
        for name in names:
            cli.add_command(getattr(mod, name))
    add_config_options(cli)  # every command reads the config files (cli/configured.py)


def main() -> None:
    cli(prog_name="vlmtag")


_register_commands()
