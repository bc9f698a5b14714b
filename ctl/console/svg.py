"""Small server-drawn SVG: the fleet's map (configured coordinates, no tiles: the district
has no offline tile server) and a device's health chart. Only numbers go into the SVG; names
are escaped by the templates that place them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Point:
    device: str
    x: float
    y: float
    status: str


def fleet_map(rows, width: int = 600, height: int = 400, pad: int = 20) -> list[Point] | None:
    """Points scaled into the box (north up, equal degrees), or None when no device has a
    location."""
    placed = [(r, r.location) for r in rows if r.location is not None]
    if not placed:
        return None
    lats = [loc[0] for _, loc in placed]
    lons = [loc[1] for _, loc in placed]
    north, west = max(lats), min(lons)
    span = max(north - min(lats), max(lons) - west, 1e-4)
    scale = min(width - 2 * pad, height - 2 * pad) / span
    return [Point(r.device, pad + (loc[1] - west) * scale, pad + (north - loc[0]) * scale,
                  r.status) for r, loc in placed]


def health_chart(series: list[dict], start_ms: int, end_ms: int, width: int = 600,
                 height: int = 160) -> dict:
    """Polylines (``points`` attributes) for CPU temperature (0–100 °C) and 1-minute load
    (0–4) over the period."""
    def line(key: str, top: float) -> str:
        pts = []
        for s in series:
            v = s.get(key)
            if v is None:
                continue
            x = (s["t"] - start_ms) / max(1, end_ms - start_ms) * width
            y = height - max(0.0, min(1.0, float(v) / top)) * height
            pts.append(f"{x:.1f},{y:.1f}")
        return " ".join(pts)

    def dots(key: str, top: float) -> list[tuple[str, str]]:  # so a few samples still show
        return [tuple(p.split(",")) for p in line(key, top).split()] if len(series) < 48 else []

    return {"width": width, "height": height, "temp": line("temp", 100.0),
            "temp_dots": dots("temp", 100.0), "load_dots": dots("load", 4.0),
            "load": line("load", 4.0), "samples": sum(s.get("n", 0) or 0 for s in series)
            if series and "n" in series[0] else len(series)}
