"""The layout shows the architecture: layers whose dependencies point down, no import cycles,
no module over 600 lines and no function over 80 (read from the source, imports in functions
included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlmtag"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

# Lower layers never import higher ones. Same rank: siblings that may use each other.
LAYERS = {
    "vlmtag.types": 0,
    "vlmtag.errors": 0,
    "vlmtag.text": 1,
    "vlmtag.redact": 1,
    "vlmtag.config": 2,
    "vlmtag.config_files": 2,
    "vlmtag.ingest": 3,
    "vlmtag.models": 3,
    "vlmtag.library": 4,
    "vlmtag.output": 5,
    "vlmtag.run": 6,
    "vlmtag.api": 7,
    "vlmtag.measure": 7,
    "vlmtag.cli": 8,
    "vlmtag.web": 8,
    "vlmtag.__main__": 9,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """vlmtag modules a module imports, anywhere in it (a module, not a name in it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("vlmtag") and target != name:
                out.add(target)
    return out


def layer(name: str) -> int | None:
    while name:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    return None


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, name, known) - {"vlmtag"} for name, path in found.items()}


def test_every_module_has_a_layer():
    assert [name for name in modules() if name != "vlmtag" and layer(name) is None] == []


def test_dependencies_point_down():
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in graph().items()
        if name != "vlmtag"
        for target in targets
        if layer(target) > layer(name)
    ]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_modules_and_functions_are_small():
    too_long = []
    for name, path in modules().items():
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert too_long == []


def test_the_public_api_is_small_and_loads_lazily():
    import subprocess
    import sys

    code = (
        "import sys, vlmtag; assert 'vlmtag.api' not in sys.modules; "
        "from vlmtag import Library, Settings; print(sorted(vlmtag.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['Library', 'Settings', '__version__']"
