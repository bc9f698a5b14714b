"""The Starlette application: the pages' routes, each behind :func:`ctl.console.app.guard`
except ``PUBLIC`` ones (``/healthz``, the login form, static files, ``/media/``)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ctl.console import pages_admin, pages_docs, pages_fleet, pages_send
from ctl.console.app import HERE, Console, SecurityHeaders, guard


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def make_app(console: Console) -> Starlette:
    routes: list = [Route("/healthz", healthz), *pages_admin.public_routes(),
                    Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")),
                          name="static"),
                    *pages_send.public_routes()]
    for module in (pages_fleet, pages_send, pages_docs, pages_admin):
        for path, fn, methods, opts in module.ROUTES:
            routes.append(Route(path, guard(fn, **opts), methods=methods))
    app = Starlette(routes=routes)
    app.state.console = console
    app.add_middleware(SecurityHeaders)
    return app
