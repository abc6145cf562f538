"""The FastAPI application: ``create_app(settings)``; ``flowsession server`` serves it.

Every route needs a token (``Authorization: Bearer fs_...``). Errors are one JSON shape,
``{"error": {"code", "message", "hint", ...}}``, with the status of the error's class, told as
the caller may see it (``api/public.py``). A request passes ``RequestGuard`` first (a bounded
body, a URL without NUL bytes). Every change and every refusal or failure (any 4xx or 5xx, the
guard's included) goes to the audit log. The server also runs the reconciler and the idle
culler (``Sweeper.sweep``) and moves runs along (``RunService.advance_all``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowsession import __version__
from flowsession.access.accounts import OWNER
from flowsession.api.context import Services, audit
from flowsession.api.guard import BodyTooLarge, RequestGuard
from flowsession.api.operations import Operations
from flowsession.api.public import PublicErrors
from flowsession.config import Settings
from flowsession.errors import FlowSessionError
from flowsession.flows.registry import FlowRegistry

log = logging.getLogger("flowsession.server")
SWEEP_EVERY_S = 10.0
RUNS_EVERY_S = 1.0


def bootstrap_admin(svc: Services, token_file: Path | None) -> str | None:
    """On a server with no users: the first user (the one running it) as Owner, with a token
    written to ``token_file`` (mode 0600). Returns the token when one was made."""
    accounts = svc.accounts
    accounts.ensure_builtin_roles()
    if accounts.list_users():
        return None
    user = svc.settings.user
    accounts.create_user(user, display_name="administrator")
    accounts.assign(user, OWNER, by="bootstrap")
    token, _ = accounts.issue_token(user, label="bootstrap")
    if token_file is not None:
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.touch(mode=0o600)
        token_file.chmod(0o600)
        token_file.write_text(token + "\n")
    return token


def create_app(settings: Settings | None = None, *, background: bool = True,
               keep_sessions: bool = False,
               on_stopped: Callable[[dict], None] | None = None) -> FastAPI:
    """The app. Its orderly stop stops the sessions (``keep_sessions``: leaves them to the
    next server, as a crash does) and tells ``on_stopped`` what it stopped (``_stop_sessions``).
    """
    settings = settings or Settings.from_env()
    svc = Services.open(settings)
    svc.accounts.ensure_builtin_roles()
    svc.extra["flows"] = FlowRegistry(settings, svc.store)
    ops = Operations(svc.store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        recovered = ops.recover({"run": lambda name: _follow_run(svc, name)})
        if recovered:
            log.warning("%d operation(s) of a previous server marked failed", recovered)
        tasks = [asyncio.create_task(_loop(svc))] if background else []
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            if tasks:  # a sweep or a run's step cut short cleans up before sessions stop
                await asyncio.wait(tasks, timeout=10)
            await ops.shutdown()
            if not keep_sessions:
                stopped = await _stop_sessions(svc)
                if stopped is not None and on_stopped is not None:
                    try:
                        on_stopped(stopped)
                    except Exception:  # noqa: BLE001 - the stop goes on; the log says why
                        log.exception("telling what the server stopped")
            await _drain_standbys(app, svc)

    app = FastAPI(title="flowsession", version=__version__, lifespan=lifespan,
                  description="Self-hosted compute sessions for prompt flow.")
    app.state.services = svc
    app.state.operations = ops
    app.state.public = public = PublicErrors(settings)

    @app.exception_handler(FlowSessionError)
    async def _flowsession_error(request: Request, exc: FlowSessionError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        request.state.error_code = exc.code
        error = public.for_caller(exc.to_dict(), getattr(request.state, "principal", None))
        return JSONResponse({"error": error}, status_code=exc.status, headers=headers)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        request.state.error_code = exc.error.code
        return JSONResponse({"error": exc.error.to_dict()}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"field '{where}': {first.get('msg')}"
        if first.get("type") == "json_invalid":
            where, message = "body", f"the request body is not valid JSON: {first.get('msg')}"
        request.state.error_code = "invalid_input"
        return JSONResponse({"error": {
            "code": "invalid_input", "message": message,
            "hint": "fix the request (see /docs)", "field": where,
            "errors": [{"field": ".".join(str(p) for p in e.get("loc", ())),
                        "message": e.get("msg")} for e in errors]}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        request.state.error_code = code
        return JSONResponse({"error": {"code": code, "message": str(exc.detail), "hint": ""}},
                            status_code=exc.status_code)

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        """A value the database refuses (PostgreSQL: a NUL byte in text, text over a column's
        length) is the caller's 422, as on SQLite, never a 500."""
        log.warning("the database refused a value on %s %s: %s", request.method,
                    request.url.path, str(exc.orig or exc).splitlines()[0][:300])
        request.state.error_code = "invalid_input"
        return JSONResponse({"error": {
            "code": "invalid_input",
            "message": "the request holds a value the database cannot store: a NUL byte or "
                       "another control character, or text longer than the field allows",
            "hint": "remove control characters and shorten names and descriptions"}},
            status_code=422)

    @app.exception_handler(UnicodeEncodeError)
    async def _not_unicode(request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        """Text with a lone surrogate (JSON's "\\ud800") cannot be a name, a path or a
        database value: the caller's 422, never a 500."""
        log.warning("text that is not Unicode on %s %s: %s", request.method,
                    request.url.path, exc)
        request.state.error_code = "invalid_input"
        return JSONResponse({"error": {
            "code": "invalid_input",
            "message": "the request holds text that is not valid Unicode (a lone surrogate, "
                       "such as \\ud800)",
            "hint": "send text as UTF-8, without unpaired surrogate escapes"}}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected failure on %s %s", request.method, request.url.path,
                  exc_info=exc)
        return JSONResponse({"error": {"code": "error", "message": "unexpected failure",
                                       "hint": "the server log has the details"}},
                            status_code=500)

    # inside the audit (added after it is declared, a middleware would wrap it)
    app.add_middleware(RequestGuard, max_body=settings.max_body)

    @app.middleware("http")
    async def _audit(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception:  # answered 500 by the server's outermost handler: said here too
            _record(request, 500)
            raise
        if request.method != "GET" or response.status_code >= 400:
            _record(request, response.status_code)
        return response

    def _record(request: Request, status: int) -> None:
        """One audit entry: who, which route and resource, the status and the result (the
        error's code, when there was one, as the detail)."""
        who = getattr(request.state, "principal", None)
        if who is None:  # refused before authentication ran (a malformed body, say)
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                who = svc.accounts.authenticate(token.strip())
        route = getattr(request.scope.get("route"), "path", request.url.path)
        if not route.startswith("/api"):
            route = "/api" + route
        result = ("ok" if status < 400 else "denied" if status in (401, 403)
                  else "not_found" if status == 404 else f"error {status}")
        try:
            audit(svc, actor=who.user if who else "anonymous",
                  action=_printable(f"{request.method} {route}"),
                  resource=_printable(request.url.path), status=status, result=result,
                  detail=str(request.scope.get("state", {}).get("error_code", "")))
        except Exception:  # noqa: BLE001 - the audit must never turn a success into a 500
            log.exception("audit write failed")

    from flowsession.api.routers import (
        access,
        computes,
        connections,
        environments,
        flows,
        identities,
        images,
        operations,
        runs,
        sessions,
    )

    for module in (flows, sessions, runs, computes, access, operations, images, environments,
                   connections, identities):
        app.include_router(module.router, prefix="/api")

    from flowsession.api.openapi import documented_schema

    app.openapi = lambda: documented_schema(app)  # error answers and event streams told

    @app.get("/api/health", tags=["server"])
    async def health() -> dict:
        """Unauthenticated: is the server up."""
        return {"ok": True, "version": __version__}

    from flowsession import web

    web.mount(app)  # the web UI at /, over this API
    return app


async def _stop_sessions(svc: Services) -> dict | None:
    """An orderly stop leaves no session running (``sessions/shutdown.py``); a run in flight
    goes on when a server starts again (a run outlives its session), and its log says so.
    ``{"sessions": [ids stopped], "runs": [names in flight]}``; None if it failed."""
    from flowsession.runs.model import ACTIVE
    from flowsession.sessions.shutdown import stop_all

    try:
        stopped = await stop_all(svc.sessions)
        runs = [r.name for r in svc.runs.records.list(owner=None, statuses=ACTIVE)]
    except Exception:  # noqa: BLE001 - never stops the shutdown; the next server sweeps
        log.exception("stopping the sessions with the server")
        return None
    for name in runs:
        svc.runs.files(name).log("the server was stopped, and the sessions with it: the run "
                                 "goes on when a server starts again (flowsession run cancel "
                                 f"{name} ends it)")
    if stopped or runs:
        log.warning("stopped %d session(s) with the server; %d run(s) in flight go on when a "
                    "server starts again", len(stopped), len(runs))
    return {"sessions": [s.id for s in stopped], "runs": runs}


async def _drain_standbys(app: FastAPI, svc: Services) -> None:
    """A stopping server stops its warm standby supervisors (a standby is this server's
    optimisation, and would idle for an hour), after its sessions (unless it keeps them)."""
    fill = getattr(app.state, "pool_fill", None)
    if fill is not None and not fill.done():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(fill), 60)
    try:
        drained = await svc.sessions.pool.drain()
    except Exception:  # noqa: BLE001 - never stops the shutdown; each ends itself when idle
        log.exception("stopping the standby pool")
        return
    if drained:
        log.info("stopped %d standby supervisor(s)", drained)


def _printable(text: str, limit: int = 500) -> str:
    """``text`` for the audit log: control characters (a NUL a database cannot store) escaped,
    and cut to ``limit`` characters."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                  for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _follow_run(svc: Services, name: str):
    """A run's operation, picked up again by a new server: the run went on in its session."""
    async def work(emit) -> dict:
        emit({"event": "progress", "message": "the server restarted: following the run again"})
        owner = svc.runs.records.get(name).owner
        return (await svc.runs.wait(name, user=owner)).to_dict()

    return work


async def _loop(svc: Services) -> None:
    """The reconciler and idle culler every SWEEP_EVERY_S; runs moved along every second."""
    last_sweep = 0.0
    loop = asyncio.get_running_loop()
    while True:
        try:
            if loop.time() - last_sweep >= SWEEP_EVERY_S:
                last_sweep = loop.time()
                await svc.sessions.sweeper.sweep()
            await svc.runs.advance_all()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the loop must go on; the log says what broke
            log.exception("background sweep failed")
        await asyncio.sleep(RUNS_EVERY_S)
