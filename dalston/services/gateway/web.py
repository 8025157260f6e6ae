"""The web page at `/`: plain HTML, CSS and JavaScript from `static/`, no build step.

The page talks to the same API as any client (models, jobs, `/v1/realtime`), with the key the
user types into it. The files themselves hold nothing secret, so they are served without a key;
a Content-Security-Policy keeps the page to its own origin: nothing is fetched from elsewhere,
no inline script runs, and no other site may frame it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from litestar import Response, Router, get
from litestar.exceptions import NotFoundException

STATIC = Path(__file__).parent / "static"
# Every file the page is made of, and its media type: nothing else under static/ is served.
ASSETS = {"index.html": "text/html", "style.css": "text/css",
          "app.js": "text/javascript", "microphone.js": "text/javascript"}
# 'self' covers the page's own ws:// and wss:// (CSP level 3), which /v1/realtime needs.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@cache
def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _serve(name: str) -> Response[bytes]:
    if name not in ASSETS:
        raise NotFoundException(f"no file {name[:100]!r} in the web page")
    return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)


@get("/", include_in_schema=False)
async def index() -> Response[bytes]:
    return _serve("index.html")


@get("/web/{name:str}", include_in_schema=False)
async def asset(name: str) -> Response[bytes]:
    return _serve(name)


# Open to anyone who can reach the gateway (the auth guard honours `open`): the page asks for a key.
web_page = Router(path="/", route_handlers=[index, asset], opt={"open": True})
