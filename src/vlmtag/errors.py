"""Typed errors. Core code raises these; only the CLI turns them into messages and exit codes.

Every message says what happened and what to do next, in one line.
"""

from __future__ import annotations


class VlmtagError(Exception):
    """Base of every error vlmtag raises on purpose."""

    exit_code = 2


class UsageError(VlmtagError):
    """A flag, value or path the user gave is wrong (exit 2)."""


class SetupError(VlmtagError):
    """The run cannot start: server unreachable, model missing, extra not installed (exit 2)."""


class ModelChanged(SetupError):
    """A server that came back serves another model than the one the run began with."""


class StoreError(VlmtagError):
    """The database cannot be used: corrupt, foreign, locked by another run (exit 2)."""


class Interrupted(VlmtagError):
    """Ctrl-C (or SIGTERM, SIGHUP) before anything was done (exit 130)."""

    exit_code = 130


class ImageError(Exception):
    """One file cannot be read or decoded. Recorded as a failure for that file; the run goes on."""

    stage = "decode"


class ReadError(ImageError):
    """A file cannot be opened or read, or is not what a picture could be: it is about the
    file, not the picture (a copy of it elsewhere may read fine)."""

    stage = "read"


class InferenceError(Exception):
    """One request to a model failed.

    `retryable` says whether sending the same request again may succeed (connection
    errors, timeouts, 5xx, 503 busy) or not (400 bad input, 404 model).
    """

    stage = "infer"

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class ServerGoneError(InferenceError):
    """The server stopped answering at all (connection refused after every retry)."""

    def __init__(self, message: str):
        super().__init__(message, retryable=True)


class ParseError(Exception):
    """The model answered, but nothing usable could be read from the answer."""

    stage = "parse"
