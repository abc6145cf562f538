"""The web UI (issue 12): server-rendered pages at ``/`` over the REST API, a few small
scripts, one stylesheet. ``mount(app)`` adds it to the API's app; docs/ui.md says why this
stack."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from flowsession.web.auth import CookieAuth, CsrfKeys


def mount(app: FastAPI) -> None:
    from flowsession.web import pages

    keys = CsrfKeys()
    app.state.ui_csrf = keys
    app.add_middleware(CookieAuth, keys=keys)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")),
              name="static")
    app.include_router(pages.router)

    @app.exception_handler(pages.SignIn)
    async def _signin(request: Request, exc: pages.SignIn):
        return pages.to_signin(request)

    @app.exception_handler(pages.ApiError)
    async def _api_error(request: Request, exc: pages.ApiError):
        return pages.error_page(request, exc)
