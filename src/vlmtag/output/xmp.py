"""XMP sidecars: build one, or merge vlmtag's keywords and description into an existing one.

The merge rule: a person's keywords (also those only in a Lightroom or digiKam hierarchy),
descriptions and every other property stay; keywords
vlmtag wrote before (listed in vlmtag:keywords) are replaced, and one a person took out is
remembered (vlmtag:removedKeywords) and never put back. plan_keywords() is that rule, shared
with embedding into images (embed.py).

Parsing uses the standard library: XMP never needs a DTD, so a file with <!DOCTYPE> is refused
before any entity is declared (no billion laughs, no external entities, whatever the expat).
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

from vlmtag import __version__

X = "adobe:ns:meta/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM = "http://www.digikam.org/ns/1.0/"
VLMTAG = "http://ns.vlmtag.org/1.0/"  # our bookkeeping; fixed once sidecars exist in the wild
XML_NS = "http://www.w3.org/XML/1998/namespace"
PREFERRED_PREFIXES = {X: "x", RDF: "rdf", DC: "dc", LR: "lr", DIGIKAM: "digiKam", VLMTAG: "vlmtag"}
PACKET_ID = "W5M0MpCehiHzreSzNTczkc9d"  # the fixed id every XMP packet carries
MAX_SIDECAR_BYTES = 64 * 1024 * 1024  # darktable histories are big, but not this big
INDENT = " "
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

# (namespace, property, container) of every keyword list kept in step. digiKam reads its own
# TagsList before dc:subject, so when a sidecar has one, it gets our keywords too.
KEYWORD_LISTS = ((DC, "subject", "Bag"), (LR, "hierarchicalSubject", "Bag"))
OPTIONAL_KEYWORD_LISTS = ((DIGIKAM, "TagsList", "Seq"),)
HIERARCHY_SEPARATOR = "|"  # Lightroom's, in lr:hierarchicalSubject
TAGSLIST_SEPARATOR = "/"  # digiKam's, in digiKam:TagsList


class SidecarError(Exception):
    """An existing sidecar cannot be merged safely (not XML, not XMP, has a DTD). Left as is."""


@dataclass(frozen=True)
class Metadata:
    """What vlmtag puts into one sidecar or image."""

    keywords: list[str]
    description: str | None
    model: str


@dataclass(frozen=True)
class KeywordPlan:
    """The outcome of the merge rule for one file's keyword lists."""

    ours: list[str]  # vlmtag's keywords after this export
    stale: frozenset[str]  # vlmtag's keywords from before, to take out
    removed: list[str]  # vlmtag's keywords a person took out: never added again

    def apply(self, values: Iterable[str], *, fit=lambda k: k) -> list[str]:
        """A keyword list with stale machine keywords out and ours in (fit: e.g. a length cap)."""
        kept = [v for v in values if v not in self._stale(fit)]
        return kept + self.additions(kept, fit=fit)

    def additions(self, kept: Iterable[str], *, fit=lambda k: k) -> list[str]:
        """Our keywords that a list (stale ones already out) lacks, compared case-insensitively."""
        seen = {v.casefold() for v in kept}
        added = []
        for keyword in map(fit, self.ours):
            if keyword.casefold() not in seen:
                seen.add(keyword.casefold())
                added.append(keyword)
        return added

    def _stale(self, fit) -> set[str]:
        return {fit(k) for k in self.stale} - {fit(k) for k in self.ours}


def plan_keywords(
    present: Iterable[str],
    ours_before: Iterable[str],
    removed_before: Iterable[str],
    tags: list[str],
    *,
    elsewhere: Iterable[str] = (),
) -> KeywordPlan:
    """Which keywords are ours after this export, given what the file holds now.

    present: the file's keywords now; ours_before: what vlmtag wrote last time. A keyword in
    ours_before that is no longer present was taken out by a person. A tag a person already
    has (compared case-insensitively) stays theirs, so it is never removed later. elsewhere:
    keywords a person has only in another list (hierarchy_keywords()); they are theirs too.
    """
    present = list(present)
    before = list(dict.fromkeys(ours_before))
    present_set = set(present)
    removed = list(dict.fromkeys([*removed_before, *(k for k in before if k not in present_set)]))
    removed_folded = {k.casefold() for k in removed}
    before_set = set(before)
    claimed = {k.casefold() for k in elsewhere}
    theirs = {k.casefold() for k in present if k not in before_set} | claimed
    ours: list[str] = []
    seen: set[str] = set()
    for tag in tags:
        folded = tag.casefold()
        if tag and folded not in theirs and folded not in removed_folded and folded not in seen:
            seen.add(folded)
            ours.append(tag)
    # One of ours that a person has since put in a hierarchy is theirs now: it stays everywhere.
    stale = {k for k in before_set - set(ours) if k.casefold() not in claimed}
    return KeywordPlan(ours=ours, stale=frozenset(stale), removed=removed)


def hierarchy_keywords(
    lightroom: Iterable[str], digikam: Iterable[str], ours_before: Iterable[str]
) -> list[str]:
    """The keywords a person has in lr:hierarchicalSubject or digiKam:TagsList.

    Lightroom writes "Places|Paris" and digiKam "Places/Paris": the leaf, "Paris", is the
    keyword. An entry that is exactly one vlmtag wrote before is our copy, not a person's.
    """
    before = set(ours_before)
    found: list[str] = []
    for entries, separator in ((lightroom, HIERARCHY_SEPARATOR), (digikam, TAGSLIST_SEPARATOR)):
        for entry in entries:
            leaf = entry.rsplit(separator, 1)[-1].strip()
            if entry not in before and leaf:
                found.append(leaf)
    return found


def xml_text(text: str) -> str:
    """Text without the characters XML 1.0 cannot carry at all (not even as &#...;)."""
    return _XML_INVALID.sub("", text)


def digest(text: str) -> str:
    """A short fingerprint of a description, to tell ours from a person's later."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def choose_description(current: str | None, ours_digest: str | None) -> bool:
    """Whether vlmtag may set the description: none yet (or blank), or the one it wrote."""
    if current is None or not current.strip():
        return True
    return ours_digest is not None and digest(current) == ours_digest


def new_sidecar(meta: Metadata) -> bytes:
    """A fresh sidecar holding only vlmtag's metadata."""
    root = ET.Element(q(X, "xmpmeta"), {q(X, "xmptk"): f"vlmtag {__version__}"})
    rdf = ET.SubElement(root, q(RDF, "RDF"))
    ET.SubElement(rdf, q(RDF, "Description"), {q(RDF, "about"): ""})
    _merge_into(root, meta)
    return serialize(root, {})


def merge_sidecar(data: bytes, meta: Metadata) -> bytes:
    """The existing sidecar `data` with vlmtag's metadata merged in; raises SidecarError."""
    root, prefixes = parse(data)
    try:
        _merge_into(root, meta)
        return serialize(root, prefixes)
    except RecursionError:  # indenting and writing walk the tree: a hostile one is too deep
        raise SidecarError("its elements are nested too deeply for an XMP file") from None


def q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


# ---- reading -----------------------------------------------------------------------------


class _Builder(ET.TreeBuilder):
    """Keeps comments and the prefixes the file used, and stops at a DTD."""

    def __init__(self) -> None:
        super().__init__(insert_comments=True, insert_pis=True)
        self.prefixes: dict[str, str] = {}

    def start_ns(self, prefix: str, uri: str) -> None:
        self.prefixes.setdefault(uri, prefix)

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        # Called at <!DOCTYPE, before the internal subset: no entity is ever declared.
        raise SidecarError("it has a DTD (<!DOCTYPE>), which XMP never uses")


def parse(data: bytes) -> tuple[ET.Element, dict[str, str]]:
    """The root element of an XMP document and the prefix it used for each namespace."""
    if len(data) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"it is larger than {MAX_SIDECAR_BYTES // 2**20} MiB")
    builder = _Builder()
    parser = ET.XMLParser(target=builder)
    try:
        parser.feed(data)
        root = parser.close()
    except ET.ParseError as exc:
        raise SidecarError(f"it is not valid XML ({exc})") from None
    if root.tag not in (q(X, "xmpmeta"), q("adobe:ns:meta/", "xapmeta"), q(RDF, "RDF")):
        raise SidecarError(f"it is XML but not XMP (its root is {_local(root.tag)})")
    if _rdf(root) is None:
        raise SidecarError("it is XMP without an rdf:RDF element")
    return root, builder.prefixes


def read_metadata(root: ET.Element) -> dict[str, list[str] | str | None]:
    """The values the merge looks at (also handy to inspect a sidecar)."""
    descriptions = _descriptions(root)
    return {
        "subject": _values(descriptions, DC, "subject"),
        "hierarchicalSubject": _values(descriptions, LR, "hierarchicalSubject"),
        "description": _default_text(descriptions),
        "keywords": _values(descriptions, VLMTAG, "keywords"),
        "removedKeywords": _values(descriptions, VLMTAG, "removedKeywords"),
        "descriptionDigest": _simple(descriptions, VLMTAG, "descriptionDigest"),
        "model": _simple(descriptions, VLMTAG, "model"),
    }


def _rdf(root: ET.Element) -> ET.Element | None:
    return root if root.tag == q(RDF, "RDF") else root.find(q(RDF, "RDF"))


def _descriptions(root: ET.Element) -> list[ET.Element]:
    rdf = _rdf(root)
    assert rdf is not None
    found = rdf.findall(q(RDF, "Description"))
    if not found:
        found = [ET.SubElement(rdf, q(RDF, "Description"), {q(RDF, "about"): ""})]
    return found


def _props(descriptions: list[ET.Element], ns: str, name: str) -> list[ET.Element]:
    return [p for d in descriptions for p in d.findall(q(ns, name))]


def _values(descriptions: list[ET.Element], ns: str, name: str) -> list[str]:
    """The items of an array property, wherever it is (or the value, if written as a simple one)."""
    values: list[str] = []
    for prop in _props(descriptions, ns, name):
        container = _container(prop)
        if container is None:
            values.append(prop.text or "")
        else:
            values.extend(li.text or "" for li in container.findall(q(RDF, "li")))
    for d in descriptions:
        if q(ns, name) in d.attrib:
            values.append(d.attrib[q(ns, name)])
    return values


def _simple(descriptions: list[ET.Element], ns: str, name: str) -> str | None:
    for d in descriptions:
        if q(ns, name) in d.attrib:
            return d.attrib[q(ns, name)]
    props = _props(descriptions, ns, name)
    return (props[0].text or "") if props else None


def _container(prop: ET.Element) -> ET.Element | None:
    for child in prop:
        if child.tag in (q(RDF, "Bag"), q(RDF, "Seq"), q(RDF, "Alt")):
            return child
    return None


def _items(container: ET.Element | None) -> list[ET.Element]:
    return [] if container is None else container.findall(q(RDF, "li"))


def _default_text(descriptions: list[ET.Element]) -> str | None:
    li = _default_li(descriptions)
    return None if li is None else (li.text or "")


def _default_li(descriptions: list[ET.Element]) -> ET.Element | None:
    for prop in _props(descriptions, DC, "description"):
        container = _container(prop)
        items = [] if container is None else container.findall(q(RDF, "li"))
        for li in items:
            if li.get(q(XML_NS, "lang"), "").lower() == "x-default":
                return li
    return None


# ---- merging -----------------------------------------------------------------------------


def _merge_into(root: ET.Element, meta: Metadata) -> None:
    meta = Metadata(
        keywords=[k for k in map(xml_text, meta.keywords) if k],
        description=None if meta.description is None else xml_text(meta.description),
        model=xml_text(meta.model),
    )
    descriptions = _descriptions(root)
    main = descriptions[0]
    before = _values(descriptions, VLMTAG, "keywords")
    elsewhere = hierarchy_keywords(
        _values(descriptions, LR, "hierarchicalSubject"),
        _values(descriptions, DIGIKAM, "TagsList"),
        before,
    )
    plan = plan_keywords(
        _values(descriptions, DC, "subject"),
        before,
        _values(descriptions, VLMTAG, "removedKeywords"),
        meta.keywords,
        elsewhere=elsewhere,
    )
    for ns, name, kind in KEYWORD_LISTS:
        _apply_plan(descriptions, main, ns, name, kind, plan, create=True)
    for ns, name, kind in OPTIONAL_KEYWORD_LISTS:
        _apply_plan(descriptions, main, ns, name, kind, plan, create=False)
    _set_array(descriptions, main, VLMTAG, "keywords", "Bag", plan.ours)
    _set_array(descriptions, main, VLMTAG, "removedKeywords", "Bag", plan.removed)
    _merge_description(descriptions, main, meta.description)
    _set_simple(descriptions, main, VLMTAG, "model", meta.model)


def _apply_plan(descriptions, main, ns, name, kind, plan: KeywordPlan, *, create: bool) -> None:
    props = _props(descriptions, ns, name)
    if not props and not create:
        return
    emptied = []
    for prop in props:  # take stale ones out wherever they are; keep a person's items as they are
        container = _container(prop)
        stale = [li for li in _items(container) if (li.text or "") in plan.stale]
        for li in stale:
            container.remove(li)
        if stale and not len(container):
            emptied.append(prop)
    added = plan.additions(_values(descriptions, ns, name))
    if added and not props:
        props = [_new_array(main, ns, name, kind)]
    if added and _container(props[0]) is None:
        # A malformed simple value: make it the first item of a real array.
        text, props[0].text = props[0].text, None
        container = ET.SubElement(props[0], q(RDF, kind))
        if text:
            ET.SubElement(container, q(RDF, "li")).text = text
    for keyword in added:
        ET.SubElement(_container(props[0]), q(RDF, "li")).text = keyword
    for prop in emptied:
        if not len(_container(prop)):
            _parent_of(descriptions, prop).remove(prop)


def _merge_description(descriptions, main, new: str | None) -> None:
    current = _default_text(descriptions)
    ours = _simple(descriptions, VLMTAG, "descriptionDigest")
    if not choose_description(current, ours):
        _set_simple(descriptions, main, VLMTAG, "descriptionDigest", None)
        return
    li = _default_li(descriptions)
    if new is None:
        if li is not None:
            _remove_li(descriptions, li)
    else:
        if li is None:
            prop = (_props(descriptions, DC, "description") or [None])[0]
            if prop is None or _container(prop) is None:
                prop = _new_array(main, DC, "description", "Alt")
            li = ET.Element(q(RDF, "li"), {q(XML_NS, "lang"): "x-default"})
            _container(prop).insert(0, li)  # x-default comes first in an Alt
        li.text = new
    _set_simple(
        descriptions, main, VLMTAG, "descriptionDigest", None if new is None else digest(new)
    )


def _remove_li(descriptions, li: ET.Element) -> None:
    for prop in _props(descriptions, DC, "description"):
        container = _container(prop)
        if container is not None and li in list(container):
            container.remove(li)
            if not len(container):
                _parent_of(descriptions, prop).remove(prop)
            return


def _set_array(descriptions, main, ns, name, kind, values: list[str]) -> None:
    prop = _replace_prop(descriptions, main, ns, name, keep=bool(values))
    if prop is not None:
        container = ET.SubElement(prop, q(RDF, kind))
        for value in values:
            ET.SubElement(container, q(RDF, "li")).text = value


def _set_simple(descriptions, main, ns, name, value: str | None) -> None:
    prop = _replace_prop(descriptions, main, ns, name, keep=value is not None)
    if prop is not None:
        prop.text = value


def _replace_prop(descriptions, main, ns, name, *, keep: bool) -> ET.Element | None:
    """An emptied element for the property, where it was (so a rerun changes no byte), or None."""
    for d in descriptions:
        d.attrib.pop(q(ns, name), None)
    props = _props(descriptions, ns, name)
    for prop in props[1:] if keep else props:
        _parent_of(descriptions, prop).remove(prop)
    if not keep:
        return None
    if not props:
        return ET.SubElement(main, q(ns, name))
    prop = props[0]
    prop.clear()
    return prop


def _new_array(main: ET.Element, ns: str, name: str, kind: str) -> ET.Element:
    prop = ET.SubElement(main, q(ns, name))
    ET.SubElement(prop, q(RDF, kind))
    return prop


def _parent_of(descriptions: list[ET.Element], prop: ET.Element) -> ET.Element:
    return next(d for d in descriptions if prop in list(d))


# ---- writing -----------------------------------------------------------------------------


def serialize(root: ET.Element, prefixes: dict[str, str]) -> bytes:
    """The document as an XMP packet in UTF-8, with the file's own prefixes where it had them."""
    if root.tag == q(RDF, "RDF"):  # a bare rdf:RDF is legal; the usual wrapper is kinder to tools
        wrapper = ET.Element(q(X, "xmpmeta"))
        wrapper.append(root)
        root = wrapper
    ET.indent(root, space=INDENT)
    names = _prefix_names(root, prefixes)
    out: list[str] = [f'<?xpacket begin="\ufeff" id="{PACKET_ID}"?>\n']
    declarations = "".join(
        f' xmlns:{prefix}="{_attr_escape(uri)}"' for uri, prefix in names.items()
    )
    _write_element(root, names, out, declarations)
    out.append('\n<?xpacket end="w"?>\n')
    return "".join(out).encode("utf-8")


def _prefix_names(root: ET.Element, prefixes: dict[str, str]) -> dict[str, str]:
    """One prefix per namespace used: the file's own, else the usual one, else ns1, ns2..."""
    uris: dict[str, None] = {}
    for element in root.iter():
        if isinstance(element.tag, str):
            for name in (element.tag, *element.attrib):
                if name.startswith("{"):
                    uri = name[1:].split("}", 1)[0]
                    if uri != XML_NS:
                        uris.setdefault(uri)
    names: dict[str, str] = {}
    taken = {"xml", "xmlns"}
    for uri in uris:
        for candidate in (prefixes.get(uri), PREFERRED_PREFIXES.get(uri)):
            if candidate and candidate not in taken:
                break
        else:
            n = 1
            while f"ns{n}" in taken:
                n += 1
            candidate = f"ns{n}"
        names[uri] = candidate
        taken.add(candidate)
    return names


def _qname(name: str, names: dict[str, str]) -> str:
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    return f"xml:{local}" if uri == XML_NS else f"{names[uri]}:{local}"


def _write_element(element: ET.Element, names: dict[str, str], out: list[str], extra="") -> None:
    if element.tag is ET.Comment:
        out.append(f"<!--{element.text or ''}-->")
    elif element.tag is ET.ProcessingInstruction:
        out.append(f"<?{element.text or ''}?>")
    else:
        tag = _qname(element.tag, names)
        attrs = "".join(
            f' {_qname(k, names)}="{_attr_escape(v)}"' for k, v in element.attrib.items()
        )
        out.append(f"<{tag}{extra}{attrs}")
        if element.text or len(element):
            out.append(">" + _text_escape(element.text or ""))
            for child in element:
                _write_element(child, names, out)
            out.append(f"</{tag}>")
        else:
            out.append("/>")
    out.append(_text_escape(element.tail or ""))


def _text_escape(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\r", "&#13;")


def _attr_escape(text: str) -> str:
    text = _text_escape(text).replace('"', "&quot;")
    return text.replace("\n", "&#10;").replace("\t", "&#9;")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
