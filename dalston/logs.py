"""Structured logging: `event key=value` lines (or JSON), quiet unless asked."""

from __future__ import annotations

import json
import logging
import sys
import time


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        if self.as_json:
            doc = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                   "logger": record.name, "event": record.getMessage(), **fields}
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc, default=str)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        pairs = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        line = f"{stamp} {record.levelname[0]} {record.name}: {record.getMessage()} {pairs}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class Logger(logging.LoggerAdapter):
    """`log.info("task done", task=id, seconds=1.2)`: keyword arguments become fields."""

    def process(self, msg, kwargs):
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("exc_info", "stack_info", "stacklevel")}
        kwargs["extra"] = {"fields": extra}
        return msg, kwargs


def get_logger(name: str) -> Logger:
    return Logger(logging.getLogger(name), {})


def configure(level: str = "WARNING", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json=fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning whatever our level is.
    for noisy in ("nats", "faster_whisper", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
