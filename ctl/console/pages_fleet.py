"""Fleet (``/``), a device (``/devices/ID``) and the live stream (``/events``)."""

from __future__ import annotations

from starlette.responses import PlainTextResponse, StreamingResponse

from ctl.console import fleet as fl
from ctl.console import svg
from ctl.console.app import Console, Req, now_ms

FILTERS = ("all", "playing", "online", "offline", "alerts")


def fleet_page(c: Console, req: Req):
    rows = c.fleet.visible(req.user)
    totals = fl.counts(rows)
    status = req.query.get("status", "all")
    group = req.query.get("group", "")
    q = req.query.get("q", "").strip().lower()[:64]
    shown = [r for r in rows if _matches(r, status, group, q)]
    return c.render(req, "fleet.html", rows=shown, totals=totals, status=status,
                    group=group, q=q, groups=c.visible_groups(req.user), filters=FILTERS,
                    map_svg=svg.fleet_map(rows), now=now_ms())


def _matches(r: fl.DeviceRow, status: str, group: str, q: str) -> bool:
    if status == "alerts" and not r.alerts:
        return False
    if status == "online" and r.status not in ("online", "playing"):
        return False
    if status in ("playing", "offline") and r.status != status:
        return False
    if group and group not in r.groups:
        return False
    return not q or q in r.device


def device_page(c: Console, req: Req):
    device = req.params["device"]
    if not req.user.sees_device(device, c.groups):
        return c.render(req, "message.html", code=403, title="Không có quyền",
                        message="Cụm loa này không thuộc nhóm của bạn.")
    detail = fl.device_detail(c.db, device)
    if detail is None:
        return c.render(req, "message.html", code=404, title="Không tìm thấy",
                        message="Relay chưa biết cụm loa này.")
    now = now_ms()
    series = fl.health_series(c.db, device, now - 86_400_000)
    row = c.fleet.rows.get(device)
    return c.render(req, "device.html", device=device, row=row, detail=detail,
                    chart=svg.health_chart(series, now - 86_400_000, now),
                    open_alerts=fl.alerts(c.db, device, open_only=True),
                    recent_alerts=fl.alerts(c.db, device, limit=20),
                    plays=fl.plays(c.db, device), acks=c.audit.device_acks(device))


async def events(c: Console, req: Req):
    """Server-sent events: ``device`` (a fleet row changed), ``ack`` (of our commands)."""
    user, groups = req.user, c.groups

    def allow(kind: str, data: dict) -> bool:
        return user.sees_device(data.get("device", ""), groups)

    return StreamingResponse(c.hub.stream(allow, req.request.is_disconnected),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def fleet_json(c: Console, req: Req):
    import json

    rows = c.fleet.visible(req.user)
    body = {"counts": fl.counts(rows), "devices": [r.public() for r in rows]}
    return PlainTextResponse(json.dumps(body, ensure_ascii=False), media_type="application/json")


ROUTES = [
    ("/", fleet_page, ["GET"], {}),
    ("/devices/{device}", device_page, ["GET"], {}),
    ("/events", events, ["GET"], {"stream": True}),
    ("/api/fleet", fleet_json, ["GET"], {}),
]
