"""Wyoming events read off a socket, with every length bounded.

An event is a JSON header line (`type`, and `data`, `data_length`, `payload_length`), then
`data_length` bytes of JSON merged into `data`, then `payload_length` bytes of payload. The
`wyoming` package's own reader trusts every length and waits forever; this one bounds the
header, the data and the payload (an audio chunk: at most 1 MiB), and how long any of them
may take to arrive, so a client that lies about a length is cut off."""

from __future__ import annotations

import asyncio
import json

from wyoming.event import Event

# The header line; the reader is opened with this limit (asyncio.start_server(limit=...)).
MAX_HEADER_BYTES = 64 * 1024
MAX_DATA_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_TYPE_CHARS = 64


class BadFrame(Exception):
    """Bytes that are not a Wyoming event within the bounds: the connection cannot go on."""


def _length(header: dict, name: str, limit: int) -> int:
    value = header.get(name)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise BadFrame(f"{name} must be a whole number of bytes")
    if value > limit:
        raise BadFrame(f"{name} {value} is over the limit of {limit} bytes")
    return value


def _json(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise BadFrame(f"the event's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise BadFrame(f"the event's {what} must be a JSON object")
    return value


async def read_event(reader: asyncio.StreamReader, timeout: float) -> Event | None:
    """The next event; None when the client has closed the connection (between events or in
    the middle of one). BadFrame for bytes that break the protocol or its bounds, TimeoutError
    when a part of the event does not arrive within `timeout` seconds."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except ValueError:  # the line passed the reader's limit
        raise BadFrame(f"the event's header is longer than {MAX_HEADER_BYTES} bytes") from None
    if not line.endswith(b"\n"):
        return None
    header = _json(line, "header")
    kind = header.get("type")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_TYPE_CHARS:
        raise BadFrame(f"the event's type must be a string of 1 to {MAX_TYPE_CHARS} characters")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise BadFrame("the event's data must be a JSON object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    try:
        if data_length:
            data = {**data, **_json(await asyncio.wait_for(reader.readexactly(data_length), timeout), "data")}
        payload = await asyncio.wait_for(reader.readexactly(payload_length), timeout) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=kind, data=data, payload=payload)
