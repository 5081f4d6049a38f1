"""`llmtune ui`: the FastAPI app - the guard, the page, and the routers (llmtune/ui/routes_*.py).

One page (static/index.html + app.js + style.css, shipped in the package: no build step, nothing from a CDN) talks
to a JSON API under /api/. Live runs reach the page as server-sent events, so curves grow point by point.

Security: localhost unless told otherwise; another address needs an API key (or --insecure, said loudly). With a
key, every route but the login page wants it - as `Authorization: Bearer KEY`, or as the session cookie the login
page sets (a random token, never the key itself); both are compared in constant time and neither is logged.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from llmtune.errors import LlmtuneError
from llmtune.ship.serve import LOCAL_HOSTS
from llmtune.ship.serve_routes import bearer_matches, same_secret
from llmtune.ui.settings import UiSettings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "charts.js": "text/javascript", "run.js": "text/javascript",
              "new.js": "text/javascript", "style.css": "text/css"}
COOKIE = "llmtune_ui_session"
ACTION_HEADER = "X-Llmtune"


def make_app(settings: UiSettings) -> FastAPI:
    from llmtune.ui.routes_new import new_run_router, recipe_tools_router
    from llmtune.ui.routes_runs import runs_router
    from llmtune.ui.routes_use import use_router

    app = FastAPI(title="llmtune", docs_url=None, redoc_url=None, openapi_url=None)
    sessions: set[str] = set()
    _add_guard(app, settings, sessions)
    _add_error_handlers(app)
    _add_pages(app, settings.api_key, sessions)
    app.state.routers = [runs_router(settings), new_run_router(settings), recipe_tools_router(settings),
                         use_router(settings)]
    for router in app.state.routers:
        app.include_router(router)
    return app


def _refusal(request: Request, settings: UiSettings, sessions: set[str]) -> Response | None:
    """Why this request may not go on, as the response to send; None when it may.

    - Host: a page of another site that resolves its own name to 127.0.0.1 (DNS rebinding) sends its own name;
      a UI listening on this machine only answers to this machine's names.
    - Actions (anything but GET) carry the X-Llmtune header the page's script sends: a form on another site cannot
      set a header, and a script there cannot without a CORS preflight, which this app never grants.
    - The key, when there is one: the bearer header or the login's session cookie, compared in constant time."""
    host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
    if settings.local_only and host not in LOCAL_HOSTS:
        return JSONResponse({"error": f"This UI answers to localhost only, not to '{host[:80]}'."}, status_code=403)
    if request.method != "GET" and request.url.path != "/login" and request.headers.get(ACTION_HEADER) != "1":
        return JSONResponse({"error": f"Actions need the {ACTION_HEADER}: 1 header (the page sends it)."}, status_code=403)
    if settings.api_key is None or request.url.path == "/login":
        return None
    cookie = request.cookies.get(COOKIE, "")
    known = any([same_secret(cookie, token) for token in sessions])  # a list: compared with every token
    if bearer_matches(request, settings.api_key) or known:
        return None
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": "Missing or wrong API key: log in at /login, or send the header "
                                      "'Authorization: Bearer <key>'."}, status_code=401)
    return RedirectResponse("/login", status_code=303)


def _add_guard(app: FastAPI, settings: UiSettings, sessions: set[str]) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Any:
        return _refusal(request, settings, sessions) or await call_next(request)


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as JSON {"error": ...}: llmtune's own errors (400), the model queue's (its status), the rest
    (500, logged with its traceback; the page shows what failed)."""
    from llmtune.ship.serve_requests import ApiError

    @app.exception_handler(LlmtuneError)
    async def llmtune_error(request: Request, error: LlmtuneError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(ApiError)
    async def queue_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse({"error": f"{request.method} {request.url.path} failed ({type(error).__name__}: "
                                      f"{str(error)[:300]}); the UI's log has the details."}, status_code=500)


def _add_pages(app: FastAPI, api_key: str | None, sessions: set[str]) -> None:
    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in PAGE_FILES:  # a fixed list: no path from the browser reaches the disk
            return JSONResponse({"error": f"No file '{name}'."}, status_code=404)
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers={"Cache-Control": "no-store"})

    @app.get("/login")
    async def login_page() -> HTMLResponse:
        return HTMLResponse(_login_html("" if api_key else "This UI needs no key."))

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("key") or [""])[0]
        if api_key is None or not same_secret(given, api_key):
            return HTMLResponse(_login_html("Wrong key."), status_code=401)
        token = secrets.token_urlsafe(32)
        sessions.add(token)
        wanted = (form.get("next") or [""])[0]
        response = RedirectResponse("/" + (wanted if re.fullmatch(r"#/[\w./?=,%-]*", wanted) else ""), status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response


def _login_html(message: str) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>llmtune - log in</title>"
            "<style>body{font:16px system-ui,sans-serif;margin:15vh auto;max-width:22em}input{font:inherit;"
            "padding:.4em;width:100%;box-sizing:border-box;margin:.4em 0}</style></head><body><h1>llmtune</h1>"
            f"<p id='message'>{message}</p><form method='post' action='/login'><label>API key "
            "<input id='key' name='key' type='password' autofocus></label><input type='hidden' id='next' name='next'>"
            "<button id='login'>Log in</button></form>"
            # the page asked for (#/run/NAME) is in the address's fragment, which only the page sees
            "<script>document.getElementById('next').value = location.hash</script></body></html>")


def check_host(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless --insecure says so."""
    if host not in LOCAL_HOSTS and api_key is None and not insecure:
        raise LlmtuneError(
            f"--host {host} would let anyone who can reach this machine start and stop trainings and read your runs, "
            "and there is no API key. Set one with --api-key or LLMTUNE_API_KEY, or add --insecure if the network "
            "is yours alone."
        )


def run_ui(settings: UiSettings, host: str, port: int, insecure: bool = False) -> None:
    """Serve the UI until Ctrl-C."""
    import uvicorn

    from llmtune.ship.serve import check_port_free

    check_host(host, settings.api_key, insecure)
    settings.local_only = host in LOCAL_HOSTS
    check_port_free(host, port)
    if host not in LOCAL_HOSTS and settings.api_key is None:
        logger.warning("Listening on %s with no API key (--insecure): anyone who can reach it controls your runs.", host)
    logger.info("llmtune UI on http://%s:%d (runs: %s, recipes: %s)%s", "localhost" if host in LOCAL_HOSTS else host,
                port, settings.runs, settings.recipes, " - log in with your API key" if settings.api_key else "")
    # Open event streams would hold a graceful shutdown forever: give them a few seconds, then close them.
    uvicorn.run(make_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
