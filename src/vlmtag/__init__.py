"""vlmtag: tag and describe every image in a folder with a vision-language model.

The public API is small: Library (one database: tag, read, search, curate, export) and the
Settings of a tagging run. They load on first use, so `vlmtag --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["Library", "Settings", "__version__"]

if TYPE_CHECKING:
    from vlmtag.api import Library
    from vlmtag.config import Settings


def __getattr__(name: str) -> Any:
    if name == "Library":
        from vlmtag.api import Library

        return Library
    if name == "Settings":
        from vlmtag.config import Settings

        return Settings
    raise AttributeError(f"module 'vlmtag' has no attribute {name!r}")
