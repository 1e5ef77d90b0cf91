"""How fast imaging.prepare turns 12 MP JPEGs into model-sized images, against the naive way.

    python benchmarks/decode_speed.py                 # 12 generated 12 MP JPEGs
    python benchmarks/decode_speed.py photo1.jpg ...  # your own files
    python benchmarks/decode_speed.py --count 24 --box 512 --threads 8

Without files it upscales the photos in examples/ to 4000x3000 in a temp folder. The naive
way is `Image.open(p).convert("RGB").resize((512, 512))` (no encode, squashed aspect);
prepare() also fits the aspect, orients and encodes a JPEG, so its ratio is if anything low.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmtag.ingest.imaging import prepare  # noqa: E402 - after the src path is known

EXAMPLES = ROOT / "examples"
BIG = (4000, 3000)


def make_photos(folder: Path, count: int) -> list[Path]:
    sources = sorted(EXAMPLES.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"no photos in {EXAMPLES}; pass some JPEG files instead")
    made = []
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as im:
            big = _crop_to_aspect(im.convert("RGB"), BIG).resize(BIG, Image.Resampling.BICUBIC)
        path = folder / f"big-{i:03}.jpg"
        big.save(path, "JPEG", quality=90)
        made.append(path)
    return made


def _crop_to_aspect(im: Image.Image, aspect: tuple[int, int]) -> Image.Image:
    w, h = im.size
    target_w = min(w, h * aspect[0] // aspect[1])
    target_h = min(h, w * aspect[1] // aspect[0])
    left, top = (w - target_w) // 2, (h - target_h) // 2
    return im.crop((left, top, left + target_w, top + target_h))


def naive(path: Path, box: int) -> object:
    return Image.open(path).convert("RGB").resize((box, box))


def with_prepare(path: Path, box: int) -> object:
    return prepare(path, (box, box))


def rate(fn: Callable[[Path, int], object], paths: list[Path], box: int, threads: int) -> float:
    """Images per second over all paths, in one pass."""
    start = time.perf_counter()
    if threads == 1:
        for path in paths:
            fn(path, box)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: fn(p, box), paths))
    return len(paths) / (time.perf_counter() - start)


METHODS = (("naive open/convert/resize", naive), ("imaging.prepare", with_prepare))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="*", type=Path, help="JPEG files (default: generated)")
    parser.add_argument("--count", type=int, default=12, help="photos to generate")
    parser.add_argument("--box", type=int, default=512, help="fit inside box x box")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="passes per case; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        paths = args.photos or make_photos(Path(folder), args.count)
        with Image.open(paths[0]) as first:
            size = first.size
        for path in paths:  # into the page cache, so disk speed is not measured
            path.read_bytes()
        print(f"{len(paths)} photos ({size[0]}x{size[1]} first), box {args.box}, ", end="")
        print(f"{os.cpu_count()} CPUs, Pillow {Image.__version__}")
        cases = [(name, fn, n) for n in sorted({1, args.threads}) for name, fn in METHODS]
        # Rounds interleave the cases and each keeps its best, so a burst of load from
        # something else on a shared machine does not land on one case only.
        best = [0.0] * len(cases)
        for _ in range(args.rounds):
            for i, (_name, fn, threads) in enumerate(cases):
                best[i] = max(best[i], rate(fn, paths, args.box, threads))

    baseline = best[0]
    print(f"\n| {'method':<26} | threads | images/s | vs naive 1 thread |")
    print(f"|{'-' * 28}|---------|----------|-------------------|")
    for (name, _fn, threads), per_second in zip(cases, best, strict=True):
        ratio = per_second / baseline
        print(f"| {name:<26} | {threads:>7} | {per_second:>8.1f} | {ratio:>16.1f}x |")


if __name__ == "__main__":
    main()
