"""What a run hands the writer: one dataclass per kind of row. Paths are as the OS gave them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class FileSeen:
    """A file at a path holds this content (a new file, a changed one, or one back on disk)."""

    path: str
    size: int
    mtime_ns: int
    content_id: str


@dataclass(slots=True)
class AnnotationRow:
    """What one model said about one content under one prompt key."""

    content_id: str
    backend: str
    model: str
    prompt_key: str
    language: str
    tags: list[tuple[str, float | None]]
    description: str | None
    raw: str
    server_timings: dict[str, float]
    run_id: int
    path: str | None = None  # the file it was read from: its older failures are cleared
    width: int | None = None  # of the original image, after orientation
    height: int | None = None
    size: int | None = None


@dataclass(slots=True)
class FailureRow:
    """Why one file has no annotation under this prompt key (stage: scan, read, decode, ...)."""

    path: str
    content_id: str | None
    backend: str
    model: str
    prompt_key: str
    stage: str
    reason: str
    run_id: int


@dataclass(slots=True)
class Missing:
    """Paths gone from disk: their files rows are marked not present, their failures go."""

    paths: list[str]


@dataclass(slots=True)
class Answered:
    """A file whose picture has an answer under this key without one of its own (a copy of
    a picture tagged in the run, or tagged before): its older failures under the key go."""

    path: str
    backend: str
    model: str
    prompt_key: str


Row = FileSeen | AnnotationRow | FailureRow | Missing | Answered
