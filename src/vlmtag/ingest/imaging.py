"""Turn one image file (path or bytes) into a small upright RGB JPEG ready to send to a model.

Decode with JPEG draft scaling, refuse decompression bombs from the header alone, fit inside
a box without upscaling, apply EXIF orientation after shrinking, flatten every pixel mode to RGB.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from typing import IO

from PIL import Image, ImageFile, UnidentifiedImageError

from vlmtag.errors import ImageError
from vlmtag.ingest.files import describe_os_error, open_regular
from vlmtag.types import PreparedImage

DEFAULT_MAX_PIXELS = 100_000_000

# One Pillow LANCZOS pass preceded by a cheap box reduce() while the image is still more than
# this many times the target. Measured on a 12 MP image (2-core box): plain LANCZOS 256 ms,
# gap 3.0 102 ms, gap 2.0 64 ms. After a JPEG draft the remaining factor is under 2, so the gap
# changes nothing there; it is for PNG/TIFF/WebP/HEIC, which have no draft. 2.0 is also what
# Image.thumbnail uses, and the difference is invisible at model input sizes.
REDUCING_GAP = 2.0
# Transparent pixels become a neutral grey: on white a white flower cut out on transparency
# loses its subject, on black a black silhouette does; grey keeps both (and any model reads
# a plain grey as background).
BACKGROUND = (128, 128, 128)

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright (as ImageOps does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# Decoding failures Pillow and its plugins raise on damaged or hostile input. Anything else
# escaping from a decoder is treated the same way (see _decode_error).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError)

_setup_lock = threading.Lock()
_heif_state: dict[str, bool] = {}  # "ready": HEIF opener registered; "quiet": warning muted


def fit_within(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The largest size with the aspect of `size` that fits inside `box`; never larger than size."""
    width, height = size
    box_w, box_h = box
    if width <= 0 or height <= 0 or box_w <= 0 or box_h <= 0:
        raise ValueError(f"sizes must be positive, got {size} into {box}")
    if width <= box_w and height <= box_h:
        return width, height
    # Integer arithmetic so the limiting side is exactly the box side, never one pixel over.
    if width * box_h >= height * box_w:
        return box_w, max(1, (2 * height * box_w + width) // (2 * width))
    return max(1, (2 * width * box_h + height) // (2 * height)), box_h


def prepare(
    source: str | os.PathLike[str] | bytes,
    box: tuple[int, int] | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_pixels: bool = False,
    quality: int = 90,
) -> PreparedImage:
    """Decode `source` (a path, or the file's bytes) and encode it as an upright RGB JPEG.

    `box` (w, h): fit inside it, aspect kept, never upscaled; None keeps the full size.
    Raises ImageError for anything that cannot be turned into an image.
    """
    if box is not None and min(box) < 1:
        raise ValueError(f"box must be positive, got {box}")  # a caller's bug, not the file's
    if isinstance(source, bytes | bytearray | memoryview):
        return _prepare_stream(io.BytesIO(source), box, max_pixels, keep_pixels, quality)
    stream, _ = open_regular(os.fspath(source))
    with stream:
        return _prepare_stream(stream, box, max_pixels, keep_pixels, quality)


def probe(stream: IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The stored (width, height) from the header alone: no pixel decoded, the stream read no
    further than the header needs. ImageError for what is not an image or is too large."""
    return _decoding(stream, max_pixels, lambda im: _check_size(im.size, max_pixels))


def _prepare_stream(
    stream: IO[bytes], box: tuple[int, int] | None, max_pixels: int, keep: bool, quality: int
) -> PreparedImage:
    return _decoding(
        stream, max_pixels, lambda im: _prepare_image(im, box, max_pixels, keep, quality)
    )


def _decoding(stream: IO[bytes], max_pixels: int, work):
    """Open the stream with Pillow and run work(image), every failure an ImageError."""
    try:
        head = stream.read(16)
        stream.seek(0)
    except OSError as err:
        raise ImageError(describe_os_error(err)) from None
    if not head:
        raise ImageError("empty file (0 bytes); nothing to decode, check how it was copied")
    if head[4:8] == b"ftyp":
        _register_heif()
    _allow_pillow_up_to(max_pixels)
    try:
        with Image.open(stream) as im:
            return work(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(_unidentified(head)) from None
    except Image.DecompressionBombError as err:
        # Pillow refuses anything over twice its own limit before handing us the header;
        # that limit is at least ours (see _allow_pillow_up_to), so this is over ours too.
        raise ImageError(_too_large_for_pillow(err, max_pixels)) from None
    except MemoryError:
        raise ImageError("not enough memory to decode this image; lower --max-pixels") from None
    except Exception as err:  # noqa: BLE001 - a hostile file must fail one image, not the run
        raise ImageError(_decode_error(err)) from None


def _check_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    width, height = size
    # The guard runs on the header size, before a single pixel is decoded.
    if width * height > max_pixels:
        size, limit = _sizes(width * height, max_pixels)
        raise ImageError(
            f"image too large: {width}x{height} ({size}) exceeds the {limit} limit;"
            " raise it with --max-pixels"
        )
    return width, height


def _prepare_image(
    im: ImageFile.ImageFile, box: tuple[int, int] | None, max_pixels: int, keep: bool, quality: int
) -> PreparedImage:
    width, height = _check_size(im.size, max_pixels)
    orientation = _orientation(im)
    swapped = orientation in _SWAPS_SIDES
    upright_size = (height, width) if swapped else (width, height)
    target = (width, height)
    if box is not None:
        # Fit in stored (pre-rotation) coordinates: a portrait photo stored landscape with
        # orientation 6 must fit the box turned the same way.
        stored_box = (box[1], box[0]) if swapped else box
        target = fit_within((width, height), stored_box)
        if target != (width, height):
            # Must come before anything loads the pixels; a no-op for non-JPEG formats.
            # Pillow picks the largest 1/2, 1/4, 1/8 scale that is still >= target.
            im.draft("RGB", target)

    pixels = _to_resizable(im)
    if pixels.size != target:
        pixels = pixels.resize(target, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    pixels = _flatten_to_rgb(pixels)
    if orientation in _UPRIGHT:
        pixels = pixels.transpose(_UPRIGHT[orientation])  # after shrinking: 0.4 ms, not 33

    # Always JPEG: alpha is already flattened onto grey, and a VLM sees no difference
    # between PNG and a q90 JPEG at model input sizes, while PNG costs 5-10x the bytes.
    out = io.BytesIO()
    pixels.save(out, format="JPEG", quality=quality)
    return PreparedImage(
        data=out.getvalue(),
        mime="image/jpeg",
        width=pixels.width,
        height=pixels.height,
        source_width=upright_size[0],
        source_height=upright_size[1],
        pixels=pixels if keep else None,
    )


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - damaged EXIF must not cost the picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_resizable(im: Image.Image) -> Image.Image:
    """Bring any pixel mode to L, LA, RGB or RGBA: modes that resample correctly."""
    mode = im.mode
    if mode in ("RGB", "L") and "transparency" in im.info:  # PNG tRNS: one colour see-through
        return im.convert("RGBA" if mode == "RGB" else "LA")
    if mode in ("RGB", "L", "RGBA", "LA"):
        im.load()
        return im
    if mode in _SIXTEEN_BIT:
        return im.point(lambda v: v / 257).convert("L")  # 0..65535 -> 0..255, not clipped
    if mode == "I":
        return _rescale(im, _integer_range(im.getextrema()))
    if mode == "F":
        low, high = im.getextrema()
        return _rescale(im, (0.0, 1.0) if low >= 0 and high <= 1 else (low, high))
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA"):
        # Palette images resample with NEAREST only; expand first. tRNS makes it RGBA.
        has_alpha = mode == "PA" or "transparency" in im.info
        return im.convert("RGBA" if has_alpha else "RGB")
    if mode in ("La", "RGBa"):
        return im.convert("LA" if mode == "La" else "RGBA")
    # CMYK (Adobe-inverted files are un-inverted by the JPEG decoder), YCbCr, LAB, HSV, RGBX.
    try:
        return im.convert("RGB")
    except ValueError:
        raise ImageError(f"unsupported pixel mode {mode}; convert the file to RGB") from None


def _integer_range(extrema: tuple[int, int]) -> tuple[int, int]:
    """The value range an "I" image was meant to have: 8-bit, 16-bit, or its own extent."""
    low, high = extrema
    if low >= 0 and high <= 255:
        return 0, 255
    if low >= 0 and high <= 65535:
        return 0, 65535
    return low, high


def _rescale(im: Image.Image, value_range: tuple[float, float]) -> Image.Image:
    low, high = value_range
    if high <= low:  # one flat value outside 0..255: show it as mid grey, not a guess
        return Image.new("L", im.size, 128)
    scale = 255 / (high - low)
    return im.point(lambda v: (v - low) * scale).convert("L")


def _flatten_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode not in ("RGBA", "LA"):
        return im.convert("RGB")
    # Composite after resizing: Pillow resizes RGBA premultiplied, so edges stay clean and
    # the composite touches only the small image.
    background = Image.new("RGB", im.size, BACKGROUND)
    background.paste(im.convert("RGBA"), mask=im.getchannel("A"))
    return background


def _allow_pillow_up_to(max_pixels: int) -> None:
    """Keep Pillow's own bomb check from firing on an image under our limit.

    Pillow has no per-call limit: Image.open warns above Image.MAX_IMAGE_PIXELS and raises
    above twice that, a process-wide value. warnings.catch_warnings per call is not
    thread-safe before Python 3.14, and decoding runs in a thread pool. So our own check
    (header size vs max_pixels, per call) is the guard, and Pillow's limit is only ever
    raised to match a caller's larger limit, never lowered or disabled: its hard stop at
    2x stays as a second line for formats that allocate while reading the header (WebP).
    """
    if not _heif_state.get("quiet"):
        # Our own check refuses such images with a clear per-file failure; Pillow's warning
        # would only print a Python warning on stderr just before it.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _heif_state["quiet"] = True
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current >= max_pixels:
        return
    with _setup_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _register_heif() -> None:
    """Teach Pillow HEIC/HEIF on the first file that looks like one (ISO-BMFF 'ftyp' box)."""
    if _heif_state.get("ready"):
        return
    with _setup_lock:
        if _heif_state.get("ready"):
            return
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except ImportError:
            pass  # HEIC files then fail as "unsupported format", with the fix in the message
        _heif_state["ready"] = True


def _unidentified(head: bytes) -> str:
    if head[4:8] == b"ftyp":
        return (
            "unsupported format: an ISO media file (HEIC/AVIF/MP4) this install cannot decode;"
            " install pillow-heif for HEIC"
        )
    if _looks_like_text(head):
        return "not an image: the file holds text; check its name and extension"
    return "not an image, or a format Pillow cannot read; convert it to JPEG or PNG"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _decode_error(err: Exception) -> str:
    detail = str(err).strip().rstrip(".") or type(err).__name__
    if isinstance(err, _DECODE_ERRORS):
        return f"corrupt or truncated image data ({detail}); re-copy or re-export the file"
    return f"cannot decode image ({type(err).__name__}: {detail}); re-copy or re-export the file"


def _too_large_for_pillow(err: Exception, max_pixels: int) -> str:
    # Pillow's message carries the pixel count but not the sides: "Image size (N pixels) ...".
    found = re.search(r"\((\d+) pixels\)", str(err))
    pillow_limit = Image.MAX_IMAGE_PIXELS or max_pixels
    if found:
        size, limit = _sizes(int(found.group(1)), max_pixels)
    else:
        size, limit = f"over {_mp(2 * pillow_limit)}", _mp(max_pixels)
    return f"image too large: {size} exceeds the {limit} limit; raise it with --max-pixels"


def _sizes(pixels: int, max_pixels: int) -> tuple[str, str]:
    """An image's size and the limit it exceeds, never written alike ("12 MP exceeds 12 MP")."""
    size, limit = _mp(pixels), _mp(max_pixels)
    return (size, limit) if size != limit else (f"{pixels:,} pixels", f"{max_pixels:,}-pixel")


def _mp(pixels: int) -> str:
    """Megapixels with enough digits that a number just over a limit never reads as equal."""
    megapixels = pixels / 1_000_000
    if megapixels >= 10 and pixels % 1_000_000 == 0 or megapixels >= 100:
        return f"{megapixels:.0f} MP"
    return f"{megapixels:.3g} MP" if megapixels >= 1 else f"{pixels:,} pixels"
