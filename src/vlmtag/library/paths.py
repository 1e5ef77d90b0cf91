"""File paths in SQLite, losslessly.

A path is what the OS gave: Python holds bytes that are not UTF-8 as lone surrogates
(os.fsdecode), which SQLite cannot store as TEXT. Such a path is stored as a BLOB of its
bytes; every other path as TEXT. A BLOB never equals a TEXT, so a file named with real
0xFF bytes and one literally named "\\xff" can never be mistaken for each other, and both
come back exactly as the scan sees them.
"""

from __future__ import annotations

import os


def to_db(path: str) -> str | bytes:
    """The value stored for a path."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def from_db(value: str | bytes) -> str:
    """The path a stored value names, as os functions take it."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def under_clause(column: str, prefix: str | None, name: str = "prefix") -> tuple[str, dict]:
    """SQL (starting with AND) keeping rows whose path starts with `prefix`, TEXT or BLOB."""
    if not prefix:
        return "", {}
    stored = to_db(prefix)
    if isinstance(stored, str):
        # A non-UTF-8 path below a UTF-8 prefix is a BLOB: compare its bytes too.
        return (
            f"AND (substr({column}, 1, length(:{name})) = :{name} "
            f"OR (typeof({column}) = 'blob' AND substr({column}, 1, length(:{name}_b)) = "
            f":{name}_b))",
            {name: stored, f"{name}_b": os.fsencode(prefix)},
        )
    return (
        f"AND typeof({column}) = 'blob' AND substr({column}, 1, length(:{name})) = :{name}",
        {name: stored},
    )
