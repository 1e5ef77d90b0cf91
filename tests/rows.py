"""Rows for tests that fill a real store through the real Writer."""

from __future__ import annotations

from pathlib import Path

from vlmtag.library.db import Store
from vlmtag.library.rows import AnnotationRow, FileSeen
from vlmtag.library.writer import Writer


def annotation(
    content_id: str, tags: list[str], description: str | None = None, **kw
) -> AnnotationRow:
    """An answer of model "m" via ollama under prompt key "k", unless kw says otherwise."""
    values = dict(
        content_id=content_id,
        backend="ollama",
        model="m",
        prompt_key="k",
        language="en",
        tags=[(t, None) for t in tags],
        description=description,
        raw="{}",
        server_timings={},
        run_id=1,
    )
    values.update(kw)
    return AnnotationRow(**values)


class Library:
    """A real store filled through the real Writer, with paths under /lib."""

    def __init__(self, path: Path):
        self.store = Store.open(path)
        self.store.start_run("ollama", "m", "k", {})
        self.writer = Writer(self.store.path)

    def add(self, name: str, tags: list[str], description: str | None = None, **kw) -> None:
        content_id = kw.pop("content_id", "c-" + name)
        self.writer.put(FileSeen(f"/lib/{name}", 1, 1, content_id))
        self.writer.put(annotation(content_id, tags, description, **kw))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.store.close()
