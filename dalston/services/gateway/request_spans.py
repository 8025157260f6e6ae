"""A span for each HTTP request the gateway answers, while traces are on (dalston.tracing).

A request that carries a W3C `traceparent` continues its caller's trace; the span is named by
the route's template (`POST /v1/jobs`, `GET /v1/jobs/{job_id:str}`), not its path, so one kind
of request is one name. WebSocket sessions have their own span (realtime_session.py).
"""

from __future__ import annotations

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from dalston import tracing

TRACE_HEADER_NAMES = tuple(name.encode() for name in tracing.TRACE_HEADERS)


def request_spans(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.enabled():
            await app(scope, receive, send)
            return
        carried = {name.decode(): value.decode("latin-1") for name, value in scope["headers"]
                   if name in TRACE_HEADER_NAMES}
        method, route = scope["method"], scope.get("path_template") or scope["path"]
        attributes = {"http.request.method": method, "http.route": route, "url.path": scope["path"]}
        with tracing.continued(carried), tracing.span(f"{method} {route}", kind=tracing.SERVER, **attributes) as span:
            async def send_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    tracing.record_status(span, message["status"])
                await send(message)

            await app(scope, receive, send_status)

    return middleware
