"""The types every layer shares: a prepared image, what is asked of a model, what it said.

They live at the bottom of the package so that ingest (which makes PreparedImage), models
(which take Request and give Reply) and run (which moves them) never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to send: encoded bytes, and the decoded pixels for in-process models."""

    data: bytes  # encoded image (JPEG, or PNG where transparency/line art matters)
    mime: str  # "image/jpeg" or "image/png"
    width: int  # size of the encoded image
    height: int
    source_width: int  # size of the original, after EXIF orientation
    source_height: int
    pixels: Image | None = None  # RGB PIL image, only kept when the backend wants pixels


@dataclass(frozen=True)
class Request:
    """What to ask the model. The same for every image of a run."""

    prompt: str  # user message text
    system: str  # system message text ("" for none)
    schema: dict[str, Any]  # JSON schema of an answer: {"tags": [...], "description": "..."}
    max_tokens: int  # cap on generated tokens
    tag_count: int
    description: bool
    language: str


@dataclass
class Reply:
    """What the model said. `text` is parsed by vlmtag.models.parse unless `tags` is already set."""

    text: str
    # Server timing/usage fields where the server gives them, e.g. Ollama's
    # total_duration, load_duration, prompt_eval_count, eval_count (durations in seconds).
    timings: dict[str, float] = field(default_factory=dict)
    # In-process classifiers answer with structured tags (tag, confidence) and skip parsing.
    tags: list[tuple[str, float | None]] | None = None
    description: str | None = None
    # Why the model stopped, as the server said: "length" means the answer was cut off
    # (max tokens, or the context ran out); None where the server does not say.
    finish: str | None = None

    @property
    def cut_off(self) -> bool:
        return self.finish == "length"
