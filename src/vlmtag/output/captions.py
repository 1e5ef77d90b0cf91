"""photo.txt beside photo.jpg: the caption file kohya-ss, taggui and OneTrainer read.

One line: the keywords comma-separated (a keyword never holds a comma) or the description.
"""

from __future__ import annotations

import os
import re

from vlmtag.library.current import ImageView
from vlmtag.output.records import keywords

# Unlike text.one_line (messages, stored reasons), format characters stay: a zero-width
# joiner holds an emoji together and a bidi mark a right-to-left name. Only what breaks a
# line or a file goes.
_LINE_BREAKS = re.compile(r"[\s\x85\u2028\u2029]+")
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def one_line(text: str) -> str:
    """Text as one line, however long: controls out, each run of white space one space."""
    return _LINE_BREAKS.sub(" ", _CONTROLS.sub("", text)).strip()


def caption_name(image: str) -> str:
    return os.path.splitext(os.path.basename(image))[0] + ".txt"


class Captions:
    name = "txt"
    per_image = True
    what = "caption files"
    unique_names = False  # photo.jpg and photo.png would both want photo.txt

    def __init__(self, caption: str = "tags", min_confidence: float | None = None):
        if caption not in ("tags", "description"):
            raise ValueError(caption)
        self.caption = caption
        self.min_confidence = min_confidence

    def file_name(self, image: str) -> str:
        return caption_name(image)

    def text(self, view: ImageView) -> str | None:
        if self.caption == "description":
            text = one_line(view.description or "")
        else:
            # A comma inside a keyword would read as two (none should hold one; old rows may).
            words = (
                one_line(k.text.replace(",", " ")) for k in keywords(view, self.min_confidence)
            )
            text = ", ".join(w for w in words if w)
        return text or None

    def render(self, view: ImageView, existing: bytes | None) -> bytes | None:
        text = self.text(view)
        return None if text is None else (text + "\n").encode("utf-8")
