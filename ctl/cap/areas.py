"""Which devices a CAP ``area`` covers (docs/CAP.md, "Targets").

An area selects groups by ``geocode`` (``cap.geocodes``, keys ``VALUENAME=VALUE``) and by
``areaDesc`` (``cap.area_names``), and single devices geometrically: a ``polygon`` (shapely)
or a ``circle`` (great-circle distance) around the coordinates of the top-level ``locations``
(a device's own, else its group's: :func:`ctl.config.location_of`). The devices a controller
knows are those of the relay's store and the device ids listed in ``locations``.
"""

from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import dataclass, field

from ctl.cap.parse import Area
from ctl.config import location_of
from ctl.store import read_devices

EARTH_RADIUS_KM = 6371.0088


@dataclass
class Targets:
    """MQTT targets (``grp/G``, ``dev/ID``) and why each was chosen."""

    why: dict[str, list[str]] = field(default_factory=dict)

    def add(self, target: str, reason: str) -> None:
        reasons = self.why.setdefault(target, [])
        if reason not in reasons:
            reasons.append(reason)

    def __bool__(self) -> bool:
        return bool(self.why)

    def __iter__(self):
        return iter(sorted(self.why))


def _name(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def known_devices(cfg: dict) -> list[str]:
    """The devices the controller knows: the relay store's, and device ids in ``locations``
    (a key that is not a ``relay.groups`` name)."""
    relay = cfg["relay"]
    store = read_devices(relay.get("db_url") or os.path.expanduser(relay["db_path"])) or {}
    groups = relay["groups"]
    return sorted(set(store) | {k for k in (cfg.get("locations") or {}) if k not in groups})


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle (haversine) distance between two (lat, lon) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def has_geometry(areas: list[Area]) -> bool:
    return any(a.polygons or a.circles for a in areas)


def resolve(areas: list[Area], cfg: dict, devices: list[str]) -> Targets:
    """The targets of ``areas``: groups by geocode and name, devices by polygon and circle
    (``devices``: those known, :func:`known_devices`; read only when there is geometry)."""
    cap = cfg["cap"]
    names = {_name(k): v for k, v in cap["area_names"].items()}
    out = Targets()
    located = [(d, loc) for d in devices if (loc := location_of(d, cfg)) is not None]
    for area in areas:
        for value_name, value in area.geocodes:
            key = f"{value_name}={value}"
            for g in cap["geocodes"].get(key, []):
                out.add(f"grp/{g}", f"geocode {key}")
        for g in names.get(_name(area.desc), []):
            out.add(f"grp/{g}", f"areaDesc {area.desc!r}")
        for ring in area.polygons:
            from shapely.geometry import Point, Polygon  # only when a polygon is given

            shape = Polygon([(lon, lat) for lat, lon in ring])
            if not shape.is_valid:
                shape = shape.buffer(0)  # a self-crossing ring: its area, as drawn
            for d, (lat, lon) in located:
                if shape.covers(Point(lon, lat)):
                    out.add(f"dev/{d}", "inside the polygon")
        for lat, lon, radius in area.circles:
            for d, loc in located:
                if distance_km((lat, lon), loc) <= radius:
                    out.add(f"dev/{d}", f"within {radius:g} km of {lat:g},{lon:g}")
    return out
