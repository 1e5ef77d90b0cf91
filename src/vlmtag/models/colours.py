"""Cheap, honest image signals that need no model: dominant colour names and orientation.

Colours come from a small thumbnail in HSV, binned with a Pillow lookup table and counted by
getcolors(), so no per-pixel Python runs; each bin is named from the eleven basic colour terms.
"""

from __future__ import annotations

from PIL import Image

# The basic colour terms most languages share (Berlin & Kay), in a stable order.
COLOUR_NAMES = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
)
ORIENTATIONS = ("landscape", "portrait", "square")

# About 3,000 pixels: enough for stable shares, small enough to cost well under a millisecond.
THUMBNAIL_BOX = (64, 64)
HUE_BINS, SATURATION_BINS, VALUE_BINS = 36, 10, 10
# A colour must cover this share of the picture to be called dominant.
MIN_SHARE = 0.15
MAX_COLOURS = 3
# Sides within 5% of each other read as square (a 1080x1040 crop is a square picture).
SQUARE_TOLERANCE = 0.05


def dominant_colours(
    image: Image.Image, *, limit: int = MAX_COLOURS, min_share: float = MIN_SHARE
) -> list[tuple[str, float]]:
    """The named colours covering at least `min_share` of the image, largest share first.

    Each share is in (0, 1]; at most `limit` colours.
    """
    thumb = _thumbnail(image)
    binned = thumb.convert("HSV").point(_BIN_TABLE)
    counts = binned.getcolors(HUE_BINS * SATURATION_BINS * VALUE_BINS) or []
    total = thumb.width * thumb.height
    shares: dict[str, int] = {}
    for count, (hue_bin, sat_bin, val_bin) in counts:
        name = colour_name(
            (hue_bin + 0.5) * 360 / HUE_BINS,
            (sat_bin + 0.5) / SATURATION_BINS,
            (val_bin + 0.5) / VALUE_BINS,
        )
        shares[name] = shares.get(name, 0) + count
    ranked = sorted(shares.items(), key=lambda item: (-item[1], COLOUR_NAMES.index(item[0])))
    return [(name, count / total) for name, count in ranked if count / total >= min_share][:limit]


def colour_name(hue: float, saturation: float, value: float) -> str:
    """Name a colour from hue (degrees) and saturation, value (0..1), as people would."""
    if value < 0.22:
        return "black"
    if saturation < 0.15 or (value < 0.35 and saturation < 0.3):
        if value >= 0.8:
            return "white"
        return "black" if value < 0.3 else "grey"
    base = _hue_name(hue)
    if base == "red" and saturation < 0.5 and value >= 0.7:
        return "pink"  # light red
    if base in ("orange", "yellow") and saturation < 0.3 and value >= 0.8:
        return "white"  # cream, ivory, beige walls
    if (
        (base == "orange" and (value < 0.65 or saturation < 0.45))
        or (base == "yellow" and value < 0.5)
        or (base == "red" and value < 0.4)
    ):
        return "brown"  # brown is dark or greyish orange (tan, chocolate), not a hue of its own
    if base == "pink" and value < 0.6:
        return "purple"
    return base


def orientation(width: int, height: int) -> str:
    """ "landscape", "portrait" or "square" for an upright picture of this size."""
    if width <= 0 or height <= 0:
        raise ValueError(f"sizes must be positive, got {width}x{height}")
    if abs(width - height) <= SQUARE_TOLERANCE * max(width, height):
        return "square"
    return "landscape" if width > height else "portrait"


def _hue_name(hue: float) -> str:
    hue %= 360
    if hue < 15 or hue >= 340:
        return "red"
    if hue < 40:
        return "orange"
    if hue < 68:
        return "yellow"
    if hue < 165:
        return "green"
    if hue < 255:
        return "blue"
    if hue < 300:
        return "purple"
    return "pink"


def _thumbnail(image: Image.Image) -> Image.Image:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    scale = min(1.0, THUMBNAIL_BOX[0] / width, THUMBNAIL_BOX[1] / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BOX)


def _bin_table() -> list[int]:
    # Pillow's point() takes one 256-entry table per band, concatenated (H, S, V).
    table: list[int] = []
    for bins in (HUE_BINS, SATURATION_BINS, VALUE_BINS):
        table.extend(min(bins - 1, level * bins // 256) for level in range(256))
    return table


_BIN_TABLE = _bin_table()
