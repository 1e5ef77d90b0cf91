"""The public shape of one exported image, built from the one view of its keywords.

Every export format starts here: the keywords are the image's current keywords (the model's
suggestions with people's decisions, library/current.py), with where each came from and the
model's confidence; --min-confidence drops model keywords below it, never a person's.
"""

from __future__ import annotations

from typing import Any

from vlmtag.library.current import PERSON, ImageView, Keyword
from vlmtag.text import display_path

FIELDS = (
    "path",
    "content_id",
    "tags",
    "confidences",
    "description",
    "language",
    "model",
    "backend",
    "created_at",
)


def keywords(view: ImageView, min_confidence: float | None = None) -> list[Keyword]:
    """The view's keywords, without model keywords whose confidence is below min_confidence.

    A model keyword without a confidence (a VLM gives none) is kept: there is nothing to judge.
    """
    if min_confidence is None:
        return list(view.keywords)
    return [
        k
        for k in view.keywords
        if k.source == PERSON or k.confidence is None or k.confidence >= min_confidence
    ]


def record(view: ImageView, min_confidence: float | None = None) -> dict[str, Any]:
    """One image as JSON, JSON Lines and CSV write it."""
    chosen = keywords(view, min_confidence)
    return {
        "path": display_path(view.path),
        "content_id": view.content_id,
        "tags": [k.text for k in chosen],
        "confidences": [k.confidence for k in chosen],
        "keywords": [
            {"keyword": k.text, "source": k.source, "confidence": k.confidence} for k in chosen
        ],
        "description": view.description,
        "described_by": view.described_by,
        "language": view.language,
        "model": view.model,
        "backend": view.backend,
        "created_at": view.created_at,
        "width": view.width,
        "height": view.height,
    }
