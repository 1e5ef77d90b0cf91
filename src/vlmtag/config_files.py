"""Settings from files and the environment, each value with where it came from.

Read, lowest first (a later one wins; flags on the command line win over all):

1. the user's file: config.toml in the user's config folder (platformdirs; on Linux
   ~/.config/vlmtag/config.toml);
2. `.env` in the current folder: the seed system's keys (MODEL_NAME, TAG_COUNT, ...); other
   keys there belong to other programs and are left alone;
3. the project's file: vlmtag.toml in the current folder, or the file `--config` names
   (TOML; `.yaml`/`.yml` in the seed system's layout; `.env`);
4. the environment: VLMTAG_<SETTING> (VLMTAG_MODEL, VLMTAG_TAG_COUNT, VLMTAG_API_KEY, ...).

A TOML file holds settings for every command at its top, a table per command (`[tag]`,
`[serve]`, ...) and named profiles (`[profile.gpu-box]`, with tables per command inside),
chosen with `--profile`. Keys are the flags' names (`tag_count` or `tag-count`). What is
wrong (an unknown key, a value a flag would refuse) is one line naming the file and line.

Nothing here knows click: the command line (cli/configured.py) says which settings a
command has and checks each value as its flag would.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtag.errors import UsageError

PROJECT_FILE = "vlmtag.toml"
USER_FILE = "config.toml"
ENV_PREFIX = "VLMTAG_"
SECRET_KEYS = frozenset({"api_key"})

# Other spellings of a setting, in every file: the seed system's names and flags' aliases.
ALIASES = {
    "model_type": "backend",
    "model_name": "model",
    "image_path": "image_paths",
    "generate_description": "description",
    "db_path": "db",
    "max_workers": "workers",
    "image_resize": "resize",
    "reprocess": "force",
}
# The seed system's .env keys, and the settings they are.
DOTENV_KEYS = {
    "MODEL_NAME": "model",
    "MODEL_TYPE": "backend",
    "LANGUAGE": "language",
    "TAG_COUNT": "tag_count",
    "IMAGE_RESIZE": "resize",
    "GENERATE_DESCRIPTION": "description",
    "MAX_WORKERS": "workers",
    "API_BASE": "api_base",
    "API_KEY": "api_key",
    "DB_PATH": "db",
    "IMAGE_PATH": "image_paths",
}
# A setting that names an environment variable holding the value, never the value itself.
INDIRECT = {"api_key_env": "api_key"}
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_FILE_BYTES = 1_000_000  # a config file is a few hundred bytes; more is a mistake
# Settings that are paths: relative ones are read from the file's folder, not the current one.
PATH_SETTINGS = frozenset({"db", "image_paths", "paths", "prompt_file", "model_path"})


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "vlmtag.toml:12 [tag]", "environment VLMTAG_MODEL", ".env:3 MODEL_NAME"


@dataclass
class Layer:
    """One file (or the environment): settings for every command, per command, per profile."""

    name: str
    common: dict[str, Setting] = field(default_factory=dict)
    commands: dict[str, dict[str, Setting]] = field(default_factory=dict)
    profiles: dict[str, Layer] = field(default_factory=dict)


def canonical(key: str) -> str:
    name = key.strip().lower().replace("-", "_")
    return ALIASES.get(name, name)


# ---- finding the files ---------------------------------------------------------------------


def user_file() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("vlmtag", appauthor=False)) / USER_FILE


def layers(config: str | None, *, cwd: str | None = None) -> list[Layer]:
    """Every source there is, lowest first (the environment is not one: see environment())."""
    here = Path(cwd or os.getcwd())
    found: list[Layer] = []
    mine = user_file()
    if mine.is_file():
        found.append(read_file(mine))
    dotenv = here / ".env"
    if dotenv.is_file() and not (config and _same(config, dotenv)):
        found.append(read_file(dotenv))
    if config:
        path = Path(os.path.expanduser(config))
        if path.is_dir():
            raise UsageError(f"--config {config} is a folder; name the file in it")
        if not path.is_file():
            raise UsageError(f"--config {config}: no such file")
        found.append(read_file(path))
    elif (here / PROJECT_FILE).is_file():
        found.append(read_file(here / PROJECT_FILE))
    return found


def _same(a: str | os.PathLike, b: Path) -> bool:
    try:
        return os.path.samefile(os.path.expanduser(a), b)
    except OSError:
        return False


def read_file(path: Path) -> Layer:
    name = path.name.lower()
    if name.endswith((".yaml", ".yml")):
        layer = read_yaml(path)
    elif name == ".env" or name.endswith(".env"):
        layer = read_dotenv(path)
    else:
        layer = read_toml(path)
    return _from_folder(layer, Path(os.path.abspath(path.parent)))


def _from_folder(layer: Layer, folder: Path) -> Layer:
    """Relative paths in a file are the file's folder's: a config that names photos/ means
    the photos beside it, wherever vlmtag is run from."""

    def fix(given: dict[str, Setting]) -> None:
        for key, setting in list(given.items()):
            if key in PATH_SETTINGS:
                given[key] = Setting(_absolute(setting.value, folder), setting.source)

    fix(layer.common)
    for table in layer.commands.values():
        fix(table)
    for profile in layer.profiles.values():
        _from_folder(profile, folder)
    return layer


def _absolute(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    if isinstance(value, str) and value.strip():
        expanded = os.path.expanduser(value)
        return expanded if os.path.isabs(expanded) else str(folder / expanded)
    return value


def _text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UsageError(
                f"{path}: {size:,} bytes is not a config file (at most {MAX_FILE_BYTES:,})"
            )
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None


# ---- TOML ----------------------------------------------------------------------------------


def read_toml(path: Path) -> Layer:
    text = _text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    lines = _toml_lines(text)
    layer = Layer(str(path))

    def where(section: tuple[str, ...], key: str) -> str:
        line = lines.get((section, key)) or lines.get((section, key.replace("_", "-")))
        label = f" [{'.'.join(section)}]" if section else ""
        return f"{path}:{line}{label}" if line else f"{path}{label}"

    def fill(target: Layer, table: dict[str, Any], section: tuple[str, ...]) -> None:
        for key, value in table.items():
            if isinstance(value, dict) and key not in ("profile",):
                target.commands.setdefault(key, {}).update(
                    {canonical(k): Setting(v, where((*section, key), k)) for k, v in value.items()
                     if not isinstance(v, dict)}
                )  # fmt: skip
                nested = [k for k, v in value.items() if isinstance(v, dict)]
                if nested:
                    table = ".".join((*section, key, nested[0]))
                    raise UsageError(
                        f"{where((*section, key), nested[0])}: [{table}] is not a section "
                        "vlmtag reads"
                    )
            elif isinstance(value, dict):
                raise UsageError(f"{where(section, key)}: profiles go at the top of the file")
            else:
                target.common[canonical(key)] = Setting(value, where(section, key))

    profiles = data.pop("profile", {})
    if not isinstance(profiles, dict):
        raise UsageError(f"{where((), 'profile')}: write profiles as [profile.NAME] tables")
    fill(layer, data, ())
    for name, table in profiles.items():
        if not isinstance(table, dict):
            raise UsageError(f"{where(('profile',), name)}: write the profile as [profile.{name}]")
        layer.profiles[name] = Layer(f"{path} [profile.{name}]")
        fill(layer.profiles[name], table, ("profile", name))
    return layer


_SECTION = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")


def _toml_lines(text: str) -> dict[tuple[tuple[str, ...], str], int]:
    """(section, key) -> the line it is on: tomllib does not say, and an error should."""
    found: dict[tuple[tuple[str, ...], str], int] = {}
    section: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _SECTION.match(line)
        if header:
            section = tuple(p.strip().strip("\"'") for p in header.group(1).split("."))
            continue
        key = _KEY.match(line)
        if key:
            name = next(g for g in key.groups() if g)
            found.setdefault((section, name), number)
    return found


# ---- the seed system's YAML and .env -------------------------------------------------------


def read_yaml(path: Path) -> Layer:
    """The seed system's config.yaml: one mapping of its keys (model, model_type, image_path,
    resize, tag_count, generate_description, db_path, language, api_base, api_key)."""
    try:
        import yaml
    except ImportError:  # a dependency; a broken install says so
        raise UsageError("reading YAML needs PyYAML: pip install pyyaml") from None
    text = _text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    layer = Layer(str(path))
    if data is None:
        return layer
    if not isinstance(data, dict) or root is None or not hasattr(root, "value"):
        raise UsageError(f"{path}: expected a mapping of settings (key: value)")
    lines = {
        str(k.value): k.start_mark.line + 1
        for k, _ in root.value
        if hasattr(k, "value") and hasattr(k, "start_mark")
    }
    for key, value in data.items():
        source = f"{path}:{lines.get(str(key), '?')}"
        if isinstance(value, dict):
            layer.commands[str(key)] = {
                canonical(str(k)): Setting(v, source) for k, v in value.items()
            }
        else:
            layer.common[canonical(str(key))] = Setting(value, source)
    return layer


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def read_dotenv(path: Path) -> Layer:
    """KEY=VALUE lines (export, quotes and comments as shells and python-dotenv take them);
    only the seed system's keys (DOTENV_KEYS) are settings, the rest is other programs'."""
    layer = Layer(str(path))
    for number, raw in enumerate(_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in DOTENV_KEYS:
            continue
        layer.common[DOTENV_KEYS[key]] = Setting(_dotenv_value(value), f"{path}:{number} {key}")
    return layer


def _dotenv_value(value: str) -> str:
    value = value.strip()
    if value[:1] in ("'", '"'):
        quote = value[0]
        end = value.find(quote, 1)
        return value[1:end] if end > 0 else value[1:]
    return value.split(" #", 1)[0].strip()


# ---- the environment -----------------------------------------------------------------------


def environment(names: set[str]) -> Layer:
    """VLMTAG_<NAME> for each setting a command has (VLMTAG_API_KEY_ENV too)."""
    layer = Layer("environment")
    for name in sorted(names | set(INDIRECT)):
        variable = ENV_PREFIX + name.upper()
        if os.environ.get(variable):
            layer.common[name] = Setting(os.environ[variable], f"environment {variable}")
    return layer


# ---- choosing ------------------------------------------------------------------------------


def resolve(
    sources: list[Layer],
    *,
    command: str,
    names: set[str],
    tables: dict[str, set[str]],
    profile: str | None,
    only_in_table: frozenset[str] = frozenset(),
) -> dict[str, Setting]:
    """The settings for `command`, which has settings `names`; `tables` holds every
    command's (a key for another command is not an error at the top of a file, and a table
    for another command is checked all the same). Later sources win; in one file, its
    settings for every command, then its table for this one, then the profile's, then the
    profile's table: the profile chosen wins over the rest of its file. `only_in_table`:
    settings that mean something else here than where a file's top means them (--language
    filters `export` but is what `tag` writes in): taken from this command's table only."""
    known = set().union(*tables.values()) if tables else set(names)
    for layer in sources:
        for part in [layer, *layer.profiles.values()]:
            _check_tables(part, tables)
    if profile and not any(profile in layer.profiles for layer in sources):
        offered = sorted({p for layer in sources for p in layer.profiles})
        listed = ", ".join(offered) or "none in the files read"
        raise UsageError(f"--profile {profile}: no [profile.{profile}] in the config ({listed})")
    chosen: dict[str, Setting] = {}
    for layer in sources:
        parts = [layer]
        if profile and profile in layer.profiles:
            parts.append(layer.profiles[profile])
        for part in parts:
            for key, setting in part.common.items():
                if key not in known and key not in INDIRECT:
                    hint = _hint(key, known)
                    raise UsageError(f"{setting.source}: unknown setting {key!r}{hint}")
            top = {k: v for k, v in part.common.items() if k not in only_in_table}
            _take(chosen, top, names)
            _take(chosen, part.commands.get(command, {}), names)
    return chosen


def _check_tables(part: Layer, tables: dict[str, set[str]]) -> None:
    for table, given in part.commands.items():
        for key, setting in given.items():
            if table not in tables:
                raise UsageError(
                    f"{setting.source}: there is no command {table!r} for a [{table}] table"
                    f"{_hint(table, set(tables))}"
                )
            if key not in tables[table] and key not in INDIRECT:
                raise UsageError(
                    f"{setting.source}: vlmtag {table} has no setting {key!r}"
                    f"{_hint(key, tables[table])}"
                )


def _take(chosen: dict[str, Setting], given: dict[str, Setting], names: set[str]) -> None:
    for key, setting in given.items():
        if key in INDIRECT:
            target = INDIRECT[key]
            if target in names:
                chosen[target] = _indirect(key, setting)
        elif key in names:
            chosen[key] = setting


def _indirect(key: str, setting: Setting) -> Setting:
    """api_key_env = "NAME" (or a list, one per server): the value of that variable."""
    from vlmtag.redact import looks_secret

    names = setting.value if isinstance(setting.value, list) else [setting.value]
    values = []
    for name in names:
        if not isinstance(name, str) or not VARIABLE_NAME.fullmatch(name.strip()):
            looks = isinstance(name, str) and looks_secret(name)
            raise UsageError(
                f"{setting.source}: {key} names an environment variable (letters, digits, _)"
                + ("; that looks like a key itself: put the key in a variable, name that"
                   if looks else "")
            )  # fmt: skip
        if not os.environ.get(name.strip()):
            raise UsageError(f"{setting.source}: {key} names {name.strip()}, which is not set")
        values.append(os.environ[name.strip()])
    value = values if isinstance(setting.value, list) else values[0]
    return Setting(value, f"{setting.source} ({key} {', '.join(map(str, names))})")


def _hint(key: str, names: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
