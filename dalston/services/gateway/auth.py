"""API keys at the gateway's door: a guard on every route.

Keys are demanded whenever the gateway listens beyond loopback, or with DALSTON_REQUIRE_AUTH=true;
a gateway on loopback alone is one user's, as Ollama's is. A key comes as `Authorization: Bearer
<key>` (OpenAI clients) or `xi-api-key: <key>` (ElevenLabs clients); a browser, which cannot set
headers on a WebSocket, offers it as the subprotocol `openai-insecure-api-key.<key>` as OpenAI's
browser clients do. Routes marked `opt={"open": True}` (health checks, the web page's files)
stay open; routes marked `opt={"admin": True}` need an admin key. Keys are never logged.

A job belongs to the key that submitted it: a user key sees only its own jobs, an admin key all.
"""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler

from dalston.config import LOOPBACK_HOSTS, Settings
from dalston.keys import ApiKey, KeyStore

KEY_SUBPROTOCOL = "openai-insecure-api-key."
KEY_STATE = "api_key"  # where the guard leaves the verified key's record for the handlers


class AuthError(HTTPException):
    """401 or 403 with an OpenAI error code (the app renders it in OpenAI's error shape)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def auth_required(settings: Settings) -> bool:
    return settings.require_auth or settings.http_host not in LOOPBACK_HOSTS


def presented_key(connection: ASGIConnection) -> str | None:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if connection.scope["type"] == "websocket":
        for protocol in connection.headers.get("sec-websocket-protocol", "").split(","):
            key = protocol.strip().removeprefix(KEY_SUBPROTOCOL)
            if key and key != protocol.strip():
                return key
    return connection.headers.get("xi-api-key", "").strip() or None


async def _keys(connection: ASGIConnection) -> KeyStore:
    # Opened on first use: the NATS connection comes up in the app's lifespan.
    state = connection.app.state
    if "api_keys" not in state:
        state.api_keys = await KeyStore.open(state.bus)
    return state.api_keys


async def require_key(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Litestar guard: lets the request through, or raises 401 or 403."""
    settings: Settings = connection.app.state.settings
    if not auth_required(settings) or handler.opt.get("open"):
        return
    key = presented_key(connection)
    if key is None:
        raise AuthError(401, "an API key is required: send `Authorization: Bearer <key>` "
                             "or `xi-api-key: <key>` (create one with `dalston keys create`)",
                        "missing_api_key")
    record: ApiKey | None = await (await _keys(connection)).verify(key)
    if record is None:
        raise AuthError(401, "the API key is not valid", "invalid_api_key")
    if handler.opt.get("admin") and record.role != "admin":
        raise AuthError(403, f"this needs an admin key; key {record.name!r} is a {record.role} key",
                        "admin_required")
    connection.state[KEY_STATE] = record


def verified_key(connection: ASGIConnection) -> ApiKey | None:
    """The key the guard let this request in with; None where the gateway demands no keys."""
    return connection.state.get(KEY_STATE)


def job_owner(connection: ASGIConnection) -> str | None:
    """Whom the jobs this request submits belong to: its key's name (None where no key is demanded).

    The name rather than the digest: names are unique among live keys and readable in a job's
    record, and a key rotated under the same name (revoked, created again) keeps its jobs. The
    price: a name revoked and then given to someone else gives them the old jobs too."""
    key = verified_key(connection)
    return key.name if key else None


def visible_owner(connection: ASGIConnection) -> str | None:
    """Whose jobs this request may see: a user key's own; everyone's (None) for an admin key,
    and for anyone where no key is demanded."""
    key = verified_key(connection)
    return key.name if key and key.role != "admin" else None


async def still_valid(connection: ASGIConnection) -> bool:
    """Whether the key a long-lived connection (a realtime WebSocket) came in with is still
    valid: a revoked key's sessions end."""
    if verified_key(connection) is None:
        return True  # no key was demanded
    key = presented_key(connection)
    return key is not None and await (await _keys(connection)).verify(key) is not None
