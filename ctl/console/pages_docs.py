"""Schedules (``/schedule``) and boards (``/board``): per target, the live document (a table,
for boards a rendered preview of each message), a YAML editor, the diff before pushing, and the
devices' results; the board preview is the agent's own renderer (``ttcs-agent board-preview``)."""

from __future__ import annotations

import os
import tempfile
import threading

from starlette.responses import RedirectResponse, Response

from agent import protocol
from ctl import push as push_mod
from ctl.console import documents as docs
from ctl.console.app import Console, Req, now_ms

TITLES = {"schedule": "Lịch phát", "board": "Bảng tin"}


def _targets(c: Console, req: Req) -> list[str]:
    groups = (["all"] if req.user.role != "operator" else []) + c.visible_groups(req.user)
    return [f"grp/{g}" for g in groups]


def _kind(req: Req) -> str:
    kind = req.params["kind"]
    if kind not in docs.KINDS:
        raise ValueError(kind)
    return kind


def page(c: Console, req: Req, draft: docs.Draft | None = None, code: int = 200,
         note: str | None = None):
    kind = req.params["kind"]
    if kind not in docs.KINDS:
        return Response(status_code=404)
    targets = _targets(c, req)
    target = draft.target if draft else req.query.get("target") or (targets[0] if targets
                                                                    else "")
    if not protocol.TARGET_RE.fullmatch(target) or not (
            req.user.sees_group(target[4:]) if target.startswith("grp/")
            else req.user.sees_device(target[4:], c.groups)):
        return c.render(req, "message.html", code=403, title="Không có quyền",
                        message=f"Không xem được {target}")
    live = docs.live(c.link, target, kind)
    return c.render(req, "documents.html", code=code, kind=kind, title=TITLES[kind],
                    targets=targets, target=target, live=live,
                    rows=docs.items_table(live.args) if kind == "schedule" else [],
                    messages=(live.args or {}).get("messages", []) if kind == "board" else [],
                    editor=draft.text if draft else docs.as_yaml(live.args, kind),
                    draft=draft, note=note,
                    may_push=req.user.may_target(target, c.groups),
                    results=docs.results(c.db, kind, target, live.rev,
                                         now_ms() - 7 * 86_400_000))


def _target(c: Console, req: Req, action: str):
    """``(kind, target, None)``, or a 403 page (audited) as the third when the user may not
    reach the form's target."""
    kind = _kind(req)
    target = str(req.form.get("target", ""))
    if not protocol.TARGET_RE.fullmatch(target) or not req.user.may_target(target, c.groups):
        c.audit.record(req.user.name, f"{kind} {action}", "refused", target=target[:70],
                       addr=req.addr)
        return kind, target, c.render(req, "message.html", code=403, title="Không có quyền",
                                      message=f"Không gửi được tới {target}")
    return kind, target, None


def preview(c: Console, req: Req):
    """Check the YAML and show the diff (nothing is published)."""
    kind, target, refused = _target(c, req, "preview")
    if refused is not None:
        return refused
    text = docs.edited(c.link, kind, target, req.form) if req.form.get("op") else \
        str(req.form.get("yaml", ""))
    draft = docs.prepare(c.link, kind, target, text)
    return page(c, req, draft, 400 if draft.problems else 200)


def push(c: Console, req: Req):
    kind, target, refused = _target(c, req, "push")
    if refused is not None:
        return refused
    draft = docs.prepare(c.link, kind, target, str(req.form.get("yaml", "")))
    if draft.problems:
        return page(c, req, draft, 400)
    seen = str(req.form.get("live", ""))
    if seen != ("" if draft.live.rev is None else str(draft.live.rev)):
        return page(c, req, draft, 409, note="Tài liệu đã thay đổi từ khi xem khác biệt:"
                                              " xem lại rồi đẩy lên.")  # pushed by another
    try:  # the rev shown with the diff (with nothing live it is the time: keep that one)
        draft.rev = push_mod.next_rev(draft.live, int(str(req.form.get("rev", ""))), 0)
    except (ValueError, push_mod.PushError):
        return page(c, req, draft, 400, note="rev không hợp lệ")
    key, kid = c.signing()
    try:
        docs.publish(c.link, draft, key, kid, c.cfg["mqtt"]["topic_prefix"])
    except ConnectionError as e:
        c.audit.record(req.user.name, f"{kind} push", "failed", target=target,
                       detail={"rev": draft.rev, "why": str(e)}, addr=req.addr)
        return page(c, req, draft, 503, note=str(e))
    c.audit.record(req.user.name, f"{kind} push", "ok", target=target,
                   detail={"rev": draft.rev, "diff": draft.diff[:4000]}, addr=req.addr)
    return RedirectResponse(f"/{kind}?target={target}", 303)


PREVIEW_MAX_S = 20  # an animated preview shows at most this much of a long scroll
_previews: dict[tuple, bytes] = {}  # (geometry, text) -> PNG: the same messages are asked for
_previews_lock = threading.Lock()
_PREVIEWS_KEPT = 64


def board_image(c: Console, req: Req):
    """A PNG of ``text`` as the board shows it (the agent's renderer; an animated PNG of at
    most ``PREVIEW_MAX_S`` when it scrolls), kept for the next page that shows it."""
    from agent.board.preview import PreviewError
    from agent.board.preview import preview as render
    from agent.board.render import RenderConfig, TextRender

    text = req.query.get("text", "")[:1000]
    geometry = dict(c.cfg["console"]["board"])
    key = (tuple(sorted(geometry.items())), text)
    png = _previews.get(key)
    if png is None:
        fd, path = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        try:
            loop = TextRender(text, RenderConfig.from_options(geometry), "auto")
            seconds = min(loop.period_s, PREVIEW_MAX_S) if loop.scrolling else None
            render(geometry, text, path, seconds, scale=4)
            with open(path, "rb") as f:
                png = f.read()
        except (PreviewError, OSError):  # OSError: the font (PreviewError wraps it too)
            return Response(status_code=400)
        finally:
            os.unlink(path)
        with _previews_lock:
            while len(_previews) >= _PREVIEWS_KEPT:
                _previews.pop(next(iter(_previews)))
            _previews[key] = png
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _for(kind: str, fn):
    def handler(c: Console, req: Req):
        req.request.scope.setdefault("path_params", {})["kind"] = kind
        return fn(c, req)
    return handler


ROUTES = [("/board/preview.png", board_image, ["GET"], {})] + [
    route for kind in docs.KINDS for route in (
        (f"/{kind}", _for(kind, page), ["GET"], {}),
        (f"/{kind}/preview", _for(kind, preview), ["POST"], {}),
        (f"/{kind}/push", _for(kind, push), ["POST"], {}))]
