"""XMP sidecars that Lightroom, digiKam and darktable read, merged into what is there.

photo.jpg.xmp (darktable, digiKam) or photo.xmp (Lightroom, Capture One). An existing sidecar
keeps a person's keywords, descriptions and every other property (see output/xmp.py).
"""

from __future__ import annotations

import os

from vlmtag.library.current import ImageView
from vlmtag.output import xmp
from vlmtag.output.captions import one_line
from vlmtag.output.records import keywords

SIDECAR_NAMES = ("photo.jpg.xmp", "photo.xmp")


def sidecar_name(image: str, naming: str = SIDECAR_NAMES[0]) -> str:
    base = os.path.basename(image)
    return base + ".xmp" if naming == "photo.jpg.xmp" else os.path.splitext(base)[0] + ".xmp"


def metadata(view: ImageView, min_confidence: float | None = None) -> xmp.Metadata:
    """What vlmtag puts into one sidecar or image: keywords and description as they are."""
    # "|" separates levels in lr:hierarchicalSubject; a flat keyword must not become a tree.
    words = [one_line(k.text).replace("|", "/") for k in keywords(view, min_confidence)]
    description = xmp.xml_text(view.description or "").strip()
    model = f"{view.backend}/{view.model}" if view.model else "person"
    return xmp.Metadata(
        keywords=[w for w in words if w], description=description or None, model=model
    )


class Sidecars:
    name = "xmp"
    per_image = True
    what = "XMP sidecars"

    def __init__(self, naming: str = SIDECAR_NAMES[0], min_confidence: float | None = None):
        if naming not in SIDECAR_NAMES:
            raise ValueError(naming)
        self.naming = naming
        self.min_confidence = min_confidence
        self.unique_names = naming == "photo.jpg.xmp"

    def file_name(self, image: str) -> str:
        return sidecar_name(image, self.naming)

    def render(self, view: ImageView, existing: bytes | None) -> bytes:
        meta = metadata(view, self.min_confidence)
        return xmp.new_sidecar(meta) if existing is None else xmp.merge_sidecar(existing, meta)
