"""The web UI's pages: server-rendered from the REST API's answers (called in-process with the
signed-in user's token, so the API's authorization applies unchanged), plus sign-in/out and
the flow upload form. No domain logic here: what a page shows is what the API returned."""

from __future__ import annotations

import hmac
import io
import secrets
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile

from flowsession.access.accounts import allows
from flowsession.web import graph
from flowsession.web.auth import COOKIE

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)
PAGE = 25  # rows per page of the run list and a run's details
MAX_UPLOAD_FILES = 2000
MAX_FILE_BYTES = 4 * 1024 * 1024


class SignIn(Exception):
    """The token is missing, expired or revoked: to the sign-in page."""


class Api:
    """The REST API, in-process, as the signed-in user."""

    def __init__(self, request: Request, token: str | None = None):
        self.request = request
        self.token = token or request.cookies.get(COOKIE)
        if not self.token:
            raise SignIn()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=request.app), base_url="http://flowsession",
            headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    async def call(self, method: str, path: str, **kw) -> tuple[int, Any]:
        r = await self.client.request(method, "/api" + path, **kw)
        if r.status_code == 401:
            raise SignIn()
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text[:500], "hint": ""}}
        return r.status_code, body

    async def get(self, path: str, default: Any = ...) -> Any:
        """The answer; an error is ``default`` when given, else raised as ApiError."""
        status, body = await self.call("GET", path)
        if status >= 400:
            if default is not ...:
                return default
            raise ApiError(status, body.get("error", {}))
        return body

    async def close(self) -> None:
        await self.client.aclose()


class ApiError(Exception):
    def __init__(self, status: int, error: dict):
        super().__init__(error.get("message", ""))
        self.status, self.error = status, error


def q(text: str) -> str:
    return quote(text, safe="")


templates.env.filters["q"] = q


async def page(request: Request, template: str, api: Api, **ctx) -> HTMLResponse:
    me = ctx.pop("me", None) or await api.get("/me")
    keys = request.app.state.ui_csrf
    scopes = frozenset(me["scopes"])
    return templates.TemplateResponse(request, template, {
        "me": me, "csrf": keys.token_for(api.token),
        "can": lambda scope: allows(scopes, scope), **ctx})


def to_signin(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    resp = RedirectResponse(f"/signin?next={q(target)}", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


def error_page(request: Request, exc: ApiError) -> HTMLResponse:
    return templates.TemplateResponse(request, "error.html", {
        "me": None, "csrf": "", "can": lambda s: False, "status": exc.status,
        "error": exc.error}, status_code=exc.status)


# --- sign-in --------------------------------------------------------------------------------

SIGNIN_COOKIE = "fs_signin"


def signin_page(request: Request, target: str, error: str = "", status: int = 200
                ) -> HTMLResponse:
    """The sign-in form, with a fresh token in a cookie and in the form: a sign-in posted
    from another site (login CSRF) has no cookie to match."""
    nonce = secrets.token_urlsafe(24)
    resp = templates.TemplateResponse(request, "signin.html", {
        "me": None, "csrf": "", "can": lambda s: False, "next": target, "error": error,
        "nonce": nonce}, status_code=status)
    resp.set_cookie(SIGNIN_COOKIE, nonce, httponly=True, samesite="strict", path="/signin",
                    secure=request.url.scheme == "https")
    return resp


@router.get("/signin")
async def signin_form(request: Request, next: str = "/flows") -> HTMLResponse:
    return signin_page(request, _local(next))


def _local(target: str) -> str:
    """Only a path of this server (never another site) to go to after signing in."""
    ok = target.startswith("/") and not target.startswith("//") and "\\" not in target \
        and not any(ord(ch) < 32 for ch in target)
    return target if ok else "/flows"


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await request.form()
    token, target = str(form.get("token", "")).strip(), _local(str(form.get("next", "/flows")))
    nonce = request.cookies.get(SIGNIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(nonce, str(form.get("nonce", ""))):
        return signin_page(request, target, "the sign-in form was stale or sent from another "
                           "page: sign in again", 403)
    try:
        api = Api(request, token=token or None)
        await api.get("/me")
    except (SignIn, ApiError):
        return signin_page(request, target, "that token is not valid (wrong, expired or "
                           "revoked)", 401)
    resp = RedirectResponse(target, status_code=303)
    resp.delete_cookie(SIGNIN_COOKIE, path="/signin")
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/",
                    secure=request.url.scheme == "https")
    return resp


@router.post("/signout")
async def signout(request: Request) -> Response:
    form = await request.form()
    token = request.cookies.get(COOKIE)
    if token and not request.app.state.ui_csrf.valid(token, str(form.get("csrf", ""))):
        return Response("the page's CSRF token is missing or stale: reload it", status_code=403)
    resp = RedirectResponse("/signin", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


# --- pages ----------------------------------------------------------------------------------

@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/flows", status_code=303)


@router.get("/flows")
async def flows(request: Request) -> HTMLResponse:
    api = Api(request)
    return await page(request, "flows.html", api, flows=await api.get("/flows"), error=None)


@router.post("/flows/upload")
async def upload(request: Request) -> Response:
    """A flow folder (its files, with their relative paths) or a zip of it, as the API's
    ``POST /api/flows`` ``files``."""
    api = Api(request)
    form = await request.form()
    if not request.app.state.ui_csrf.valid(api.token, str(form.get("csrf", ""))):
        return Response("the page's CSRF token is missing or stale: reload it", status_code=403)
    name = str(form.get("name", "")).strip()
    error, files = None, {}
    try:
        files = await _uploaded_files(form.getlist("files"),
                                      request.app.state.services.settings.max_body)
    except ValueError as exc:
        error = {"message": str(exc), "hint": "upload a flow folder or a .zip of it"}
    if error is None:
        status, body = await api.call("POST", "/flows", json={"name": name, "files": files})
        if status < 400:
            return RedirectResponse(f"/flows/{q(body['name'])}", status_code=303)
        error = body.get("error", {})
    resp = await page(request, "flows.html", api, flows=await api.get("/flows"), error=error)
    resp.status_code = 422
    return resp


async def _uploaded_files(items: list, limit: int) -> dict[str, str]:
    """The files' text by relative path; at most ``limit`` bytes in all (the server's body
    limit: the API would refuse more), whatever a zip claims."""
    files: dict[str, str] = {}
    total = 0
    for item in items:
        if not isinstance(item, UploadFile) or not item.filename:
            continue
        data = await item.read(MAX_FILE_BYTES * 8 + 1)
        if item.filename.lower().endswith(".zip"):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    for info in z.infolist()[:MAX_UPLOAD_FILES]:
                        if info.is_dir():
                            continue
                        total += info.file_size
                        if info.file_size > MAX_FILE_BYTES or total > limit:
                            raise ValueError(f"{item.filename}: {info.filename} makes the "
                                             f"flow larger than {limit // 2**20} MB unpacked")
                        with z.open(info) as fh:  # never more than it claimed
                            data_ = fh.read(info.file_size + 1)[:info.file_size]
                        files[info.filename] = data_.decode("utf-8", "replace")
            except zipfile.BadZipFile:
                raise ValueError(f"{item.filename} is not a zip file") from None
        else:
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"{item.filename} is larger than 4 MB")
            total += len(data)
            if total > limit:
                raise ValueError(f"the flow is larger than {limit // 2**20} MB")
            files[item.filename] = data.decode("utf-8", "replace")
        if len(files) > MAX_UPLOAD_FILES:
            raise ValueError(f"more than {MAX_UPLOAD_FILES} files")
    if not files:
        raise ValueError("no files were uploaded")
    return _strip_common_folder(files)


def _strip_common_folder(files: dict[str, str]) -> dict[str, str]:
    """``myflow/flow.dag.yaml`` -> ``flow.dag.yaml`` when every file is in one folder (a
    chosen folder, or a zip of one)."""
    parts = [PurePosixPath(p).parts for p in files]
    if all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
        return {str(PurePosixPath(*p[1:])): text for p, text in zip(parts, files.values())}
    return files


@router.get("/flows/{name}")
async def flow_page(request: Request, name: str) -> HTMLResponse:
    api = Api(request)
    flow = await api.get(f"/flows/{q(name)}")
    flow_file = next((f for f in ("flow.dag.yaml", "flow.flex.yaml") if f in flow["files"]),
                     None)
    text = (await api.get(f"/flows/{q(name)}/files/{flow_file}", {})).get("content", "") \
        if flow_file else ""
    g = graph.build(text, flex=flow_file == "flow.flex.yaml")
    # its active session, if any (asking /flows/{name}/session would be a 404 without one)
    session = next((s for s in await api.get("/sessions", [])
                    if s.get("flow") == flow["path"] and s.get("owner") == flow["owner"]), None)
    runs = [r for r in await api.get("/runs?max_results=200", [])
            if r.get("flow") == flow.get("path")][:20]
    return await page(request, "flow.html", api, flow=flow, name=name, graph=g,
                      graph_consts=graph, session=session, runs=runs,
                      flow_file=flow_file, requirements=_requirements_file(flow["files"]))


def _requirements_file(files: list[str]) -> str | None:
    return next((f for f in files if f.endswith("requirements.txt")), None)


@router.get("/runs")
async def runs(request: Request, page_no: int = 1) -> HTMLResponse:
    api = Api(request)
    page_no = max(1, page_no)
    rows = await api.get(f"/runs?max_results={PAGE + 1}&offset={(page_no - 1) * PAGE}")
    return await page(request, "runs.html", api, runs=rows[:PAGE], page_no=page_no,
                      more=len(rows) > PAGE)


@router.get("/runs/{name}")
async def run_page(request: Request, name: str) -> HTMLResponse:
    api = Api(request)
    run = await api.get(f"/runs/{q(name)}")
    return await page(request, "run.html", api, run=run, page_size=PAGE)


@router.get("/compare")
async def compare(request: Request) -> HTMLResponse:
    api = Api(request)
    names = [n for n in request.query_params.getlist("run") if n][:6]
    runs, details, metrics = [], [], []
    for n in names:
        runs.append(await api.get(f"/runs/{q(n)}"))
        details.append(await api.get(f"/runs/{q(n)}/details", []))
        metrics.append(await api.get(f"/runs/{q(n)}/metrics", {}))
    lines = max((len(d) for d in details), default=0)
    rows = [[d[i] if i < len(d) else None for d in details] for i in range(lines)]
    metric_names = sorted({k for m in metrics for k in m})
    return await page(request, "compare.html", api, runs=runs, rows=rows, metrics=metrics,
                      metric_names=metric_names,
                      all_runs=await api.get("/runs?max_results=200", []))


@router.get("/computes")
async def computes(request: Request) -> HTMLResponse:
    api = Api(request)
    return await page(request, "computes.html", api, computes=await api.get("/computes", []),
                      sizes=await api.get("/computes/sizes", {}),
                      sessions=await api.get("/sessions", []))


@router.get("/admin")
async def admin(request: Request) -> HTMLResponse:
    api = Api(request)
    me = await api.get("/me")
    if not allows(frozenset(me["scopes"]), "users:read"):
        raise ApiError(403, {"message": "the admin page is for Owners",
                             "hint": "ask an Owner for a role with users:read"})
    return await page(request, "admin.html", api, me=me, users=await api.get("/users", []),
                      tokens=await api.get("/tokens", []), roles=await api.get("/roles", []),
                      identities=await api.get("/identities", []),
                      connections=await api.get("/connections", []),
                      audit=(await api.get("/audit", []))[:100])
