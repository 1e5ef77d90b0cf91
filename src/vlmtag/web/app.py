"""The web app: pages, a JSON API for the grid and the viewer, thumbnails, decisions.

Everything reads and writes through vlmtag.api.Library, like the command line. Database work
runs on the event loop's thread (one connection, queries of milliseconds); thumbnails are
made in their own bounded pool. Pictures are found by content id only, from the path the
database holds for it: never from a path a browser sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
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
from vlmtag.library.browse import SHOWS, Filters, Tile
from vlmtag.text import printable
from vlmtag.web import i18n
from vlmtag.web.cloud import KeywordCloud
from vlmtag.web.guard import COOKIE, Guard, middleware
from vlmtag.web.thumbs import CONTENT_ID, SIZES, Thumbnails

HERE = Path(__file__).parent
MAX_BODY = 1_000_000  # a decision is a few hundred bytes; a selection of 10,000 ids ~700 KB
MAX_SELECTION = 10_000
CLOUD_SIZE = 40
STREAM_FORMATS = ("csv", "json", "jsonl")
EXPORT_FORMATS = (*STREAM_FORMATS, "xmp", "txt")


class WebApp:
    def __init__(self, db_path: str, guard: Guard, thumbs: Thumbnails):
        self.library = Library.open(db_path)
        self.guard = guard
        self.thumbs = thumbs
        self.cloud = KeywordCloud(db_path, self.change_mark)
        self.meaning = Meaning(db_path)
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
            min_confidence=_percent(q.get("conf")),
            since_ns=_day_ns(q.get("from")),
            until_ns=_day_ns(q.get("to"), next_day=True),
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
        try:
            if q.get("semantic") == "1" and asked["query"]:
                found = await self.meaning.browse(self.filters(request), **asked)
            else:
                found = self.library.browse(self.filters(request), **asked)
        except (UsageError, SetupError) as exc:
            return JSONResponse({"error": printable(str(exc))}, status_code=400)
        return JSONResponse(
            {"tiles": [tile_json(t) for t in found.tiles], "after": found.after,
             "total": found.total}
        )  # fmt: skip

    async def count(self, request: Request) -> Response:
        """How many the grid holds: its own request, so the grid never waits for it; kept
        until the database changes (another connection's commit, or ours)."""
        q = request.query_params.get("q") or None
        filters = self.filters(request)
        if request.query_params.get("semantic") == "1" and q:
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
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        ids = self.chosen_ids(request, body)
        if isinstance(ids, Response):
            return ids
        action, keywords = body.get("action"), body.get("keywords")
        if not ids or action not in ("add", "reject") or not _strings(keywords):
            return JSONResponse({"error": "ids, action and keywords are needed"}, 400)
        try:
            changed = self.library.decide(ids, action, keywords, via="web")
        except UsageError as exc:
            return JSONResponse({"error": printable(str(exc))}, 400)
        return JSONResponse({"changed": changed, "images": len(ids)})

    def chosen_ids(self, request: Request, body: dict[str, Any]) -> list[str] | Response:
        if body.get("all") is True:
            try:
                ids = self.grid_ids(request, at_most=MAX_SELECTION + 1)
            except UsageError as exc:
                return JSONResponse({"error": printable(str(exc))}, 400)
            if len(ids) > MAX_SELECTION:
                return JSONResponse(
                    {"error": f"more than {MAX_SELECTION:,} images: narrow the search first"},
                    400,
                )
            return sorted(ids)
        return _ids(body.get("ids"))

    async def selection(self, request: Request) -> Response:
        """The keywords of a selection and on how many of its images each one is, so the
        page can show which only some of them have."""
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        ids = self.chosen_ids(request, body)
        if isinstance(ids, Response):
            return ids
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
        if action not in ("rename", "merge", "drop") or not _strings(words):
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
        ids, text = _ids(body.get("ids")), body.get("text")
        if not ids or not isinstance(text, str):
            return JSONResponse({"error": "ids and text are needed"}, 400)
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
            isinstance(content_id, str) and CONTENT_ID.match(content_id)
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
        found = self.library.chosen_keywords(_ids(body.get("ids")))
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
        if fmt not in EXPORT_FORMATS:
            return JSONResponse(
                {"error": f"format must be one of {', '.join(EXPORT_FORMATS)}"}, 400
            )
        ids = set(_ids(body.get("ids"))) or self.grid_ids(request)
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
                semantic=q.get("semantic") == "1",
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


class Meaning:
    """Searches by meaning, on a thread and a connection of their own: the first one after
    tagging embeds every text not embedded yet (minutes for a large library), and the other
    requests must not wait for it. One at a time, in order."""

    def __init__(self, db_path: str):
        self.db_path = db_path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vlmtag-meaning")
        self._library: Library | None = None  # opened, used and closed on that thread

    async def browse(self, filters: Filters, **asked: Any) -> Any:
        future = self._pool.submit(self._browse, filters, asked)
        return await asyncio.wrap_future(future)

    def _browse(self, filters: Filters, asked: dict[str, Any]) -> Any:
        if self._library is None:
            self._library = Library.open(self.db_path)
        return self._library.browse(filters, semantic=True, **asked)

    def close(self) -> None:
        def shut() -> None:
            if self._library is not None:
                self._library.close()

        self._pool.submit(shut)
        self._pool.shutdown(wait=False, cancel_futures=False)


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """A run as the runs page shows it: its counts in a line, and images a second."""
    try:
        counts = json.loads(run.get("counts") or "{}")
    except ValueError:
        counts = {}
    counts = counts if isinstance(counts, dict) else {}
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    speed = ""
    try:
        started = datetime.fromisoformat(run["started_at"])
        finished = datetime.fromisoformat(run["finished_at"])
        seconds = (finished - started).total_seconds()
        done = int(counts.get("tagged", 0)) + int(counts.get("failed", 0))
        if seconds > 0 and done:
            speed = f"{done / seconds:.1f}"
    except (KeyError, TypeError, ValueError):
        pass
    return {**run, "counts_text": shown, "speed": speed}


def tile_json(tile: Tile) -> dict[str, Any]:
    return {
        "id": tile.content_id,
        "path": printable(tile.path),
        "keywords": [keyword_json(k) for k in tile.keywords],
        "description": tile.description,
        "model": tile.model,
        "language": tile.language,
        "width": tile.width,
        "height": tile.height,
        "failure": printable(tile.failure) if tile.failure else None,
    }


def _percent(value: str | None) -> float | None:
    """ "80" (per cent, from the page) as 0.8; None for nothing or what is not a number."""
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    if number is None or not 0 <= number <= 100:
        return None
    return number / 100


def _day_ns(value: str | None, *, next_day: bool = False) -> int | None:
    """A YYYY-MM-DD day (local time, as a person reads file dates) as nanoseconds since
    the epoch: its start, or the next day's start for an end that includes the day."""
    try:
        day = datetime.strptime(value or "", "%Y-%m-%d")
    except ValueError:
        return None
    if next_day:
        day += timedelta(days=1)
    try:
        return int(day.timestamp()) * 1_000_000_000
    except (OverflowError, OSError, ValueError):
        return None


def keyword_json(keyword: Any) -> dict[str, Any]:
    return {"text": keyword.text, "source": keyword.source, "confidence": keyword.confidence}


async def read_json(request: Request) -> dict[str, Any] | Response:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            return JSONResponse({"error": "request too large"}, 413)
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        return JSONResponse({"error": "the body is not JSON"}, 400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "the body is not a JSON object"}, 400)
    return body


def _ids(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SELECTION:
        return []
    if not all(isinstance(v, str) and CONTENT_ID.match(v) for v in value):
        return []
    return list(dict.fromkeys(value))


def _strings(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 0 < len(value) <= 100
        and all(isinstance(v, str) and 0 < len(v) <= 200 for v in value)
    )


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
