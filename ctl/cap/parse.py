"""One CAP 1.2 message: read safely, validated against the OASIS schema, turned into data.

Hostile input first: a message is at most :data:`MAX_BYTES`; a DTD (and with it every entity
declaration: the "billion laughs", external entities) is refused by defusedxml before any
parser expands anything; the document is then parsed by lxml with entities, DTDs and the
network off, and validated against the OASIS schema (``ctl/schemas/CAP-v1.2.xsd``). Every
problem is reported with its line, all at once: :class:`CapInvalid`. Beyond the schema, the
few rules the CAP 1.2 text states and the schema cannot (a polygon's closed ring of at least
four points, a circle's centre and radius, coordinates in range, ``references`` triples) are
checked here too, also with their lines.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from datetime import datetime

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException
from lxml import etree

NS = "urn:oasis:names:tc:emergency:cap:1.2"
MAX_BYTES = 1024 * 1024  # a CAP message is a few KiB; embedded audio (derefUri) a few hundred
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "schemas",
                           "CAP-v1.2.xsd")


class CapInvalid(ValueError):
    """The message is not valid CAP 1.2; ``problems``: ``line N: what`` each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Resource:
    desc: str
    mime: str
    size: int | None
    uri: str | None
    deref: str | None  # base64 content embedded in the message
    digest: str | None  # SHA-1, hex


@dataclass(frozen=True)
class Area:
    desc: str
    polygons: list[list[tuple[float, float]]]  # rings of (lat, lon)
    circles: list[tuple[float, float, float]]  # (lat, lon, radius km)
    geocodes: list[tuple[str, str]]  # (valueName, value)


@dataclass(frozen=True)
class Info:
    language: str  # as written (default en-US)
    event: str
    urgency: str
    severity: str
    certainty: str
    effective: datetime | None
    onset: datetime | None
    expires: datetime | None
    headline: str
    description: str
    instruction: str
    resources: list[Resource] = field(default_factory=list)
    areas: list[Area] = field(default_factory=list)

    @property
    def lang(self) -> str:
        """The primary language subtag, lower case (``vi-VN`` → ``vi``): what devices list."""
        return self.language.split("-")[0].lower()


@dataclass(frozen=True)
class Reference:
    sender: str
    identifier: str
    sent: str


@dataclass(frozen=True)
class Alert:
    identifier: str
    sender: str
    sent: datetime
    sent_text: str
    status: str
    msg_type: str
    scope: str
    restriction: str
    references: list[Reference]
    note: str
    infos: list[Info]

    @property
    def key(self) -> tuple[str, str, str]:
        """What makes a message unique (CAP 1.2 §3.2.1): sender, identifier, sent."""
        return (self.sender, self.identifier, self.sent_text)


@functools.lru_cache(maxsize=1)
def _schema() -> etree.XMLSchema:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.XMLSchema(etree.parse(SCHEMA_PATH, parser))


def _line_of(data: bytes, needle: bytes) -> int:
    at = data.find(needle)
    return data.count(b"\n", 0, at) + 1 if at >= 0 else 1


def parse(data: bytes) -> Alert:
    """``data`` (the XML bytes) as an :class:`Alert`. Raises :class:`CapInvalid`."""
    if len(data) > MAX_BYTES:
        raise CapInvalid([f"line 1: message is {len(data)} bytes; at most {MAX_BYTES}"])
    try:  # defusedxml refuses a DTD before anything is expanded or fetched
        DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise CapInvalid([f"line {_line_of(data, b'<!DOCTYPE')}: a DTD or entity declaration"
                          f" is not allowed in a CAP message ({type(e).__name__})"]) from None
    except DET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else 1
        raise CapInvalid([f"line {line}: not well-formed XML: {e}"]) from None
    except (LookupError, ValueError) as e:  # an encoding Python does not know, and the like
        raise CapInvalid([f"line 1: unreadable XML: {e}"]) from None
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, remove_pis=True)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as e:
        raise CapInvalid([f"line {e.lineno or 1}: not well-formed XML: {e.msg}"]) from None
    except (LookupError, ValueError) as e:
        raise CapInvalid([f"line 1: unreadable XML: {e}"]) from None
    schema = _schema()
    if not schema.validate(root):
        raise CapInvalid([f"line {err.line}: {_plain(err.message)}"
                          for err in schema.error_log])
    problems: list[str] = []
    alert = _alert(root, problems)
    if problems:
        raise CapInvalid(problems)
    return alert


def _plain(message: str) -> str:
    """Schema messages without the namespace in braces (``{urn:…}info`` → ``info``)."""
    return re.sub(r"\{" + re.escape(NS) + r"\}", "", message)


# --- to data -------------------------------------------------------------------------------

def _q(name: str) -> str:
    return f"{{{NS}}}{name}"


def _text(el, name: str) -> str:
    child = el.find(_q(name))
    return (child.text or "").strip() if child is not None else ""


def _time(el, name: str, problems: list[str]) -> datetime | None:
    """A CAP time (the schema's pattern: with an offset; its ``[-,+]`` would let a comma stand
    for the sign, which xs:dateTime then refuses — checked again here all the same)."""
    text = _text(el, name)
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        problems.append(f"line {el.find(_q(name)).sourceline}: {name}: {text!r} is not a time"
                        " with its offset (YYYY-MM-DDThh:mm:ss+hh:mm)")
        return None


def _alert(root, problems: list[str]) -> Alert:
    refs = []
    ref_el = root.find(_q("references"))
    if ref_el is not None:
        for triple in (ref_el.text or "").split():
            parts = triple.split(",")
            if len(parts) != 3 or not all(parts):
                problems.append(f"line {ref_el.sourceline}: references: {triple!r} is not"
                                " sender,identifier,sent")
                continue
            refs.append(Reference(*parts))
    return Alert(
        identifier=_text(root, "identifier"), sender=_text(root, "sender"),
        sent=_time(root, "sent", problems), sent_text=_text(root, "sent"),
        status=_text(root, "status"),
        msg_type=_text(root, "msgType"), scope=_text(root, "scope"),
        restriction=_text(root, "restriction"), references=refs, note=_text(root, "note"),
        infos=[_info(el, problems) for el in root.findall(_q("info"))])


def _info(el, problems: list[str]) -> Info:
    return Info(
        language=_text(el, "language") or "en-US", event=_text(el, "event"),
        urgency=_text(el, "urgency"), severity=_text(el, "severity"),
        certainty=_text(el, "certainty"), effective=_time(el, "effective", problems),
        onset=_time(el, "onset", problems), expires=_time(el, "expires", problems),
        headline=_text(el, "headline"), description=_text(el, "description"),
        instruction=_text(el, "instruction"),
        resources=[_resource(r) for r in el.findall(_q("resource"))],
        areas=[_area(a, problems) for a in el.findall(_q("area"))])


def _resource(el) -> Resource:
    size = _text(el, "size")
    return Resource(desc=_text(el, "resourceDesc"), mime=_text(el, "mimeType"),
                    size=int(size) if size else None, uri=_text(el, "uri") or None,
                    deref=_text(el, "derefUri") or None, digest=_text(el, "digest") or None)


def _point(text: str) -> tuple[float, float]:
    lat, lon = (float(v) for v in text.split(","))
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError("out of range")
    return lat, lon


def _area(el, problems: list[str]) -> Area:
    polygons, circles = [], []
    for p in el.findall(_q("polygon")):
        try:
            ring = [_point(pair) for pair in (p.text or "").split()]
        except ValueError:
            ring = None
        if ring is None or len(ring) < 4 or ring[0] != ring[-1]:
            problems.append(f"line {p.sourceline}: polygon: must be at least four lat,lon pairs"
                            " (WGS 84 degrees), the first equal to the last")
        else:
            polygons.append(ring)
    for c in el.findall(_q("circle")):
        try:
            centre, radius = (c.text or "").split()
            lat, lon = _point(centre)
            r = float(radius)
            if not 0 <= r <= 20_000:
                raise ValueError
            circles.append((lat, lon, r))
        except ValueError:
            problems.append(f"line {c.sourceline}: circle: must be 'lat,lon radius' (degrees,"
                            " kilometres)")
    geocodes = [(_text(g, "valueName"), _text(g, "value")) for g in el.findall(_q("geocode"))]
    return Area(_text(el, "areaDesc"), polygons, circles, geocodes)
