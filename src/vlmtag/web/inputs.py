"""What a request to the web app says, read and checked: JSON bodies of bounded size, image
ids, keywords, per cent and day filters. What is wrong is said in words a person can act on.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vlmtag.web.thumbs import CONTENT_ID

MAX_BODY = 1_000_000  # a decision is a few hundred bytes; a selection of 10,000 ids ~700 KB
MAX_SELECTION = 10_000
MAX_KEYWORDS, MAX_KEYWORD_CHARS = 100, 200
EARLIEST_NS, LATEST_NS = -(2**63) + 1, 2**63 - 1  # SQLite's integers


def percent(value: str | None) -> float | None:
    """ "80" (per cent, from the page) as 0.8; None for nothing or what is not a number."""
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    if number is None or number != number:  # nan
        return None
    return min(max(number, 0.0), 100.0) / 100  # 150 % is 100 %: the strictest there is


def day_ns(value: str | None, *, next_day: bool = False) -> int | None:
    """A YYYY-MM-DD day (local time, as a person reads file dates) as nanoseconds since
    the epoch: its start, or the next day's start for an end that includes the day."""
    try:
        day = datetime.strptime(value or "", "%Y-%m-%d")
    except ValueError:
        return None
    try:
        if next_day:
            day += timedelta(days=1)
        ns = int(day.timestamp()) * 1_000_000_000
    except (OverflowError, OSError, ValueError):  # year 9999 + 1 day; a platform's limits
        ns = LATEST_NS if next_day else EARLIEST_NS
    # SQLite's integers are 64-bit: a day before 1677 or after 2262 is the end of the range.
    return min(max(ns, EARLIEST_NS), LATEST_NS)


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


def ids_of(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SELECTION:
        return []
    if not all(isinstance(v, str) and CONTENT_ID.match(v) for v in value):
        return []
    return list(dict.fromkeys(value))


def strings_ok(value: Any) -> bool:
    return keywords_problem(value) is None


def keywords_problem(value: Any) -> str | None:
    """What is wrong with the keywords a request names, in words a person can act on."""
    if not isinstance(value, list) or not value:
        return "name at least one keyword"
    if len(value) > MAX_KEYWORDS:
        return f"at most {MAX_KEYWORDS} keywords at once, not {len(value)}"
    for v in value:
        if not isinstance(v, str) or not v.strip():
            return "a keyword must be some text"
        if len(v) > MAX_KEYWORD_CHARS:
            return f"a keyword is at most {MAX_KEYWORD_CHARS} characters, not {len(v)}"
    return None


def ids_problem(value: Any) -> str:
    if value is None or value == []:
        return "select at least one image"
    if not isinstance(value, list):
        return "ids must be a list of image ids"
    if len(value) > MAX_SELECTION:
        return f"at most {MAX_SELECTION:,} images at once, not {len(value):,}"
    return "that is not an image id (the page may be out of date)"
