"""The web app: pages, a JSON API for the grid and the viewer, thumbnails, decisions.

Everything reads and writes through vlmtag.api.Library, like the command line. Database work
runs on the event loop's thread (one connection, queries of milliseconds); thumbnails are
made in their own bounded pool. Pictures are found by content id only, from the path the
database holds for it: never from a path a browser sends.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from vlmtag import __version__
from vlmtag.api import Library
from vlmtag.errors import ImageError, SetupError, UsageError
from vlmtag.ingest.files import open_regular
from vlmtag.library.browse import SHOWS, Filters
from vlmtag.library.index import has_cjk
from vlmtag.text import printable
from vlmtag.web import i18n
from vlmtag.web.cloud import KeywordCloud
from vlmtag.web.guard import COOKIE, Guard, middleware
from vlmtag.web.inputs import (
    MAX_SELECTION,
    day_ns,
    ids_of,
    ids_problem,
    keywords_problem,
    percent,
    read_json,
    strings_ok,
)
from vlmtag.web.meaning import Meaning
from vlmtag.web.thumbs import CONTENT_ID, SIZES, Thumbnails
from vlmtag.web.views import keyword_json, run_row, tile_json

HERE = Path(__file__).parent
CLOUD_SIZE = 40
STREAM_FORMATS = ("csv", "json", "jsonl")
EXPORT_FORMATS = (*STREAM_FORMATS, "xmp", "txt")


class WebApp:
    def __init__(self, db_path: str, guard: Guard, thumbs: Thumbnails):
        self.library = Library.open(db_path)
        self.guard = guard
        self.thumbs = thumbs
        self.cloud = KeywordCloud(db_path, self.change_mark)
        self.meaning = Meaning(db_path, readonly=guard.read_only)
        self._cache: dict[tuple, Any] = {}
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )

    # ---- pages ---------------------------------------------------------------------------

    def language(self, request: Request) -> str:
        return i18n.choose(
            request.query_params.get("lang"),
            request.cookies.get("vlmtag_lang"),
            request.headers.get("accept-language"),
        )

    def page(self, request: Request, template: str, **values: Any) -> HTMLResponse:
        lang = self.language(request)
        words = i18n.WORDS[lang]
        body = self.templates.get_template(template).render(
            t=words, lang=lang, version=__version__, token=self.guard.change_token,
            read_only=self.guard.read_only, words_json=json.dumps(words, ensure_ascii=False),
            **values,
        )  # fmt: skip
        response = HTMLResponse(body)
        if request.query_params.get("lang") in i18n.LANGUAGES:
            response.set_cookie("vlmtag_lang", lang, samesite="strict", max_age=3600 * 24 * 365)
        token = request.query_params.get("token")
        if self.guard.access_token and token == self.guard.access_token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def index(self, request: Request) -> Response:
        return self.page(
            request,
            "index.html",
            models=self.library.known_models(),
            languages=self.library.known_languages(),
        )

    async def failures_page(self, request: Request) -> Response:
        rows = self.library.failures()
        return self.page(request, "failures.html", failures=rows[:5000], total=len(rows))

    async def runs_page(self, request: Request) -> Response:
        return self.page(request, "runs.html", runs=[run_row(r) for r in self.library.runs(200)])

    async def tags_page(self, request: Request) -> Response:
        return self.page(request, "tags.html")

    # ---- the JSON API --------------------------------------------------------------------

    def filters(self, request: Request) -> Filters:
        """The grid's filters from the URL; what cannot be read is left out, not refused
        (a bookmark with a typo still opens)."""
        q = request.query_params
        show = q.get("show", "tagged")
        return Filters(
            tags=tuple(t for t in q.getlist("tag") if t.strip())[:20],
            folder=q.get("folder") or None,
            model=q.get("model") or None,
            language=q.get("language") or None,
            unreviewed=q.get("review") == "1",
            min_confidence=percent(q.get("conf")),
            since_ns=day_ns(q.get("from")),
            until_ns=day_ns(q.get("to"), next_day=True),
            show=show if show in SHOWS else "tagged",
        )

    async def images(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "60"))
        except ValueError:
            limit = 60
        asked = dict(
            query=q.get("q") or None,
            sort=q.get("sort", "path"),
            after=q.get("after") or None,
            limit=limit,
        )
        note = None
        try:
            if self.by_meaning(request):
                found = await self.meaning.browse(self.filters(request), **asked)
            else:
                if q.get("semantic") == "1" and asked["query"]:
                    note = "by meaning understands English only; searched the words instead"
                found = self.library.browse(self.filters(request), **asked)
        except (UsageError, SetupError) as exc:
            return JSONResponse({"error": printable(str(exc))}, status_code=400)
        return JSONResponse(
            {"tiles": [tile_json(t) for t in found.tiles], "after": found.after,
             "total": found.total, "note": note}
        )  # fmt: skip

    def by_meaning(self, request: Request) -> bool:
        """A search by meaning was asked for and can be one: the embedding model knows
        English only, so CJK text is searched as words (as `vlmtag search` does)."""
        q = request.query_params
        text = q.get("q") or ""
        return q.get("semantic") == "1" and bool(text.strip()) and not has_cjk(text)

    async def count(self, request: Request) -> Response:
        """How many the grid holds: its own request, so the grid never waits for it; kept
        until the database changes (another connection's commit, or ours)."""
        q = request.query_params.get("q") or None
        filters = self.filters(request)
        if self.by_meaning(request):
            return JSONResponse({"total": None})  # a ranked page says its own
        try:
            total = self.cached(
                ("count", request.url.query), lambda: self.library.count(filters, query=q)
            )
        except UsageError as exc:
            return JSONResponse({"error": printable(str(exc))}, status_code=400)
        return JSONResponse({"total": total})

    def change_mark(self) -> tuple[int, int]:
        """What changes when the database does: another connection's commit, or ours."""
        conn = self.library.store.conn
        return conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes

    def cached(self, key: tuple, compute: Any) -> Any:
        """compute(), kept until the database changes (another connection's commit, or
        one of ours): counts over the whole library are read once per change."""
        full = (*key, self.change_mark())
        if full not in self._cache:
            if len(self._cache) > 200:
                self._cache.clear()
            self._cache[full] = compute()
        return self._cache[full]

    async def image(self, request: Request) -> Response:
        content_id = request.path_params["content_id"]
        record = self.library.content(content_id) if CONTENT_ID.match(content_id) else None
        if record is None:
            return JSONResponse({"error": "no such image"}, status_code=404)
        chosen = record.chosen
        return JSONResponse(
            {
                "id": content_id,
                "path": printable(record.path),
                "other_paths": [printable(p) for p in record.other_paths],
                "keywords": [keyword_json(k) for k in (chosen.keywords if chosen else [])],
                "description": chosen.description if chosen else None,
                "model": chosen.model if chosen else None,
                "language": chosen.language if chosen else None,
                "width": chosen.width if chosen else None,
                "height": chosen.height if chosen else None,
                "created_at": chosen.created_at if chosen else None,
            }
        )

    async def tags(self, request: Request) -> Response:
        prefix = (request.query_params.get("prefix") or "").strip().lower()
        counts = self.cloud.counts()
        if prefix:
            counts = [c for c in counts if c.tag.lower().startswith(prefix)]
        try:
            limit = max(1, min(int(request.query_params.get("limit", CLOUD_SIZE)), 500))
        except ValueError:
            limit = CLOUD_SIZE
        return JSONResponse(
            {"tags": [{"text": c.tag, "count": c.count} for c in counts[:limit]],
             "total": len(counts)}
        )  # fmt: skip

    async def picture(self, request: Request) -> Response:
        content_id, size = request.path_params["content_id"], request.path_params["size"]
        if not CONTENT_ID.match(content_id) or size not in SIZES:
            return Response("no such image", status_code=404)
        etag = f'"{content_id[:32]}-{size}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        paths = self.library.store.paths_of(content_id)
        source = next((p for p in paths if _regular(p)), None)
        cached = self.thumbs.path_for(content_id, size)
        if source is None and not cached.is_file():
            return Response("no such image", status_code=404)
        try:
            found = await self.thumbs.get(content_id, size, source or "")
        except (ImageError, OSError):
            return Response("this picture cannot be shown", status_code=404)
        return FileResponse(
            found,
            media_type="image/jpeg",
            headers={"etag": etag, "cache-control": "private, max-age=31536000, immutable"},
        )

    async def decide(self, request: Request) -> Response:
        """Add or reject keywords on the selection: `ids`, or with `all` every image of the
        grid's filters and query (at most MAX_SELECTION)."""
        chosen = await self.selected(request)
        if isinstance(chosen, Response):
            return chosen
        body, ids = chosen
        action, keywords = body.get("action"), body.get("keywords")
        if action not in ("add", "reject"):
            return JSONResponse({"error": "action must be add or reject"}, 400)
        problem = keywords_problem(keywords)
        if problem:
            return JSONResponse({"error": problem}, 400)
        if not ids:
            return JSONResponse({"error": "no image matches: nothing to change"}, 400)
        try:
            changed = self.library.decide(ids, action, keywords, via="web")
        except UsageError as exc:
            return JSONResponse({"error": printable(str(exc))}, 400)
        return JSONResponse({"changed": changed, "images": len(ids)})

    async def selected(self, request: Request) -> tuple[dict[str, Any], list[str]] | Response:
        """The request's JSON body and the pictures it is about (chosen_ids), or the answer
        that says what is wrong with either."""
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        ids = self.chosen_ids(request, body)
        if isinstance(ids, Response):
            return ids
        return body, ids

    def chosen_ids(self, request: Request, body: dict[str, Any]) -> list[str] | Response:
        """The pictures a change or a summary is about: `ids` (each one the library has),
        or with `all` every image of the grid's filters and query, less `except`."""
        if body.get("all") is True:
            if request.query_params.get("show") == "failed":
                return JSONResponse({"error": "failed images cannot be given keywords"}, 400)
            try:
                ids = self.grid_ids(request, at_most=MAX_SELECTION + 1)
            except UsageError as exc:
                return JSONResponse({"error": printable(str(exc))}, 400)
            if len(ids) > MAX_SELECTION:
                return JSONResponse(
                    {"error": f"more than {MAX_SELECTION:,} images: narrow the search first"},
                    400,
                )
            left_out = set(ids_of(body.get("except")))
            return sorted(ids - left_out)
        given = body.get("ids")
        ids = ids_of(given)
        if not ids:
            return JSONResponse({"error": ids_problem(given)}, 400)
        known = self.library.known_contents(ids)
        if len(known) != len(ids):
            return JSONResponse({"error": "no such image (the page may be out of date)"}, 404)
        return ids

    async def selection(self, request: Request) -> Response:
        """The keywords of a selection and on how many of its images each one is, so the
        page can show which only some of them have."""
        chosen = await self.selected(request)
        if isinstance(chosen, Response):
            return chosen
        _, ids = chosen
        counts: dict[str, list[Any]] = {}
        for n in range(0, len(ids), 500):
            for key, text, held in self.library.keywords_held(ids[n : n + 500]):
                entry = counts.setdefault(key, [text, 0])
                entry[1] += held
        shown = sorted(counts.values(), key=lambda e: (-e[1], e[0].casefold()))[:200]
        return JSONResponse(
            {"images": len(ids), "keywords": [{"text": t, "count": c} for t, c in shown]}
        )

    async def vocab(self, request: Request) -> Response:
        """The tag manager's operations, the same as `vlmtag tags rename/merge/drop`."""
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        action, words, target = body.get("action"), body.get("keywords"), body.get("into")
        if action not in ("rename", "merge", "drop") or not strings_ok(words):
            return JSONResponse({"error": "action and keywords are needed"}, 400)
        if action in ("rename", "merge") and not (isinstance(target, str) and target.strip()):
            return JSONResponse({"error": "say the new keyword"}, 400)
        try:
            if action == "rename":
                changed = self.library.rename_keyword(words[0], target)
            elif action == "merge":
                changed = self.library.merge_keywords(words, target)
            else:
                changed = sum(self.library.drop_keyword(w) for w in words)
        except UsageError as exc:
            return JSONResponse({"error": printable(str(exc))}, 400)
        self.cloud.refresh_now()
        return JSONResponse({"changed": changed})

    async def describe(self, request: Request) -> Response:
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        ids, text = self.chosen_ids(request, {"ids": body.get("ids")}), body.get("text")
        if isinstance(ids, Response):
            return ids
        if not isinstance(text, str):
            return JSONResponse({"error": "the description must be text"}, 400)
        try:
            changed = self.library.describe_content(ids, text, via="web")
        except UsageError as exc:
            return JSONResponse({"error": printable(str(exc))}, 400)
        return JSONResponse({"changed": changed})

    async def undo(self, request: Request) -> Response:
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        content_id = body.get("id")
        if content_id is not None and not (
            isinstance(content_id, str)
            and CONTENT_ID.match(content_id)
            and self.library.known_contents([content_id])
        ):
            return JSONResponse({"error": "no such image"}, 404)
        taken = self.library.undo_content(content_id, via="web")
        ids = list(dict.fromkeys(c for c, _ in taken))
        return JSONResponse({"undone": len(taken), "ids": ids[:MAX_SELECTION]})

    async def keywords(self, request: Request) -> Response:
        """The current keywords of many pictures at once (tiles refreshed after a bulk edit)."""
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        found = self.library.chosen_keywords(ids_of(body.get("ids")))
        return JSONResponse(
            {"keywords": {c: [keyword_json(k) for k in kws] for c, kws in found.items()}}
        )

    async def export(self, request: Request) -> Response:
        """The selection (ids), or every image of the grid's filters and query, exported
        with `vlmtag export`'s own code: CSV/JSON/JSONL as a download; XMP sidecars and
        .txt captions written beside the pictures, as `vlmtag export --format xmp` does."""
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        fmt = body.get("format")
        if self.guard.read_only and fmt not in STREAM_FORMATS:
            return JSONResponse(
                {"error": "this server was started with --read-only: XMP and .txt exports "
                 "write files; download CSV or JSON instead"}, 403,
            )  # fmt: skip
        if fmt not in EXPORT_FORMATS:
            return JSONResponse(
                {"error": f"format must be one of {', '.join(EXPORT_FORMATS)}"}, 400
            )
        given = body.get("ids")
        try:
            if given in (None, []):  # nothing selected: every image of the grid's view
                ids = self.grid_ids(request)
            else:
                chosen = self.chosen_ids(request, {"ids": given})
                if isinstance(chosen, Response):
                    return chosen
                ids = set(chosen)
        except UsageError as exc:
            return JSONResponse({"error": printable(str(exc))}, 400)
        if fmt in STREAM_FORMATS:
            out = io.StringIO()
            self.library.export_stream(fmt, out, only=ids)
            name = f"vlmtag-export.{fmt}"
            media = "text/csv" if fmt == "csv" else "application/json"
            return Response(
                out.getvalue(),
                media_type=f"{media}; charset=utf-8",
                headers={"content-disposition": f'attachment; filename="{name}"'},
            )
        counts: dict[str, int] = {}
        for outcome in self.library.export_files(fmt, only=ids):
            counts[outcome.action] = counts.get(outcome.action, 0) + 1
        return JSONResponse({"written": counts})

    def grid_ids(self, request: Request, at_most: int | None = None) -> set[str]:
        """The content ids of every image the grid shows for the request's filters (a
        semantic search's too; at most `at_most`, where given)."""
        q = request.query_params
        ids: set[str] = set()
        after = None
        while True:
            found = self.library.browse(
                self.filters(request), query=q.get("q") or None, after=after, limit=200,
                semantic=self.by_meaning(request),
            )  # fmt: skip
            ids.update(t.content_id for t in found.tiles if t.content_id)
            after = found.after
            if after is None or (at_most is not None and len(ids) >= at_most):
                return ids

    def close(self) -> None:
        self.meaning.close()
        self.cloud.close()
        self.thumbs.close()
        self.library.close()


def _regular(path: str) -> bool:
    try:
        stream, _ = open_regular(path)
    except ImageError:
        return False
    stream.close()
    return True


def create_app(db_path: str, guard: Guard, thumbs_folder: Path) -> Starlette:
    web = WebApp(db_path, guard, Thumbnails(thumbs_folder))
    routes = [
        Route("/", web.index),
        Route("/failures", web.failures_page),
        Route("/runs", web.runs_page),
        Route("/tags", web.tags_page),
        Route("/api/images", web.images),
        Route("/api/count", web.count),
        Route("/api/image/{content_id}", web.image),
        Route("/api/tags", web.tags),
        Route("/picture/{content_id}/{size}", web.picture),
        Route("/api/decide", web.decide, methods=["POST"]),
        Route("/api/describe", web.describe, methods=["POST"]),
        Route("/api/undo", web.undo, methods=["POST"]),
        Route("/api/export", web.export, methods=["POST"]),
        Route("/api/selection", web.selection, methods=["POST"]),
        Route("/api/vocab", web.vocab, methods=["POST"]),
        Route("/api/keywords", web.keywords, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        web.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.web = web
    return middleware(app, guard)  # type: ignore[return-value]
