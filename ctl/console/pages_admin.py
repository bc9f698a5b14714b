"""Login and logout, alerts (acknowledge with a note), audit, reports."""

from __future__ import annotations

import io
import os
import secrets
import tempfile

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from ctl.console import fleet as fl
from ctl.console.app import Console, Req, client_addr, current, now_ms
from ctl.console.sessions import COOKIE, LOGIN_COOKIE, same
from ctl.console.users import LoginRefused
from ctl.db import Database

LOGIN_SAYS = {"bad": "Sai tên đăng nhập hoặc mật khẩu.",
              "locked": "Tài khoản tạm khoá do nhập sai nhiều lần. Thử lại sau.",
              "rate": "Quá nhiều lần thử từ địa chỉ này. Thử lại sau một phút.",
              "csrf": "Phiên đăng nhập hết hạn, vui lòng thử lại."}


def _next(value: str | None) -> str:
    """Only a path of this site (never ``//host`` or a scheme)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _login_form(c: Console, request: Request, error: str | None = None,
                status: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    html = c.env.get_template("login.html").render(
        user=None, csrf=token, path="/login", error=error,
        next=_next(request.query_params.get("next")))
    resp = HTMLResponse(html, status_code=status)
    resp.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict",
                    secure=c.secure_cookies, path="/login", max_age=3600)
    return resp


async def login(request: Request) -> Response:
    c: Console = request.app.state.console
    if request.method == "GET":
        return _login_form(c, request)
    form = await request.form(max_files=0, max_fields=10, max_part_size=4096)
    addr = client_addr(request)
    name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))[:1024]
    if not same(request.cookies.get(LOGIN_COOKIE), str(form.get("csrf", ""))):
        await run_in_threadpool(c.audit.record, name or None, "login", "refused",
                                detail={"why": "CSRF token missing or wrong"}, addr=addr)
        return _login_form(c, request, LOGIN_SAYS["csrf"], 403)
    try:
        user = await run_in_threadpool(c.users.login, name, password, addr)
    except LoginRefused as e:
        await run_in_threadpool(c.audit.record, name or None, "login", "refused",
                                detail={"why": e.reason}, addr=addr)
        return _login_form(c, request, LOGIN_SAYS[e.reason], 429 if e.reason == "rate" else 401)
    token, _ = await run_in_threadpool(c.sessions.create, user.name, now_ms())
    await run_in_threadpool(c.audit.record, user.name, "login", "ok", addr=addr)
    resp = RedirectResponse(_next(str(form.get("next", "/"))), 303)
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=c.secure_cookies,
                    path="/", max_age=int(c.sessions.lifetime_ms / 1000))
    resp.delete_cookie(LOGIN_COOKIE, path="/login")
    return resp


async def logout(request: Request) -> Response:
    """POST with the session's CSRF token (a link elsewhere cannot log anyone out)."""
    c: Console = request.app.state.console
    s, user = await run_in_threadpool(current, c, request)
    form = await request.form(max_files=0, max_fields=5, max_part_size=4096)
    if user is None or not same(str(form.get("csrf", "")), s.csrf):
        return RedirectResponse("/login", 303)
    await run_in_threadpool(c.sessions.end, request.cookies.get(COOKIE))
    await run_in_threadpool(c.audit.record, user.name, "logout", "ok",
                            addr=client_addr(request))
    resp = RedirectResponse("/login", 303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


def public_routes():
    from starlette.routing import Route

    return [Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", logout, methods=["POST"])]


# --- alerts ------------------------------------------------------------------------------

def alerts_page(c: Console, req: Req):
    rows = [a for a in fl.alerts(c.db, open_only=True, limit=1000)
            if req.user.sees_device(a["device"], c.groups)]
    return c.render(req, "alerts.html", alerts=rows)


def alert_ack(c: Console, req: Req):
    device = str(req.form.get("device", ""))
    try:
        seq = int(str(req.form.get("seq", "")))
    except ValueError:
        return c.render(req, "message.html", code=400, title="Sai dữ liệu", message="seq")
    note = str(req.form.get("note", "")).strip()[:500]
    if req.user.role == "viewer" or not req.user.sees_device(device, c.groups):
        c.audit.record(req.user.name, "alert_ack", "refused", target=f"dev/{device}",
                       detail={"seq": seq, "why": "not allowed"}, addr=req.addr)
        return c.render(req, "message.html", code=403, title="Không có quyền",
                        message="Bạn không xác nhận được cảnh báo của cụm loa này.")
    with c.db.tx():
        exists = c.db.one("SELECT 1 AS x FROM alerts WHERE device=? AND seq=?", device, seq)
        if exists:
            c.db.x("INSERT OR IGNORE INTO console_alert_acks(device, seq, username, note, ts)"
                   " VALUES(?, ?, ?, ?, ?)", device, seq, req.user.name, note, now_ms())
    c.audit.record(req.user.name, "alert_ack", "ok" if exists else "failed",
                   target=f"dev/{device}", detail={"seq": seq, "note": note}, addr=req.addr)
    return RedirectResponse("/alerts", 303)


# --- audit -------------------------------------------------------------------------------

def audit_page(c: Console, req: Req):
    mine = req.user.name if req.user.role == "operator" else None
    return c.render(req, "audit.html", rows=c.audit.trail(300, mine))


# --- reports -----------------------------------------------------------------------------

def _period(c: Console, req: Req):
    from ctl import report as rep

    month, year = req.query.get("month") or None, req.query.get("year") or None
    if not month and not year:
        import datetime as dt

        month = dt.date.today().strftime("%Y-%m")
    return rep.parse_period(month, None if month else year, c.cfg["relay"]["timezone"])


def _stats(c: Console, req: Req):
    from ctl import report as rep

    period = _period(c, req)
    # its own read-only connection: a year of a large fleet takes seconds, and the console's
    # shared connection (pages, the live fleet) is not held meanwhile
    db = Database(c.db.target, read_only=True)
    try:
        stats = rep.compute(db, period, c.groups, now_ms())
    finally:
        db.conn.close()
    if req.user.role == "operator":  # their devices and groups only
        mine = set(req.user.groups)
        stats = [s for s in stats if (s.scope == "group" and s.name in mine) or
                 (s.scope == "device" and req.user.sees_device(s.name, c.groups))]
    return period, stats


def reports_page(c: Console, req: Req):
    try:
        period, stats = _stats(c, req)
    except ValueError as e:
        return c.render(req, "message.html", code=400, title="Sai kỳ báo cáo", message=str(e))
    return c.render(req, "reports.html", period=period, rows=[s.row() for s in stats],
                    query=str(req.request.url.query))


def report_csv(c: Console, req: Req):
    from ctl import report as rep

    try:
        period, stats = _stats(c, req)
    except ValueError as e:
        return c.render(req, "message.html", code=400, title="Sai kỳ báo cáo", message=str(e))
    out = io.StringIO()
    rep.write_csv(stats, out)
    c.audit.record(req.user.name, "report_csv", "ok", detail={"period": period.label},
                   addr=req.addr)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="ttcs-report-{period.label}.csv"'})


def report_chart(c: Console, req: Req):
    from starlette.background import BackgroundTask

    from ctl import report as rep

    if rep.chart_problem():
        return Response(status_code=404)
    try:
        period, stats = _stats(c, req)
    except ValueError:
        return Response(status_code=400)
    fd, path = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    rep.chart(stats, period, path)
    return FileResponse(path, media_type="image/png",
                        background=BackgroundTask(os.unlink, path))


ROUTES = [
    ("/alerts", alerts_page, ["GET"], {}),
    ("/alerts/ack", alert_ack, ["POST"], {}),
    ("/audit", audit_page, ["GET"], {}),
    ("/reports", reports_page, ["GET"], {}),
    ("/reports/csv", report_csv, ["GET"], {}),
    ("/reports/chart.png", report_chart, ["GET"], {}),
]
