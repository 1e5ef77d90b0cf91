"""Faces for the builtin classifier: ImageNet has no "person" class, so a photo of people
gets its clothes or nothing at all. OpenCV's LBP frontal-face cascade, as scikit-image's
wheel ships it (BSD; offline), finds frontal faces; they become person / face / portrait /
people keywords.

Measured on the repository's photos and three more (Grace Hopper, sklearn's china and
flower): at 256 px, scale 1.25, step 1.5 and 3 neighbours it finds the faces of the
astronaut and of Grace Hopper and nothing in the 10 photos without a face, in about 20 ms of
CPU a picture. It misses faces turned away or hidden (the cameraman behind his camera) and
faces smaller than about a twelfth of the picture's long side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

DETECT_BOX = 256  # the long side faces are looked for at: small enough to be quick
SCALE_FACTOR = 1.25
STEP_RATIO = 1.5
MIN_NEIGHBOURS = 3  # windows that must agree: fewer finds faces in bark and fabric
MIN_FACE = 20  # pixels at DETECT_BOX; the cascade's window is 24
PORTRAIT_SHARE = 0.15  # a face this tall a share of the picture makes it a portrait
# The cascade gives no probability; these say how sure such a keyword is, against the
# classifier's own confidences.
PERSON_CONFIDENCE, FACE_CONFIDENCE, PORTRAIT_CONFIDENCE = 0.8, 0.7, 0.6


@dataclass(frozen=True, slots=True)
class Face:
    x: int
    y: int
    width: int
    height: int


class FaceFinder:
    """The cascade, loaded once; find() is thread-safe (it only reads the cascade)."""

    def __init__(self, cascade: Any, numpy: Any):
        self._cascade = cascade
        self._np = numpy

    @classmethod
    def load(cls) -> FaceFinder | None:
        """None where scikit-image is not installed: the classifier works without faces."""
        try:
            import numpy
            from skimage import data
            from skimage.feature import Cascade
        except ImportError:
            return None
        return cls(Cascade(data.lbp_frontal_face_cascade_filename()), numpy)

    def find(self, picture: Image) -> tuple[list[Face], tuple[int, int]]:
        """Faces in the picture (in the coordinates of the size returned with them)."""
        grey = picture.convert("L")
        grey.thumbnail((DETECT_BOX, DETECT_BOX))
        pixels = self._np.asarray(grey, dtype=self._np.float32) / 255.0
        found = self._cascade.detect_multi_scale(
            img=pixels,
            scale_factor=SCALE_FACTOR,
            step_ratio=STEP_RATIO,
            min_size=(MIN_FACE, MIN_FACE),
            max_size=grey.size,
            min_neighbor_number=MIN_NEIGHBOURS,
        )
        faces = [Face(int(f["c"]), int(f["r"]), int(f["width"]), int(f["height"])) for f in found]
        return faces, grey.size


def people_tags(faces: list[Face], size: tuple[int, int]) -> list[tuple[str, float]]:
    """person, face, portrait (one face large in the picture), people (several faces)."""
    if not faces:
        return []
    tags = [("person", PERSON_CONFIDENCE), ("face", FACE_CONFIDENCE)]
    if len(faces) >= 2:
        tags.append(("people", PERSON_CONFIDENCE))
    tallest = max(f.height for f in faces)
    if len(faces) == 1 and tallest >= PORTRAIT_SHARE * size[1]:
        tags.append(("portrait", PORTRAIT_CONFIDENCE))
    return tags
