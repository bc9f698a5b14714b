"""The web application's parts: :class:`Console` holds the collaborators (handed in by
:mod:`ctl.console.serve`); :mod:`ctl.console.routes` builds the Starlette app from the pages.

Every route is wrapped by :func:`guard` unless listed in ``PUBLIC`` (``/healthz``, the login
form, static files): no session → the login form (GET) or 401 (anything else); a POST without
the session's CSRF token → 403; both audited. Pages are plain functions run in a worker thread
(the database and argon2 block), taking the :class:`Console` and a :class:`Req`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote as urlquote
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from ctl.console.audit import Audit
from ctl.console.sessions import COOKIE, SessionStore, same
from ctl.console.users import User, UserStore

HERE = os.path.dirname(os.path.abspath(__file__))
FORM_LIMITS = {"max_files": 4, "max_fields": 300, "max_part_size": 256 * 1024}


@dataclass
class Console:
    cfg: dict
    db: Any  # ctl.db.Database: the relay's store
    users: UserStore
    sessions: SessionStore
    audit: Audit
    fleet: Any  # ctl.console.fleet.FleetWatcher
    hub: Any  # ctl.console.live.Hub
    link: Any  # ctl.console.link.Link
    media: Any  # ctl.media.MediaStore
    signing: Callable[[], Any]  # () -> (key, kid): the district key, read when needed
    secure_cookies: bool = False
    env: Environment = field(init=False)

    def __post_init__(self) -> None:
        self.env = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")),
                               autoescape=select_autoescape(["html"]))
        tz = ZoneInfo(self.cfg["relay"]["timezone"])
        self.env.filters["when"] = lambda ms: _when(ms, tz)
        self.env.filters["minutes"] = lambda ms: "" if ms is None else f"{ms / 60000:.1f}"
        self.env.filters["seconds"] = lambda ms: "" if ms is None else f"{ms / 1000:.0f} s"
        self.env.globals["STATUS_VI"] = STATUS_VI
        self.env.globals["PRIORITY_VI"] = PRIORITY_VI
        self.env.globals["ROLE_VI"] = ROLE_VI
        self.env.globals["TZ"] = self.cfg["relay"]["timezone"]  # live times: the same zone

    @property
    def groups(self) -> dict[str, list[str]]:
        return self.cfg["relay"]["groups"]

    def render(self, req: Req, name: str, code: int = 200, **ctx) -> HTMLResponse:
        html = self.env.get_template(name).render(user=req.user, csrf=req.csrf, path=req.path,
                                                  **ctx)
        return HTMLResponse(html, status_code=code)

    def visible_groups(self, user: User) -> list[str]:
        return [g for g in sorted(self.groups) if user.sees_group(g)]


STATUS_VI = {"playing": "đang phát", "online": "trực tuyến", "offline": "mất kết nối",
             "unknown": "chưa rõ"}
PRIORITY_VI = {"normal": "thường", "priority": "ưu tiên", "emergency": "khẩn cấp"}
ROLE_VI = {"admin": "quản trị", "operator": "vận hành", "viewer": "chỉ xem"}


def _when(ms: Any, tz: ZoneInfo) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return ""
    try:
        return datetime.fromtimestamp(ms / 1000, tz).strftime("%H:%M:%S %d/%m/%Y")
    except (OverflowError, OSError, ValueError):
        return "?"


@dataclass
class Req:
    """What a page gets: the request's parts, read before the page runs."""
    request: Request
    user: User
    csrf: str
    form: Any = None  # starlette FormData on POST

    @property
    def path(self) -> str:
        return self.request.url.path

    @property
    def query(self):
        return self.request.query_params

    @property
    def params(self) -> dict:
        return self.request.path_params

    @property
    def addr(self) -> str:
        return client_addr(self.request)


def client_addr(request: Request) -> str:
    return request.client.host if request.client else "?"


def now_ms() -> int:
    return int(time.time() * 1000)


def current(c: Console, request: Request):
    """(session, user) of the request's cookie, or (None, None)."""
    s = c.sessions.get(request.cookies.get(COOKIE), now_ms())
    if s is None:
        return None, None
    user = c.users.get(s.name)  # read each time: a deleted or changed user takes effect now
    return (s, user) if user is not None else (None, None)


def guard(fn: Callable[[Console, Req], Response], *, stream: bool = False):
    """Wrap a page: login required, CSRF token on anything but GET/HEAD."""
    async def endpoint(request: Request) -> Response:
        c: Console = request.app.state.console
        s, user = await run_in_threadpool(current, c, request)
        if user is None:
            if request.method in ("GET", "HEAD"):
                return RedirectResponse(f"/login?next={urlquote(request.url.path)}", 303)
            await run_in_threadpool(c.audit.record, None, f"{request.method} {request.url.path}",
                                    "refused", detail={"why": "not logged in"},
                                    addr=client_addr(request))
            return PlainTextResponse("Chưa đăng nhập (login required)", 401)
        req = Req(request, user, s.csrf)
        if request.method not in ("GET", "HEAD"):
            too_big = _too_big(c, request)
            if too_big:
                return too_big
            req.form = await request.form(**FORM_LIMITS)
            token = request.headers.get("x-csrf-token") or req.form.get("csrf")
            if not same(token if isinstance(token, str) else None, s.csrf):
                await run_in_threadpool(c.audit.record, user.name,
                                        f"{request.method} {request.url.path}", "refused",
                                        detail={"why": "CSRF token missing or wrong"},
                                        addr=client_addr(request))
                return PlainTextResponse("Thiếu hoặc sai mã CSRF (CSRF token missing or"
                                         " wrong)", 403)
        if stream:
            return await fn(c, req)
        t0 = time.perf_counter()
        resp = await run_in_threadpool(fn, c, req)
        resp.headers["server-timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.1f}"
        return resp
    return endpoint


def _too_big(c: Console, request: Request) -> Response | None:
    limit = 4 * int(c.media.max_bytes) + 1024 * 1024
    try:
        length = int(request.headers.get("content-length", "0"))
    except ValueError:
        return PlainTextResponse("bad Content-Length", 400)
    if length > limit:
        return PlainTextResponse(f"Quá lớn: tối đa {limit} byte", 413)
    return None


class SecurityHeaders:
    """Headers on every response: no framing, no sniffing, a strict content policy (scripts
    and styles from this site only: no inline script)."""

    HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"same-origin"),
               (b"content-security-policy", b"default-src 'self'; img-src 'self' data:;"
                b" style-src 'self'; script-src 'self'; frame-ancestors 'none'")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)
