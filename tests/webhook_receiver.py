"""A receiver for tests (of webhooks, and of the services' OTLP traces): an HTTP server on
loopback that answers as it is told and keeps every request it got."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Delivery:
    status: int  # what the receiver answered
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP server on loopback that answers `answers` in turn (then 200) and keeps every
    request it got."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers)
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.deliveries.append(Delivery(status, dict(self.headers), body))
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hooks/dalston?source=test"

    def accepted(self) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
