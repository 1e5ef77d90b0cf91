"""Config files and VLMTAG_* variables on the command line: every command's flags take their
defaults from them (config_files.py reads them), and `vlmtag config` shows the result.

Precedence: flags > environment > the project's file (or --config) > .env > the user's file
> built-in defaults. The values go in as click's default_map, so each is checked by its
flag's own type; what a flag would refuse is one line naming the file and line.
"""

from __future__ import annotations

from typing import Any

import click

from vlmtag.cli.common import EXIT_USAGE, fail

SOURCES_KEY = "vlmtag.sources"  # ctx.meta: setting -> where its value came from
SKIPPED = {"config", "profile", "help"}
# The commands that run a model: there --language and --model say what to make; elsewhere
# they filter what is read, so a file's top-level language is not a filter of `export`.
MODEL_COMMANDS = frozenset({"tag", "bench", "doctor"})
FILTERS_ELSEWHERE = frozenset({"language", "model"})
# Flags whose values are checked past their click type (the run would name the flag).
CHECKS = {"resize", "language", "backend", "prompt_file"}


def _chosen(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    seen = ctx.meta.setdefault("vlmtag.config_seen", {})
    seen[param.name] = value
    if len(seen) == 2:  # both --config and --profile are known: read once
        _load(ctx, seen["config"], seen["profile"])
    return value


CONFIG_OPTIONS = [
    click.Option(
        ["--config"],
        metavar="FILE",
        envvar="VLMTAG_CONFIG",
        is_eager=True,
        expose_value=False,
        callback=_chosen,
        help="Read settings from FILE (TOML, or the seed's config.yaml / .env) instead of "
        "./vlmtag.toml. See `vlmtag config`.",
    ),
    click.Option(
        ["--profile"],
        metavar="NAME",
        envvar="VLMTAG_PROFILE",
        is_eager=True,
        expose_value=False,
        callback=_chosen,
        help="Use the settings of [profile.NAME] in the config files.",
    ),
]


def add_config_options(command: click.Command) -> None:
    """--config and --profile on a command (and each command of a group)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_config_options(sub)
        return
    have = {p.name for p in command.params}
    command.params.extend(o for o in CONFIG_OPTIONS if o.name not in have)


def section_of(ctx: click.Context) -> str:
    """The command's name as config tables name it: `vlmtag tags add` reads [tags]."""
    chain = []
    while ctx.parent is not None:
        chain.append(ctx.info_name or ctx.command.name or "")
        ctx = ctx.parent
    return chain[-1] if chain else ""


def settings_of(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name and p.name not in SKIPPED}


def every_table(ctx: click.Context) -> dict[str, set[str]]:
    """Each command's settings, by the name its table has ([tags] for every `tags ...`)."""
    root = ctx.find_root().command

    def names(command: click.Command) -> set[str]:
        if isinstance(command, click.Group):
            return set().union(*(names(sub) for sub in command.commands.values()))
        return set(settings_of(command))

    if not isinstance(root, click.Group):
        return {root.name or "": names(root)}
    return {name: names(command) for name, command in root.commands.items()}


def _load(
    ctx: click.Context, config: str | None, profile: str | None, *, announce: bool = True
) -> None:
    from vlmtag import config_files
    from vlmtag.errors import UsageError

    params = settings_of(ctx.command)
    try:
        sources = [*config_files.layers(config), config_files.environment(set(params))]
        section = section_of(ctx)
        chosen = config_files.resolve(
            sources,
            command=section,
            names=set(params),
            tables=every_table(ctx),
            profile=profile,
            only_in_table=frozenset() if section in MODEL_COMMANDS else FILTERS_ELSEWHERE,
        )
        defaults = {name: _checked(ctx, params[name], s) for name, s in chosen.items()}
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[SOURCES_KEY] = {name: s.source for name, s in chosen.items()}
    from_dotenv = sorted(
        s.source.rsplit(" ", 1)[-1] for s in chosen.values() if "/.env:" in s.source
    )
    if from_dotenv and section in MODEL_COMMANDS and announce:
        # A .env is another program's as often as ours: say what came from it.
        click.echo(
            f"vlmtag: note: {', '.join(from_dotenv)} from ./.env (the seed system's "
            "settings); `vlmtag config` shows every setting and where it came from",
            err=True,
        )


def _checked(ctx: click.Context, param: click.Parameter, setting: Any) -> Any:
    """The value as its flag takes it, or UsageError naming where it was written (a value
    that looks like a key is not repeated: it may be one, put in the wrong setting)."""
    from vlmtag.config_files import SECRET_KEYS
    from vlmtag.errors import UsageError
    from vlmtag.redact import looks_secret

    raw = setting.value
    hidden = param.name in SECRET_KEYS or (isinstance(raw, str) and looks_secret(raw))
    shown = "(hidden)" if hidden else repr(raw)

    def wrong(why: str) -> UsageError:
        return UsageError(f"{setting.source}: {param.name} = {shown}: {why}")

    many = getattr(param, "multiple", False) or param.nargs == -1
    if isinstance(raw, bool) and not getattr(param, "is_flag", False):
        raise wrong("a yes/no here; give a value")
    if isinstance(raw, list | tuple) and not many and param.name != "resize":
        raise wrong("a list here; give one value")
    if param.name in SECRET_KEYS and not all(isinstance(v, str) for v in _listed(raw)):
        raise wrong("a key is text, in quotes")
    value = for_click(param, raw)
    try:
        param.type_cast_value(ctx, value)
        _check_meaning(param.name or "", value)
    except click.BadParameter as exc:
        # click's message repeats the value: not for a value that may be a key.
        raise wrong(f"not a valid {param.type.name} here" if hidden else exc.message) from None
    except UsageError as exc:
        raise wrong(str(exc).split(": ", 1)[-1] if hidden else str(exc)) from None
    return value


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_meaning(name: str, value: Any) -> None:
    """What the run would refuse later, naming a flag nobody typed: refused here."""
    import os

    from vlmtag.errors import UsageError

    if name not in CHECKS or value in (None, ""):
        return
    if name == "resize":
        from vlmtag.config import parse_resize

        parse_resize(str(value))
    elif name == "language":
        from vlmtag.models.prompts import resolve_language

        resolve_language(str(value))
    elif name == "backend":
        from vlmtag.config import normalise_backend
        from vlmtag.models.base import names

        if normalise_backend(str(value)) not in names():
            raise UsageError(f"no backend {value!r}; one of {', '.join(names())}")
    elif name == "prompt_file" and not os.path.isfile(os.path.expanduser(str(value))):
        raise UsageError(f"no prompt file at {value}")


def for_click(param: click.Parameter, value: Any) -> Any:
    """A file's value in the shape the flag parses: lists for repeatable flags, "WxH" for
    a size given as [512, 512] or 512, a bool for a flag given as "true"."""
    many = getattr(param, "multiple", False) or param.nargs == -1
    if many:
        items = value if isinstance(value, list | tuple) else [value]
        return [str(v) if not isinstance(v, str) else v for v in items]
    if param.name == "resize" and isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool) or getattr(param, "is_flag", False):
        return value
    return value if isinstance(value, str) else str(value)


def sources(ctx: click.Context) -> dict[str, str]:
    return ctx.meta.get(SOURCES_KEY, {})


@click.command("config")
@click.argument("command_name", metavar="[COMMAND]", required=False, default="tag")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@click.pass_context
def config(ctx: click.Context, command_name: str, as_json: bool) -> None:
    """Show the settings COMMAND (default: tag) would run with, and where each came from.

    \b
    Read, each over the one before: built-in defaults; the user's file
    (~/.config/vlmtag/config.toml on Linux); .env in this folder (the seed's keys:
    MODEL_NAME, TAG_COUNT, ...); ./vlmtag.toml or --config FILE (TOML, or the seed's
    config.yaml); VLMTAG_<SETTING> variables; then the command's flags.

    \b
    A vlmtag.toml:
      db = "~/photos/vlmtag.db"     # every command
      [tag]
      model = "qwen3-vl:8b"
      tag_count = 15
      [profile.gpu-box]             # chosen with --profile gpu-box
      backend = "openai"
      api_base = ["http://gpu1:8000/v1", "http://gpu2:8000/v1"]
      api_key_env = "GPU_BOX_KEY"   # the key from this variable, never in the file
    """
    import os

    from vlmtag.cli.common import echo_json
    from vlmtag.config_files import SECRET_KEYS

    root = ctx.find_root().command
    target = root.commands.get(command_name) if isinstance(root, click.Group) else None
    if target is None or isinstance(target, click.Group):
        simple = sorted(n for n, c in root.commands.items() if not isinstance(c, click.Group))
        fail(f"no command {command_name!r} to show settings for; one of: {', '.join(simple)}")
    seen = ctx.meta.get("vlmtag.config_seen", {})
    sub = click.Context(target, parent=ctx.find_root(), info_name=command_name)
    _load(sub, seen.get("config"), seen.get("profile"), announce=False)
    found = sources(sub)
    rows = []
    for name, param in settings_of(target).items():
        if isinstance(param, click.Argument) and name not in found:
            continue
        if name in found:  # as the flag takes it: 3, not "3"
            value = param.type_cast_value(sub, (sub.default_map or {}).get(name))
            value = list(value) if isinstance(value, tuple) else value
        else:
            value = _plain(param, sub, command_name in MODEL_COMMANDS)
        source = found.get(name, "default")
        if name in SECRET_KEYS and not value and os.environ.get("OPENAI_API_KEY"):
            value, source = True, "environment OPENAI_API_KEY (for --backend openai)"
        if name in SECRET_KEYS and value:
            value = "(set, hidden)"
        rows.append({"setting": name, "value": value, "from": source})
    if as_json:
        echo_json({"command": command_name, "settings": rows})
        return
    width = max(len(r["setting"]) for r in rows)
    for row in rows:
        shown = _shown(row["value"])
        click.echo(f"{row['setting']:<{width}}  {shown:<24}  {row['from']}")


def _plain(param: click.Parameter, ctx: click.Context, runs_a_model: bool) -> Any:
    """A flag's built-in default as JSON can hold it: for the commands that run a model,
    the run's own default where the flag leaves it to the run (tag_count 20, backend
    ollama); None for "not set"."""
    value = param.get_default(ctx)
    if value is None or type(value).__name__ == "Sentinel":
        value = _run_default(param.name or "") if runs_a_model or param.name == "db" else None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, bool | int | float | str)]
    return None


def _run_default(name: str) -> Any:
    from dataclasses import fields

    from vlmtag.config import Settings

    if name == "db":
        from vlmtag.library.db import default_db_path

        return str(default_db_path())
    if name == "workers":
        return "auto"
    if name == "model":
        return "qwen3-vl:4b (ollama); the server's one model (openai)"
    if name == "api_base":
        return "http://localhost:11434 (ollama), http://localhost:8000/v1 (openai)"
    if name == "description":
        return "on (off for builtin)"
    defaults = {f.name: getattr(Settings(), f.name) for f in fields(Settings)}
    value = defaults.get(name)
    if name == "resize" and isinstance(value, tuple):
        return "x".join(map(str, value))
    return value if isinstance(value, bool | int | float | str) else None


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    return str(value)


@click.command("prompts")
def prompts() -> None:
    """Print vlmtag's own prompts as a prompt file to start from.

    \b
      vlmtag prompts > prompts.toml     # edit it, then:
      vlmtag tag DIR --prompt-file prompts.toml
    The seed system's prompts.yaml (system_prompts, tag_prompts, description_prompts)
    works as it is. Variables: {language}, {language_name}, {tag_count}.
    """
    from vlmtag.models.prompts import builtin_templates_toml

    click.echo(builtin_templates_toml(), nl=False)
