"""Model backends: one interface (base.Backend), chosen by name from a small registry."""

from vlmtag.backends.base import (
    Backend,
    BackendOptions,
    PreparedImage,
    Reply,
    Request,
    get_backend,
    names,
    register,
)

__all__ = [
    "Backend",
    "BackendOptions",
    "PreparedImage",
    "Reply",
    "Request",
    "get_backend",
    "names",
    "register",
]
