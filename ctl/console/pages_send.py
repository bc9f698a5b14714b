"""Bulletins: the form, sending (one signed command per target, each audited with its id),
the page where each target's acks arrive, and ``/media/<sha256>.<ext>`` (the recordings the
devices fetch: public, by content hash, never a listing)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response

from agent import protocol
from ctl.console import compose
from ctl.console.app import Console, Req, now_ms
from ctl.media import NAME_RE, MediaError

# Spoken by the devices' engine (espeak-ng has these voices); recordings may be in any
# language the devices list in device.languages: Gia Lai's Jrai and Bahnar among them.
TTS_LANGS = {"vi": "Tiếng Việt", "en": "English"}
RECORDING_LANGS = {"vi": "Tiếng Việt", "jra": "Jrai", "bdq": "Bahnar", "km": "Khmer",
                   "en": "English"}


def form_page(c: Console, req: Req, **extra):
    if not req.user.can_send:
        return c.render(req, "message.html", code=403, title="Không có quyền",
                        message="Tài khoản chỉ xem (viewer) không gửi được bản tin.")
    devices = [r.device for r in c.fleet.visible(req.user)]
    groups = ([] if not req.user.admin else ["all"]) + c.visible_groups(req.user)
    priorities = [p for p in ("normal", "priority", "emergency") if req.user.may_priority(p)]
    return c.render(req, "bulletin.html", code=extra.pop("status", 200), groups=groups,
                    devices=devices, priorities=priorities, langs=TTS_LANGS,
                    recording_langs=RECORDING_LANGS,
                    form=extra.pop("form", {}), **extra)


def _targets(form) -> list[str]:
    return [str(t) for t in form.getlist("target")][:compose.MAX_TARGETS + 1]


def _int(value, default: int | None) -> int | None:
    try:
        return int(str(value)) if str(value).strip() else default
    except ValueError:
        raise compose.Invalid([f"not a whole number: {str(value)[:20]!r}"]) from None


def send(c: Console, req: Req):
    f = req.form
    values = {k: str(f.get(k, "")) for k in ("text", "lang", "priority", "at", "repeat",
                                              "volume", "board_text", "mode")}
    values["targets"] = _targets(f)
    try:
        b = compose.Bulletin(targets=values["targets"],
                             priority=values["priority"] or "normal",
                             lang=values["lang"] or "vi",
                             repeat=_int(values["repeat"], 1),
                             volume=_int(values["volume"], None),
                             board_text=values["board_text"].strip() or None)
        compose.authorize(b.targets, b.priority, req.user, c.groups)  # before any upload
        if values["mode"] == "file":
            b.media = _recordings(c, req)
            b.at_ms = compose.parse_at(values["at"], c.cfg["relay"]["timezone"])
        else:
            b.text = values["text"]
            b.at_ms = compose.parse_at(values["at"], c.cfg["relay"]["timezone"])
        now = now_ms()
        typ, args = compose.check(b, req.user, c.groups, now)
    except compose.Refused as e:
        c.audit.record(req.user.name, "bulletin", "refused", target=",".join(b_targets(values)),
                       detail={"why": str(e), "priority": values["priority"]}, addr=req.addr)
        return form_page(c, req, status=403, error=str(e), form=values)
    except (compose.Invalid, MediaError) as e:
        problems = e.problems if isinstance(e, compose.Invalid) else [str(e)]
        c.audit.record(req.user.name, "bulletin", "failed", target=",".join(b_targets(values)),
                       detail={"problems": problems[:10]}, addr=req.addr)
        return form_page(c, req, status=400, problems=problems, form=values)
    key, kid = c.signing()
    batch, envs = compose.envelopes(b, typ, args, key, kid, now)
    prefix = c.cfg["mqtt"]["topic_prefix"]
    for env in envs:
        c.audit.command(env, batch, req.user.name)
        c.link.follow(env["id"])
        try:
            c.link.publish(f"{prefix}/{env['target']}/cmd", protocol.canonical(env))
            outcome, why = "ok", None
        except ConnectionError as e:
            outcome, why = "failed", str(e)
            c.audit.unsent(env["id"], why)
        c.audit.record(req.user.name, f"bulletin {typ}", outcome, target=env["target"],
                       cmd_id=env["id"], detail={"batch": batch, "priority": b.priority,
                                                 **({"why": why} if why else {})},
                       addr=req.addr)
    return RedirectResponse(f"/sent/{batch}", 303)


def b_targets(values: dict) -> list[str]:
    return [t[:70] for t in values.get("targets", [])][:20]


def _recordings(c: Console, req: Req) -> list[dict]:
    """Each uploaded file (checked by content, capped) into the media store; refs with the
    language chosen beside it."""
    out = []
    for i in ("1", "2", "3"):
        up = req.form.get(f"file{i}")
        if up is None or isinstance(up, str) or not up.filename:
            continue
        data = up.file.read(int(c.media.max_bytes) + 1)
        media = c.media.put(data)
        lang = str(req.form.get(f"lang{i}", "")) or None
        out.append(media.ref(lang))
        c.audit.record(req.user.name, "upload", "ok", detail={
            "sha256": media.sha256, "kind": media.kind, "bytes": media.size,
            "name": str(up.filename)[:100]}, addr=req.addr)
    if not out:
        raise compose.Invalid(["chưa chọn tệp ghi âm (MP3, WAV hoặc OGG)"])
    return out


def sent_page(c: Console, req: Req):
    batch = req.params["batch"]
    cmds = c.audit.batch(batch)
    if not cmds or (req.user.role == "operator"
                    and any(x["username"] != req.user.name for x in cmds)):
        return c.render(req, "message.html", code=404, title="Không tìm thấy", message=batch)
    return c.render(req, "sent.html", batch=batch, cmds=cmds)


def sent_acks(c: Console, req: Req):
    """The batch's acks so far, as JSON: the page reads them once its live stream is open,
    so an ack that came between the page and the stream is not missed."""
    import json

    cmds = c.audit.batch(req.params["batch"])
    if not cmds or (req.user.role == "operator"
                    and any(x["username"] != req.user.name for x in cmds)):
        return Response(status_code=404)
    body = [{"cmd_id": x["id"], "final": x["final"], "acks": x["acks"]} for x in cmds]
    return Response(json.dumps(body, ensure_ascii=False), media_type="application/json")


async def media(request: Request) -> Response:
    c: Console = request.app.state.console
    name = request.path_params["name"]
    if not NAME_RE.fullmatch(name):
        return Response(status_code=404)
    path = c.media.path_of(name)
    if path is None:
        return Response(status_code=404)
    kind = name.rsplit(".", 1)[1]
    return FileResponse(path, media_type={"mp3": "audio/mpeg", "wav": "audio/wav",
                                          "ogg": "audio/ogg"}[kind],
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})


def public_routes():
    from starlette.routing import Route

    return [Route("/media/{name}", media, methods=["GET", "HEAD"])]


ROUTES = [
    ("/bulletins", form_page, ["GET"], {}),
    ("/bulletins", send, ["POST"], {}),
    ("/sent/{batch}", sent_page, ["GET"], {}),
    ("/sent/{batch}/acks", sent_acks, ["GET"], {}),
]
