"""imaging.prepare on real photos and on images built to exercise one case each."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from unprivileged import as_unprivileged
from vlmtag.errors import ImageError
from vlmtag.ingest.imaging import DEFAULT_MAX_PIXELS, fit_within, prepare

# A 3x2 grid of far-apart colours: any flip or rotation moves a colour to another cell.
GRID = [
    [(230, 30, 30), (30, 200, 30), (30, 30, 230)],
    [(240, 240, 40), (40, 230, 230), (230, 40, 230)],
]
RED, WHITE, BLACK = (255, 0, 0), (255, 255, 255), (0, 0, 0)
GREY = (128, 128, 128)  # what transparency becomes (imaging.BACKGROUND)


def grid_image(cell: int = 16) -> Image.Image:
    """The upright picture: 3 cells wide, 2 cells high."""
    im = Image.new("RGB", (3 * cell, 2 * cell))
    for row, colours in enumerate(GRID):
        for col, colour in enumerate(colours):
            im.paste(colour, (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell))
    return im


# Where stored pixel (r, c) comes from in the upright picture (height h, width w), straight
# from the EXIF 2.32 definitions of tag 0x0112 ("0th row is the visual ..."), written out
# independently of the transpose table the code uses.
STORED_FROM_UPRIGHT: dict[int, Callable[[int, int, int, int], tuple[int, int]]] = {
    1: lambda r, c, h, w: (r, c),
    2: lambda r, c, h, w: (r, w - 1 - c),  # top, right side
    3: lambda r, c, h, w: (h - 1 - r, w - 1 - c),  # bottom, right side
    4: lambda r, c, h, w: (h - 1 - r, c),  # bottom, left side
    5: lambda r, c, h, w: (c, r),  # left side, top
    6: lambda r, c, h, w: (c, w - 1 - r),  # right side, top
    7: lambda r, c, h, w: (h - 1 - c, w - 1 - r),  # right side, bottom
    8: lambda r, c, h, w: (h - 1 - c, r),  # left side, bottom
}


def stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    w, h = upright.size
    swap = orientation >= 5
    stored = Image.new("RGB", (h, w) if swap else (w, h))
    src = upright.load()
    dst = stored.load()
    for r in range(stored.height):
        for c in range(stored.width):
            ur, uc = STORED_FROM_UPRIGHT[orientation](r, c, h, w)
            dst[c, r] = src[uc, ur]
    return stored


def jpeg_bytes(im: Image.Image, orientation: int | None = None, **kw: object) -> bytes:
    out = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(out, "JPEG", quality=95, **kw)
    return out.getvalue()


def encoded(im: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    return im.convert("RGB")


def close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def assert_upright_grid(im: Image.Image) -> None:
    cell_w, cell_h = im.width / 3, im.height / 2
    for row, colours in enumerate(GRID):
        for col, colour in enumerate(colours):
            centre = (int((col + 0.5) * cell_w), int((row + 0.5) * cell_h))
            got = im.getpixel(centre)
            assert close(got, colour), f"cell {row},{col}: {got} != {colour}"


# --- fit_within -------------------------------------------------------------------------


def test_fit_within_keeps_aspect_and_limits_the_long_side():
    assert fit_within((4000, 3000), (512, 512)) == (512, 384)
    assert fit_within((3000, 4000), (512, 512)) == (384, 512)
    assert fit_within((4000, 1000), (512, 512)) == (512, 128)
    assert fit_within((1000, 1000), (640, 480)) == (480, 480)


def test_fit_within_never_upscales():
    assert fit_within((100, 50), (512, 512)) == (100, 50)
    assert fit_within((512, 512), (512, 512)) == (512, 512)


def test_fit_within_keeps_a_thin_image_at_least_one_pixel():
    assert fit_within((100_000, 2), (100, 100)) == (100, 1)


def test_fit_within_rejects_empty_sizes():
    with pytest.raises(ValueError):
        fit_within((0, 10), (10, 10))


@given(
    st.tuples(st.integers(1, 20_000), st.integers(1, 20_000)),
    st.tuples(st.integers(1, 4_000), st.integers(1, 4_000)),
)
def test_fit_within_properties(size, box):
    w, h = fit_within(size, box)
    assert 1 <= w <= min(size[0], box[0]) or w == 1
    assert 1 <= h <= min(size[1], box[1]) or h == 1
    assert w == size[0] or h == size[1] or w == box[0] or h == box[1]
    # Aspect kept to within rounding of the short side.
    if w > 1 and h > 1:
        assert abs(w * size[1] - h * size[0]) <= max(size)


# --- orientation ------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation):
    upright = grid_image(cell=16)  # 48x32
    data = jpeg_bytes(stored_for(upright, orientation), orientation)
    result = prepare(data, None)
    assert (result.source_width, result.source_height) == (48, 32)
    assert (result.width, result.height) == (48, 32)
    assert_upright_grid(decode(result.data))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_orientation_with_draft_fits_the_upright_box(orientation):
    # Big enough that the JPEG draft scales by 1/4; a 2:1 box so that fitting in the stored
    # (unrotated) frame would give the wrong size.
    upright = grid_image(cell=240)  # 720x480
    data = jpeg_bytes(stored_for(upright, orientation), orientation)
    result = prepare(data, (150, 100), keep_pixels=True)
    assert (result.width, result.height) == (150, 100)
    assert (result.source_width, result.source_height) == (720, 480)
    assert result.pixels is not None and result.pixels.size == (150, 100)
    assert_upright_grid(decode(result.data))


def test_real_photo_with_exif_rotation_matches_the_upright_photo(photos_dir):
    upright = prepare(photos_dir / "chelsea.jpg", (200, 200), keep_pixels=True)
    rotated = prepare(photos_dir / "chelsea-exif-rotated.jpg", (200, 200), keep_pixels=True)
    assert (rotated.source_width, rotated.source_height) == (451, 300)
    assert (rotated.width, rotated.height) == (upright.width, upright.height) == (200, 133)
    a, b = upright.pixels, rotated.pixels
    assert a is not None and b is not None
    diffs = [abs(x - y) for x, y in zip(a.tobytes(), b.tobytes(), strict=True)]
    assert sum(diffs) / len(diffs) < 8  # JPEG noise only; a wrong turn averages ~50


def test_damaged_orientation_value_is_ignored():
    upright = grid_image()
    result = prepare(jpeg_bytes(upright, orientation=42), None)
    assert_upright_grid(decode(result.data))


# --- sizes ------------------------------------------------------------------------------


def test_small_image_is_never_upscaled():
    result = prepare(encoded(grid_image(cell=10), "PNG"), (1024, 1024))
    assert (result.width, result.height) == (30, 20)


def test_box_none_keeps_full_size(photos_dir):
    result = prepare(photos_dir / "rocket.jpg", None)
    assert (result.width, result.height) == (640, 427)


def test_aspect_is_kept_for_a_real_photo(photos_dir):
    result = prepare(photos_dir / "coffee.jpg", (256, 256))
    assert (result.width, result.height) == (256, 171)  # 600x400 -> 256x170.67
    assert (result.source_width, result.source_height) == (600, 400)
    assert decode(result.data).size == (256, 171)


def test_quality_changes_the_encoding(photos_dir):
    high = prepare(photos_dir / "chelsea.jpg", None, quality=95)
    low = prepare(photos_dir / "chelsea.jpg", None, quality=40)
    assert len(low.data) < len(high.data) * 0.7


def test_pixels_only_when_asked(photos_dir):
    plain = prepare(photos_dir / "chelsea.jpg", (64, 64))
    kept = prepare(photos_dir / "chelsea.jpg", (64, 64), keep_pixels=True)
    assert plain.pixels is None
    assert kept.pixels is not None
    assert kept.pixels.mode == "RGB" and kept.pixels.size == (kept.width, kept.height)


def test_kept_pixels_outlive_the_file(photos_dir):
    # Full size RGB JPEG: the opened image itself is the result, used after its file closed.
    result = prepare(photos_dir / "rocket.jpg", None, keep_pixels=True)
    assert result.pixels is not None
    assert result.pixels.size == (640, 427)
    assert result.pixels.getpixel((320, 200)) is not None
    assert result.pixels.tobytes()[:3] != b""


def test_box_must_be_positive(photos_dir):
    with pytest.raises(ValueError):
        prepare(photos_dir / "rocket.jpg", (0, 100))


# --- real photos, path vs bytes ---------------------------------------------------------


def real_photos(photos_dir: Path) -> list[Path]:
    return sorted(p for p in photos_dir.iterdir() if p.suffix in {".jpg", ".png"})


def test_real_photos_all_prepare(photos_dir):
    photos = real_photos(photos_dir)
    assert len(photos) >= 5
    for path in photos:
        result = prepare(path, (128, 128), keep_pixels=True)
        assert result.mime == "image/jpeg"
        assert max(result.width, result.height) == 128
        assert decode(result.data).size == (result.width, result.height)


def test_bytes_and_path_give_the_same_result(photos_dir):
    for path in real_photos(photos_dir):
        from_path = prepare(path, (160, 160))
        from_bytes = prepare(path.read_bytes(), (160, 160))
        assert from_path == from_bytes
        assert prepare(str(path), (160, 160)) == from_path


# --- pixel modes ------------------------------------------------------------------------


def half_transparent_red(mode: str) -> Image.Image:
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # transparent black: must not show
    im.paste((255, 0, 0, 255), (0, 0, 20, 20))
    return im.convert(mode) if mode != "RGBA" else im


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgba_composites_on_grey(fmt):
    result = prepare(encoded(half_transparent_red("RGBA"), fmt, lossless=True), None)
    im = decode(result.data)
    assert close(im.getpixel((5, 10)), RED)
    assert close(im.getpixel((35, 10)), GREY)


def test_la_composites_on_grey():
    im = Image.new("LA", (40, 20), (0, 0))
    im.paste((0, 255), (0, 0, 20, 20))  # opaque black left, transparent black right
    out = decode(prepare(encoded(im, "PNG"), None).data)
    assert close(out.getpixel((5, 10)), BLACK)
    assert close(out.getpixel((35, 10)), GREY)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_single_transparent_colour_becomes_grey(mode):
    im = Image.new(mode, (40, 20), 0)
    im.paste(100 if mode == "L" else (100, 100, 100), (0, 0, 20, 20))
    data = encoded(im, "PNG", transparency=0 if mode == "L" else (0, 0, 0))
    out = decode(prepare(data, None).data)
    assert close(out.getpixel((5, 10)), (100, 100, 100), 8)
    assert close(out.getpixel((35, 10)), GREY, 8)


def test_palette_with_transparency_composites_on_grey():
    im = Image.new("P", (40, 20), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 20, 20))
    data = encoded(im, "GIF", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode(prepare(data, (20, 20)).data)
    assert out.size == (20, 10)
    assert close(out.getpixel((4, 5)), RED)
    assert close(out.getpixel((16, 5)), GREY)


def test_palette_without_transparency_keeps_colours():
    im = grid_image().quantize(colors=8)
    assert im.mode == "P"
    assert_upright_grid(decode(prepare(encoded(im, "PNG"), None).data))


def test_cmyk_jpeg_becomes_right_rgb():
    im = Image.new("CMYK", (40, 20), (0, 255, 255, 0))  # red
    im.paste((0, 0, 0, 255), (20, 0, 40, 20))  # black from K alone
    data = jpeg_bytes(im)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(prepare(data, None).data)
    assert close(out.getpixel((5, 10)), RED)
    assert close(out.getpixel((35, 10)), BLACK)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    im = Image.new("I;16", (30, 10), 0)
    im.paste(32896, (10, 0, 20, 10))  # 128 * 257: mid grey in 16 bits
    im.paste(65535, (20, 0, 30, 10))
    data = encoded(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode(prepare(data, None).data)
    assert close(out.getpixel((5, 5)), BLACK, 4)
    assert close(out.getpixel((15, 5)), (128, 128, 128), 4)  # naive convert gives 255
    assert close(out.getpixel((25, 5)), WHITE, 4)


def test_thirty_two_bit_integer_in_sixteen_bit_range_is_scaled():
    im = Image.new("I", (20, 10), 0)
    im.paste(65535, (10, 0, 20, 10))
    im.putpixel((0, 0), 300)  # beyond 8 bits, so the data is taken as 16-bit
    data = encoded(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = decode(prepare(data, None).data)
    assert close(out.getpixel((5, 5)), BLACK, 4)
    assert close(out.getpixel((15, 5)), WHITE, 4)


def test_float_zero_to_one_is_scaled():
    im = Image.new("F", (20, 10), 0.0)
    im.paste(0.5, (10, 0, 20, 10))
    data = encoded(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = decode(prepare(data, None).data)
    assert close(out.getpixel((5, 5)), BLACK, 4)
    assert close(out.getpixel((15, 5)), (128, 128, 128), 4)


def test_float_outside_zero_to_one_is_stretched():
    im = Image.new("F", (20, 10), -1000.0)
    im.paste(3000.0, (10, 0, 20, 10))
    out = decode(prepare(encoded(im, "TIFF"), None).data)
    assert close(out.getpixel((5, 5)), BLACK, 4)
    assert close(out.getpixel((15, 5)), WHITE, 4)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_bilevel(mode):
    im = Image.new(mode, (20, 10), 0)
    im.paste(255 if mode == "L" else 1, (10, 0, 20, 10))
    result = prepare(encoded(im, "PNG"), None, keep_pixels=True)
    assert result.pixels is not None and result.pixels.mode == "RGB"
    out = decode(result.data)
    assert close(out.getpixel((5, 5)), BLACK)
    assert close(out.getpixel((15, 5)), WHITE)


def test_real_grey_photo_becomes_rgb(photos_dir):
    assert Image.open(photos_dir / "camera.png").mode == "L"
    result = prepare(photos_dir / "camera.png", (100, 100), keep_pixels=True)
    assert result.pixels is not None and result.pixels.mode == "RGB"


def test_real_rgba_drawing_keeps_its_subject(photos_dir):
    horse = Image.open(photos_dir / "horse.png")
    # Its background is white at alpha 110: over grey, (255*110 + 128*145) / 255 = 183.
    assert horse.mode == "RGBA" and horse.getpixel((0, 0)) == (255, 255, 255, 110)
    out = decode(prepare(photos_dir / "horse.png", None).data)
    assert close(out.getpixel((0, 0)), (183, 183, 183), 8)
    assert close(out.getpixel((200, 160)), BLACK, 8)


def test_a_white_subject_cut_out_on_transparency_stays_visible():
    # A white flower on a transparent background: on white it would vanish.
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    im.paste((250, 250, 250, 255), (10, 10, 30, 30))
    out = decode(prepare(encoded(im, "PNG"), None).data)
    flower, around = out.getpixel((20, 20)), out.getpixel((2, 2))
    assert close(flower, (250, 250, 250), 8) and close(around, GREY, 8)
    assert flower[0] - around[0] > 100


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (20, 20), colour) for colour in (RED, (0, 0, 255), (0, 255, 0))]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode(prepare(data, None).data)
    assert close(out.getpixel((10, 10)), RED)


def test_heic_round_trip():
    import pillow_heif

    # Written through pillow_heif's own API, so the test does not register the Pillow opener
    # for prepare(); prepare must do that itself.
    heif = pillow_heif.from_pillow(grid_image(cell=32))
    out = io.BytesIO()
    heif.save(out, quality=95)
    data = out.getvalue()
    assert data[4:12] in (b"ftypheic", b"ftypmif1")
    result = prepare(data, (48, 48), keep_pixels=True)
    assert (result.source_width, result.source_height) == (96, 64)
    assert (result.width, result.height) == (48, 32)
    assert_upright_grid(decode(result.data))


def test_heif_is_not_imported_until_a_heif_file_comes(photos_dir):
    code = (
        "import sys; import vlmtag.ingest.imaging as m; "
        f"m.prepare({str(photos_dir / 'chelsea.jpg')!r}, (64, 64)); "
        "assert 'pillow_heif' not in sys.modules, 'imported too early'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# --- limits -----------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and carries almost no data: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bomb_is_refused_from_the_header():
    with pytest.raises(ImageError) as caught:
        prepare(png_header(20_000, 20_000), (512, 512))
    message = str(caught.value)
    assert message.startswith("image too large: ")
    assert "400 MP" in message
    assert "100 MP limit" in message
    assert "--max-pixels" in message


# Pillow warns (it cannot be told per call not to) on its way to our refusal.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_message_names_the_sides_when_pillow_lets_it_through():
    with pytest.raises(ImageError) as caught:
        prepare(png_header(12_000, 10_000), None)
    assert str(caught.value) == (
        "image too large: 12000x10000 (120 MP) exceeds the 100 MP limit; raise it with --max-pixels"
    )


def test_custom_limit_applies():
    with pytest.raises(ImageError, match="image too large: 2000x1000 .* 1 MP limit"):
        prepare(png_header(2000, 1000), None, max_pixels=1_000_000)


def test_pillow_does_not_object_to_an_image_under_our_limit():
    # 95 MP is over Pillow's default warning threshold (89.5 MP) but under ours: Pillow must
    # stay quiet and let the decode go on (here it then fails, the data being absent).
    assert DEFAULT_MAX_PIXELS >= 95_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="corrupt or truncated"):
            prepare(png_header(10_000, 9_500), None)


def test_raised_limit_lets_a_very_large_header_through_to_decoding():
    with pytest.raises(ImageError, match="corrupt or truncated"):
        prepare(png_header(20_000, 20_000), None, max_pixels=500_000_000)


# --- failures ---------------------------------------------------------------------------


def test_empty_bytes_and_empty_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for source in (b"", empty):
        with pytest.raises(ImageError, match="empty file"):
            prepare(source, None)


def test_text_named_jpg(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("shopping list: milk, eggs\n")
    with pytest.raises(ImageError, match="not an image: the file holds text"):
        prepare(fake, (64, 64))


def test_random_bytes_are_not_an_image():
    with pytest.raises(ImageError, match="not an image"):
        prepare(bytes(range(256)) * 4, None)


@pytest.mark.parametrize("name", ["chelsea.jpg", "camera.png"])
def test_truncated_photo(photos_dir, name):
    data = (photos_dir / name).read_bytes()
    with pytest.raises(ImageError, match="corrupt or truncated"):
        prepare(data[: len(data) // 2], (64, 64))


def test_unsupported_heif_like_container():
    # An ISO-BMFF file that is not an image (an MP4 'ftyp' box with nothing after it).
    data = struct.pack(">I", 24) + b"ftypisom" + b"\0\0\0\0" + b"isommp41"
    with pytest.raises(ImageError, match="unsupported format"):
        prepare(data, None)


def test_file_vanished(tmp_path):
    with pytest.raises(ImageError, match="file vanished"):
        prepare(tmp_path / "gone.jpg", None)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        prepare(tmp_path, None)


def test_no_raw_exception_escapes_on_mangled_photos(photos_dir):
    # Flip bytes all over a real JPEG and PNG: whatever breaks must come out as ImageError.
    refused = 0
    for name in ("chelsea.jpg", "camera.png"):
        original = (photos_dir / name).read_bytes()
        for start in range(0, 2000, 97):
            data = bytearray(original)
            for i in range(start, min(start + 40, len(data))):
                data[i] ^= 0x5A
            try:
                prepare(bytes(data), (64, 64))
            except ImageError:
                refused += 1
    assert refused > 0  # some of the damage was fatal, and it came out as ImageError


def test_permission_denied(photos_dir):
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        locked = Path(folder) / "locked.jpg"
        locked.write_bytes((photos_dir / "chelsea.jpg").read_bytes())
        locked.chmod(0)

        def attempt() -> str:
            try:
                prepare(locked, None)
            except ImageError as err:
                return str(err)
            return "decoded"

        assert as_unprivileged(attempt).startswith("permission denied")
