"""The public API: a Library is one vlmtag database and everything that can be done with it.

    from vlmtag import Library
    with Library.open("photos.db", create=True) as library:
        result = library.tag(["~/Pictures"], backend="builtin")
        for hit in library.search("cat"):
            print(hit.path)
        library.add_keywords(["~/Pictures/felix.jpg"], ["Felix"])
        library.export("xmp", folder="~/Pictures")

The command line is a thin layer over this class; the web app will be another.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from vlmtag.config import Settings
from vlmtag.errors import UsageError
from vlmtag.library import browse, current, decisions, search, vocab
from vlmtag.library.current import (
    ALL_LANGUAGES,
    Decision,
    ImageView,
    Keyword,
    KeywordCount,
    Selection,
)
from vlmtag.library.db import Store, default_db_path
from vlmtag.library.rows import FileSeen
from vlmtag.output import formats
from vlmtag.output.files import Outcome, Placement, common_folder, export_files, replacing
from vlmtag.output.records import record
from vlmtag.text import keyword_key, person_keyword


@dataclass
class ImageRecord:
    """Everything stored about one file: its current keywords, history and other copies."""

    path: str
    content_id: str
    present: bool
    other_paths: list[str]
    chosen: ImageView | None  # its current keywords, as every reader chooses them
    sets: list[ImageView]  # every current keyword set, the chosen one first
    annotations: list[dict[str, Any]]  # what each model said, newest first
    decisions: list[Decision] = field(default_factory=list)


class Library:
    """A vlmtag database. Use Library.open(); close() (or a with block) when done."""

    def __init__(self, store: Store):
        self.store = store

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        create: bool = False,
        readonly: bool = False,
    ) -> Library:
        """Open the database at path ($VLMTAG_DB or the default one when None).

        create: make it if it does not exist. readonly: never write to it. Otherwise it is
        opened for writing where it can be, and read-only where it cannot (a read-only file
        or share): reading, searching and exporting work either way.
        """
        where = os.path.expanduser(os.fspath(path)) if path is not None else default_db_path()
        if readonly:
            return cls(Store.open(where, create=False, readonly=True))
        if create:
            return cls(Store.open(where))
        return cls(Store.open_for_reading(where))

    @property
    def path(self) -> str:
        return self.store.path

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tagging -----------------------------------------------------------------------

    def tag(self, paths: Iterable[str], settings: Settings | None = None, **options: Any):
        """Tag every image under paths; returns the run's RunResult. See tag_async."""
        return asyncio.run(self.tag_async(paths, settings, **options))

    async def tag_async(
        self,
        paths: Iterable[str],
        settings: Settings | None = None,
        *,
        progress: Any = None,
        control: Any = None,
        **options: Any,
    ):
        """Tag images into this library. options are Settings fields (backend, model, ...)."""
        from vlmtag.config import normalise_backend
        from vlmtag.run.job import run_tag

        chosen = replace(settings or Settings(), **options)
        chosen = replace(
            chosen,
            paths=[os.path.abspath(os.path.expanduser(p)) for p in paths],
            db=self.path,
            backend=normalise_backend(chosen.backend),
        )
        return await run_tag(chosen, progress, control)

    # ---- reading -----------------------------------------------------------------------

    def selection(self, *, language: str | None = None, model: str | None = None) -> Selection:
        """Which keyword set of each image to read; UsageError when it matches nothing."""
        language = _language(language)
        for column, value, flag in (
            ("language", language, "--language"),
            ("model", model, "--model"),
        ):
            if value is not None:
                present = current.known(self.store.conn, column)
                if value not in present:
                    listed = ", ".join(present) or "none yet"
                    raise UsageError(
                        f"no image has keywords of {flag} {value}; in this database: {listed}"
                    )
        return Selection(language, model)

    def images(
        self,
        *,
        language: str | None = None,
        model: str | None = None,
        folder: str | None = None,
    ) -> Iterator[ImageView]:
        """Each file on disk with its current keywords and description, by path."""
        selection = self.selection(language=language, model=model)
        return current.views(self.store.conn, selection, path_prefix=_prefix(folder))

    def image(
        self, path: str, *, language: str | None = None, model: str | None = None
    ) -> ImageRecord:
        """Everything stored for one file; UsageError if it is not in the library."""
        path = os.path.abspath(os.path.expanduser(path))
        content = decisions.content_of(self.store, path)
        row = self.store.file_row(path)
        selection = Selection(_language(language), model)
        chosen, sets = current.sets_of_content(self.store.conn, content, selection)
        return ImageRecord(
            path=path,
            content_id=content,
            present=bool(row["present"]),
            other_paths=[p for p in self.store.paths_of(content) if p != path],
            chosen=chosen,
            sets=sets,
            annotations=self.store.annotations_of(content),
            decisions=decisions.history(self.store, content),
        )

    def search(
        self,
        query: str,
        *,
        language: str | None = None,
        model: str | None = None,
        folder: str | None = None,
        limit: int | None = None,
        details: bool = False,
    ) -> list[search.Hit]:
        """Files whose current keywords or description match query (see library/search.py)."""
        chosen = self.selection(language=language, model=model)
        return search.search(
            self.store, query, language=chosen.language, model=chosen.model,
            path_prefix=folder, limit=limit, details=details,
        )  # fmt: skip

    def search_meaning(
        self, query: str, *, model: str | None = None, folder: str | None = None, limit: int = 20
    ) -> list[tuple[str, float]]:
        """Files whose English keywords mean what query says (extra: semantic)."""
        from vlmtag.library.semantic import semantic_search

        self.selection(model=model)
        return semantic_search(self.store, query, limit=limit, model=model, path_prefix=folder)

    def keyword_counts(
        self, *, language: str | None = None, model: str | None = None, limit: int | None = None
    ) -> list[KeywordCount]:
        selection = self.selection(language=language, model=model)
        return current.keyword_counts(self.store.conn, selection, limit=limit)

    def known_contents(self, content_ids: list[str]) -> set[str]:
        """Which of these content ids are pictures the library has a file of."""
        return self.store.known_contents(content_ids)

    def chosen_keywords(self, content_ids: list[str]) -> dict[str, list[Keyword]]:
        """Each picture's current keywords (the set every reader shows), by content id."""
        return current.chosen_keywords(self.store.conn, content_ids)

    def keywords_held(self, content_ids: list[str]) -> list[tuple[str, str, int]]:
        """(key, keyword, on how many of them) over these pictures' current keywords."""
        return current.keywords_held(self.store.conn, content_ids)

    def known_languages(self) -> list[str]:
        """The languages images have keywords in."""
        return current.known(self.store.conn, "language")

    def known_models(self) -> list[str]:
        return current.known(self.store.conn, "model")

    def browse(
        self,
        filters: browse.Filters | None = None,
        *,
        query: str | None = None,
        sort: str = "path",
        after: str | None = None,
        limit: int = 60,
        semantic: bool = False,
    ) -> browse.Page:
        """A page of images for a person to look through (the web app's grid): all of them,
        or what `query` finds (`vlmtag search`'s language), narrowed by filters, in `sort`
        order; `after` is the cursor of the page before. With `semantic`, the query is
        ranked by meaning (extra: semantic), best first, and `sort` does not apply."""
        filters = _in_folder(filters or browse.Filters())
        if semantic and query and query.strip() and filters.show == "tagged":
            ranked = self.search_meaning(
                query, model=filters.model, folder=filters.folder, limit=browse.RANKED_MAX
            )
            return browse.ranked_page(self.store.conn, ranked, filters, after=after, limit=limit)
        filters = _with_query(filters, query)
        return browse.page(self.store.conn, filters, sort=sort, after=after, limit=limit)

    def count(self, filters: browse.Filters | None = None, *, query: str | None = None) -> int:
        """How many files a grid of these filters (and query) holds."""
        filters = _in_folder(filters or browse.Filters())
        return browse.count(self.store.conn, _with_query(filters, query))

    def content(self, content_id: str) -> ImageRecord | None:
        """Everything stored for one picture, by its content id (None if unknown): what the
        web app shows, read by the id, never by a path a browser sent."""
        paths = self.store.paths_of(content_id)
        if not paths:
            return None
        return self.image(paths[0])

    def decide(
        self, content_ids: Iterable[str], action: str, keywords: Iterable[str], *, via: str
    ) -> int:
        """A person adds ("add") or rejects ("reject") keywords on pictures by content id;
        `via` names the way in ("web")."""
        if action not in ("add", "reject"):
            raise UsageError(f"unknown decision {action!r}; add or reject")
        return decisions.decide_keywords(
            self.store, list(content_ids), action, keywords, language=ALL_LANGUAGES,
            author=decisions.default_author(via),
        )  # fmt: skip

    def describe_content(self, content_ids: Iterable[str], text: str, *, via: str) -> int:
        return decisions.describe(
            self.store, list(content_ids), text, language=ALL_LANGUAGES,
            author=decisions.default_author(via),
        )  # fmt: skip

    def undo_content(
        self, content_id: str | None = None, *, via: str
    ) -> list[tuple[str, Decision]]:
        """Take back the last action: every decision it made, so one press undoes a keyword
        added to 500 selected pictures; again, the one before. Given a picture, the last
        action on it, on that picture only.
        Returns (content id, decision) pairs."""
        return decisions.undo_action(
            self.store, content_id=content_id, author=decisions.default_author(via),
            only_there=content_id is not None,
        )  # fmt: skip

    def failures(self) -> list[dict[str, Any]]:
        return self.store.failures()

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        return self.store.runs(limit)

    # ---- people's decisions --------------------------------------------------------------

    def add_keywords(
        self, paths: Iterable[str], keywords: Iterable[str], *, language: str | None = None
    ) -> int:
        """Add keywords to images by hand, as typed; no later run removes them. They hold in
        every language unless one is named. Returns how many decisions were recorded."""
        return decisions.decide_keywords(
            self.store, self._contents(paths), "add", keywords, language=_scope(language)
        )

    def reject_keywords(
        self, paths: Iterable[str], keywords: Iterable[str], *, language: str | None = None
    ) -> int:
        """Reject keywords on images; no model brings them back. Returns how many the images
        showed (the others are rejected all the same, should a model say them later)."""
        contents = self._contents(paths)
        words = list(keywords)
        keys = {keyword_key(person_keyword(w)) for w in words}
        showing = sum(len(keys & current.keys_of(self.store.conn, c)) for c in contents)
        decisions.decide_keywords(self.store, contents, "reject", words, language=_scope(language))
        return showing

    def describe(self, paths: Iterable[str], text: str, *, language: str | None = None) -> int:
        """A person's description of images; it wins over every model's."""
        return decisions.describe(
            self.store, self._contents(paths), text, language=_scope(language)
        )

    def undo(self, path: str | None = None, count: int = 1) -> list[Decision]:
        """Take back the last decisions (on one image, if given)."""
        content = self._contents([path])[0] if path is not None else None
        return decisions.undo(self.store, content_id=content, count=count)

    def _contents(self, paths: Iterable[str]) -> list[str]:
        out = [
            decisions.content_of(self.store, os.path.abspath(os.path.expanduser(p))) for p in paths
        ]
        if not out:
            raise UsageError("name at least one image")
        return out

    # ---- the vocabulary --------------------------------------------------------------------

    def rename_keyword(self, old: str, new: str) -> int:
        return vocab.rename(self.store, old, new)

    def merge_keywords(self, sources: Iterable[str], target: str) -> int:
        return vocab.merge(self.store, sources, target)

    def drop_keyword(self, word: str) -> int:
        return vocab.drop(self.store, word)

    def apply_rules(self, path: str):
        return vocab.apply_rules_file(self.store, path)

    # ---- export ----------------------------------------------------------------------------

    def export(self, fmt: str, *, out: str | None = None, **options: Any) -> dict[str, int]:
        """Export in any format to the end; how many images ended how (created, updated,
        unchanged, skipped, failed). out: the file (streams) or folder (per-image formats)."""
        if formats.make(fmt).per_image:
            counts: dict[str, int] = {}
            for outcome in self.export_files(fmt, out_dir=out, **options):
                counts[outcome.action] = counts.get(outcome.action, 0) + 1
            return counts
        if out is None:
            return {"created": self.export_stream(fmt, sys.stdout, **options)}
        return {"created": self.export_to_file(fmt, out, **options)}

    def export_to_file(self, fmt: str, out: str, **options: Any) -> int:
        """export_stream into the file out, which only a whole export replaces; UsageError for
        a file that must never be overwritten (an image of the library, the library itself)."""
        out = os.path.expanduser(out)
        self.check_export_target(out)
        with replacing(out) as fh:
            return self.export_stream(fmt, fh, **options)

    def check_export_target(self, out: str) -> None:
        """UsageError when writing the file out would destroy a photo or the database."""
        path = os.path.abspath(out)
        real = os.path.realpath(path)
        if any(self.store.file_row(p) is not None for p in {path, real}):
            raise UsageError(
                f"--out {out} is an image in the library; an export never overwrites a "
                "photo: give the name of a new file (tags.jsonl)"
            )
        db = os.path.realpath(self.store.path)
        if real in {db, db + "-wal", db + "-shm", db + "-journal"}:
            raise UsageError(
                f"--out {out} is the vlmtag database; give the name of a new file (tags.jsonl)"
            )

    def export_stream(
        self,
        fmt: str,
        out: TextIO | None = None,
        *,
        folder: str | None = None,
        language: str | None = None,
        model: str | None = None,
        min_confidence: float | None = None,
        only: set[str] | None = None,
    ) -> int:
        """Write every image (under folder; of the contents `only` names, if given) as jsonl,
        json or csv to out; returns how many."""
        writer = formats.make(fmt)
        if writer.per_image:
            raise UsageError(f"--format {fmt} writes a file per image; use export_files")
        views = self.images(language=language, model=model, folder=_existing(folder))
        if only is not None:
            views = (v for v in views if v.content_id in only)
        records = (record(v, min_confidence) for v in views)
        return writer.write(records, out or sys.stdout)

    def export_files(
        self,
        fmt: str,
        *,
        out_dir: str | None = None,
        folder: str | None = None,
        language: str | None = None,
        model: str | None = None,
        min_confidence: float | None = None,
        skip_existing: bool = False,
        dry_run: bool = False,
        only: set[str] | None = None,
        **format_options: Any,
    ) -> Iterator[Outcome]:
        """A caption or sidecar per image (of the contents `only` names, if given), beside
        it or in a mirror tree under out_dir."""
        kind = formats.make(fmt, min_confidence=min_confidence, **format_options)
        if not kind.per_image:
            raise UsageError(f"--format {fmt} writes one stream; use export_stream")
        folder = _existing(folder)
        self.selection(language=language, model=model)
        root = None
        if folder is not None:
            root = folder if os.path.isdir(folder) else os.path.dirname(folder)
        if out_dir is not None:
            if root is None:  # a first pass, paths only: the tree to mirror is known first
                paths = (v.path for v in self.images(language=language, model=model))
                root = common_folder(paths) or os.getcwd()
            if not dry_run:
                try:
                    os.makedirs(out_dir, exist_ok=True)
                except OSError as exc:
                    raise UsageError(
                        f"--out {out_dir}: the folder cannot be made ({exc.strerror or exc}); "
                        "give a folder you can write to"
                    ) from None
        placement = Placement(out_dir, root, create=not dry_run)
        views = self.images(language=language, model=model, folder=folder)
        if only is not None:
            views = (v for v in views if v.content_id in only)
        return export_files(views, kind, placement, skip_existing=skip_existing, dry_run=dry_run)

    def embed(
        self,
        exiftool: Any,
        *,
        folder: str | None = None,
        language: str | None = None,
        model: str | None = None,
        min_confidence: float | None = None,
        overwrite_original: bool = False,
        dry_run: bool = False,
    ) -> Iterator[Outcome]:
        """Keywords and description into the image files themselves, through exiftool."""
        from vlmtag.output.embed import embed

        views = self.images(language=language, model=model, folder=_existing(folder))
        keeper = _Identity(self.store) if not self.store.readonly else None
        try:
            yield from embed(
                views,
                exiftool,
                keeper=keeper,
                min_confidence=min_confidence,
                overwrite_original=overwrite_original,
                dry_run=dry_run,
            )
        finally:
            if keeper is not None:
                keeper.close()


class _Identity:
    """--embed rewrites files; their new size and mtime are recorded under the same content."""

    def __init__(self, store: Store):
        self.store = store
        self.writer = None

    def unchanged(self, view: ImageView, st: os.stat_result) -> bool:
        known = self.store.file_row(view.path)
        return (
            known is not None
            and known["content_id"] == view.content_id
            and known["size"] == st.st_size
            and known["mtime_ns"] == st.st_mtime_ns
        )

    def record(self, view: ImageView, st: os.stat_result) -> None:
        if self.writer is None:
            from vlmtag.library.writer import Writer

            self.writer = Writer(self.store.path)
        self.writer.put(FileSeen(view.path, st.st_size, st.st_mtime_ns, view.content_id))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _with_query(filters: browse.Filters, query: str | None) -> browse.Filters:
    if not query or not query.strip():
        return filters
    return replace(filters, match=search.compile_query(query))


def _in_folder(filters: browse.Filters) -> browse.Filters:
    """The folder filter as what is inside that folder (even one gone from disk since),
    never its namesakes: /photos/set is not /photos/set1."""
    if not filters.folder:
        return filters
    folder = os.path.abspath(os.path.expanduser(filters.folder))
    return replace(filters, folder=folder.rstrip(os.sep) + os.sep)


def _language(language: str | None) -> str | None:
    """A language as the database keeps it ("zh_CN" -> "zh"); UsageError if unknown."""
    if language is None:
        return None
    from vlmtag.models.prompts import resolve_language

    return resolve_language(language)


def _scope(language: str | None) -> str:
    """Where a decision holds: a language, or every language ('')."""
    return _language(language) or ALL_LANGUAGES


def _prefix(folder: str | None) -> str | None:
    """A folder as a path prefix: what is inside it, never its namesakes (/photos2)."""
    if not folder:
        return None
    prefix = os.path.abspath(os.path.expanduser(folder))
    if os.path.isdir(prefix) and not prefix.endswith(os.sep):
        prefix += os.sep
    return prefix


def _existing(folder: str | None) -> str | None:
    if folder is None:
        return None
    path = os.path.abspath(os.path.expanduser(folder))
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist; name a folder (or image) that is in the library")
    return path


__all__ = ["ImageRecord", "Library", "ALL_LANGUAGES"]
