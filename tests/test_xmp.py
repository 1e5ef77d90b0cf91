"""XMP sidecars: exiftool reads what vlmtag writes, and merging keeps what people wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlmtag.output import xmp

needs_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None, reason="exiftool not installed (libimage-exiftool-perl)"
)
HOSTILE = ['say "hi"', "<script>alert(1)</script>", "=cmd|' /C calc'!A0", "a & b", "\u202eevil"]


def exiftool_read(path: Path) -> dict:
    out = subprocess.run(
        ["exiftool", "-j", "-G1", "-XMP-dc:Subject", "-XMP-dc:Description",
         "-XMP-lr:HierarchicalSubject", "-XMP-xmp:Rating", "-XMP-digiKam:TagsList", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = json.loads(out.stdout)[0]
    for key in ("XMP-dc:Subject", "XMP-lr:HierarchicalSubject", "XMP-digiKam:TagsList"):
        if isinstance(found.get(key), str):
            found[key] = [found[key]]
    return found


def meta(keywords: list[str], description: str | None = "A cat on a sofa.") -> xmp.Metadata:
    return xmp.Metadata(keywords=keywords, description=description, model="ollama/qwen3-vl:4b")


def values(data: bytes) -> dict:
    return xmp.read_metadata(xmp.parse(data)[0])


@needs_exiftool
def test_new_sidecar_is_read_by_exiftool_with_every_value_intact(tmp_path):
    sidecar = tmp_path / "photo.jpg.xmp"
    description = 'Line one <b>bold</b> & "quoted"\nline two \u05e9\u05dc\u05d5\u05dd'
    sidecar.write_bytes(xmp.new_sidecar(meta(["cat", *HOSTILE, "日本", "🐱"], description)))
    found = exiftool_read(sidecar)
    assert found["XMP-dc:Subject"] == ["cat", *HOSTILE, "日本", "🐱"]
    assert found["XMP-lr:HierarchicalSubject"] == found["XMP-dc:Subject"]
    assert found["XMP-dc:Description"] == description
    text = sidecar.read_text("utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert text.startswith("<?xpacket begin=") and text.rstrip().endswith('<?xpacket end="w"?>')


def test_characters_xml_cannot_carry_are_dropped_not_written():
    data = xmp.new_sidecar(meta(["bell\x07tag", "nul\x00", "\x1b[31mred"], "esc\x1b here"))
    got = values(data)  # parses: the file is valid XML
    assert got["subject"] == ["belltag", "nul", "[31mred"]
    assert got["description"] == "esc here"


@needs_exiftool
def test_merge_keeps_a_persons_keywords_and_every_other_property(tmp_path, photos_dir):
    photo = tmp_path / "photo.jpg"
    shutil.copy(photos_dir / "chelsea.jpg", photo)
    sidecar = tmp_path / "photo.xmp"
    subprocess.run(
        ["exiftool", "-q", "-XMP-dc:Subject=grandma", "-XMP-dc:Subject=Cat", "-XMP-xmp:Rating=4",
         "-XMP-dc:Description=Granny's cat", "-o", str(sidecar), str(photo)],
        check=True,
    )  # fmt: skip
    merged = xmp.merge_sidecar(sidecar.read_bytes(), meta(["cat", "sofa"]))
    sidecar.write_bytes(merged)
    found = exiftool_read(sidecar)
    assert found["XMP-dc:Subject"] == ["grandma", "Cat", "sofa"]  # "cat" is already theirs
    assert found["XMP-xmp:Rating"] == 4
    assert found["XMP-dc:Description"] == "Granny's cat"  # a person's description stays
    assert "tiff:ImageWidth" in merged.decode()  # what exiftool copied from the photo stays
    assert values(merged)["keywords"] == ["sofa"]


def person_edits(tmp_path: Path, data: bytes, *args: str) -> bytes:
    """Change a sidecar the way a person's tool would: exiftool rewrites it."""
    sidecar = tmp_path / "edit.xmp"
    sidecar.write_bytes(data)
    subprocess.run(["exiftool", "-q", "-overwrite_original", *args, str(sidecar)], check=True)
    return sidecar.read_bytes()


@needs_exiftool
def test_reexport_replaces_stale_machine_keywords_only(tmp_path):
    first = xmp.merge_sidecar(PERSON_SIDECAR, meta(["cat", "sofa", "lamp"]))
    edited = person_edits(tmp_path, first, "-XMP-dc:Subject+=Mittens")
    second = xmp.merge_sidecar(edited, meta(["cat", "cushion"], "A cat on a cushion."))
    got = values(second)
    assert got["subject"] == ["holiday", "cat", "Mittens", "cushion"]
    assert got["hierarchicalSubject"] == ["Places|Home", "cat", "cushion"]
    assert got["keywords"] == ["cat", "cushion"]
    assert got["description"] == "A cat on a cushion."  # ours, so replaced
    assert "darktable:history" in second.decode()  # survived exiftool and us


@needs_exiftool
def test_a_keyword_a_person_took_out_is_not_put_back(tmp_path):
    first = xmp.merge_sidecar(PERSON_SIDECAR, meta(["cat", "dog"]))
    edited = person_edits(
        tmp_path, first, "-XMP-dc:Subject-=dog", "-XMP-lr:HierarchicalSubject-=dog"
    )
    again = values(xmp.merge_sidecar(edited, meta(["cat", "dog", "bird"])))
    assert "dog" not in again["subject"] and "dog" not in again["hierarchicalSubject"]
    assert again["removedKeywords"] == ["dog"]
    assert again["subject"] == ["holiday", "cat", "bird"]


@needs_exiftool
def test_a_description_a_person_edited_is_theirs_from_then_on(tmp_path):
    first = xmp.merge_sidecar(PERSON_SIDECAR, meta(["cat"], "A cat."))
    edited = person_edits(tmp_path, first, "-XMP-dc:Description=Our cat Mittens.")
    second = values(xmp.merge_sidecar(edited, meta(["cat"], "A grey cat.")))
    assert second["description"] == "Our cat Mittens."
    assert second["descriptionDigest"] is None


def test_merging_twice_changes_no_byte_and_keeps_prefixes_comments_and_attributes():
    once = xmp.merge_sidecar(PERSON_SIDECAR, meta(["cat", "sofa"]))
    assert xmp.merge_sidecar(once, meta(["cat", "sofa"])) == once
    text = once.decode()
    assert 'darktable:xmp_version="5"' in text and "<darktable:history>" in text
    assert "<!-- kept by darktable -->" in text
    assert 'xml:lang="de"' in text and "Eine Katze" in text  # another language stays
    got = values(once)
    assert got["subject"] == ["holiday", "cat", "sofa"]


def test_digikam_tagslist_is_kept_in_step_when_the_sidecar_has_one():
    with_tagslist = PERSON_SIDECAR.replace(
        b"</rdf:Description>",
        b"<digiKam:TagsList><rdf:Seq><rdf:li>Places/Home</rdf:li></rdf:Seq></digiKam:TagsList>"
        b"</rdf:Description>",
    ).replace(b'xmlns:lr="', b'xmlns:digiKam="http://www.digikam.org/ns/1.0/" xmlns:lr="')
    root, _ = xmp.parse(xmp.merge_sidecar(with_tagslist, meta(["cat"])))
    items = [li.text for li in root.iter(xmp.q(xmp.RDF, "li"))]
    assert "Places/Home" in items and items.count("cat") == 4  # subject, hierarchical, tags, ours


def with_hierarchies(lightroom: list[str], digikam: list[str]) -> bytes:
    """PERSON_SIDECAR as Lightroom and digiKam leave it: keywords in their own lists only."""

    def bag(items: list[str]) -> bytes:
        return b"".join(b"<rdf:li>%s</rdf:li>" % item.encode() for item in items)

    return (
        PERSON_SIDECAR.replace(b"<rdf:li>Places|Home</rdf:li>", bag(lightroom))
        .replace(
            b"</rdf:Description>",
            b"<digiKam:TagsList><rdf:Seq>" + bag(digikam) + b"</rdf:Seq></digiKam:TagsList>"
            b"</rdf:Description>",
        )
        .replace(b'xmlns:lr="', b'xmlns:digiKam="http://www.digikam.org/ns/1.0/" xmlns:lr="')
    )


def tagslist(data: bytes) -> list[str]:
    return xmp._values(xmp._descriptions(xmp.parse(data)[0]), xmp.DIGIKAM, "TagsList")


def test_keywords_only_in_a_lightroom_or_digikam_hierarchy_are_theirs_and_stay():
    person = with_hierarchies(["Places|Paris", "Animals|Cat"], ["Events/Party", "sunset"])
    first = xmp.merge_sidecar(person, meta(["paris", "cat", "party", "sunset", "tree"]))
    got = values(first)
    assert got["keywords"] == ["tree"]  # the rest a person has already, as leaves
    assert got["subject"] == ["holiday", "tree"]  # no copy of theirs
    assert got["hierarchicalSubject"] == ["Places|Paris", "Animals|Cat", "tree"]
    assert tagslist(first) == ["Events/Party", "sunset", "tree"]
    # The model changes its mind: only "tree" is ours to take out; theirs stay as they were.
    second = xmp.merge_sidecar(first, meta(["lamp"]))
    got = values(second)
    assert got["hierarchicalSubject"] == ["Places|Paris", "Animals|Cat", "lamp"]
    assert tagslist(second) == ["Events/Party", "sunset", "lamp"]
    assert got["subject"] == ["holiday", "lamp"] and got["keywords"] == ["lamp"]


def test_one_of_ours_a_person_filed_in_a_hierarchy_is_theirs_from_then_on():
    first = xmp.merge_sidecar(with_hierarchies([], []), meta(["paris", "tree"]))
    root, prefixes = xmp.parse(first)
    tags = root.find(f".//{xmp.q(xmp.DIGIKAM, 'TagsList')}")
    tags.find(f".//{xmp.q(xmp.RDF, 'li')}").text = "Places/paris"  # digiKam files it
    filed = xmp.serialize(root, prefixes)
    assert tagslist(filed) == ["Places/paris", "tree"]
    got = values(xmp.merge_sidecar(filed, meta(["tree"])))
    assert "paris" in got["subject"] and "paris" in got["hierarchicalSubject"]
    assert got["keywords"] == ["tree"]


@pytest.mark.parametrize(
    "data, why",
    [
        (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF", "not valid XML"),
        (b"\xff\xfe garbage", "not valid XML"),
        (b"<html><body>hi</body></html>", "not XMP"),
        (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", "without an rdf:RDF"),
    ],
)
def test_a_sidecar_that_is_not_xmp_is_refused(data, why):
    with pytest.raises(xmp.SidecarError, match=why):
        xmp.merge_sidecar(data, meta(["cat"]))


def test_entity_expansion_is_refused_before_it_starts():
    lol = b'<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i else b"&lol;") * 10)
        for i in range(1, 10)
    )
    bomb = b"<?xml version='1.0'?><!DOCTYPE x [" + lol + b"]><x>&lol9;</x>"
    external = b"<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><x>&e;</x>"
    start = time.perf_counter()
    for data in (bomb, external):
        with pytest.raises(xmp.SidecarError, match="DTD"):
            xmp.merge_sidecar(data, meta(["cat"]))
    assert time.perf_counter() - start < 5  # generous: expansion would take minutes and GBs


keyword = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)


@given(
    present=st.lists(keyword, max_size=6),
    ours_before=st.lists(keyword, max_size=6),
    tags=st.lists(keyword, max_size=6),
)
def test_the_merge_rule_never_drops_a_persons_keyword(present, ours_before, tags):
    plan = xmp.plan_keywords(present, ours_before, [], tags)
    after = plan.apply(present)
    theirs = [k for k in present if k not in set(ours_before)]
    assert all(k in after for k in theirs)
    assert set(plan.ours) <= set(after)
    assert not (plan.stale - set(theirs)) & set(after)  # stale machine keywords are gone
    again = xmp.plan_keywords(after, plan.ours, plan.removed, tags)
    assert again.apply(after) == after  # a rerun with the same tags changes nothing


PERSON_SIDECAR = b"""<?xpacket begin='\xef\xbb\xbf' id='W5M0MpCehiHzreSzNTczkc9d'?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
  <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
    <rdf:Description rdf:about=""
        xmlns:xmp="http://ns.adobe.com/xap/1.0/"
        xmlns:dc="http://purl.org/dc/elements/1.1/"
        xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
        xmlns:darktable="http://darktable.sf.net/"
        xmp:Rating="3"
        darktable:xmp_version="5">
      <!-- kept by darktable -->
      <darktable:history>
        <rdf:Seq>
          <rdf:li darktable:operation="exposure" darktable:enabled="1"/>
        </rdf:Seq>
      </darktable:history>
      <dc:subject><rdf:Bag><rdf:li>holiday</rdf:li></rdf:Bag></dc:subject>
      <lr:hierarchicalSubject><rdf:Bag><rdf:li>Places|Home</rdf:li></rdf:Bag></lr:hierarchicalSubject>
      <dc:description><rdf:Alt><rdf:li xml:lang="de">Eine Katze</rdf:li></rdf:Alt></dc:description>
    </rdf:Description>
  </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
