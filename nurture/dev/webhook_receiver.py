"""A local webhook receiver for development, the demo and tests: keeps every JSON body.

Stands in for a Slack or Microsoft Teams incoming webhook on 127.0.0.1. ``fail_next``
makes it answer the next requests with an error status, to exercise retries.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["WebhookSink"]

MAX_BODY = 1_000_000


class WebhookSink:
    """A threaded HTTP server that records POSTed JSON bodies by path."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.received: list[tuple[str, Any]] = []
        self._failures: list[int] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(length, MAX_BODY))
                with sink._lock:
                    status = sink._failures.pop(0) if sink._failures else 200
                    if status == 200:
                        try:
                            sink.received.append((self.path, json.loads(raw or b"null")))
                        except ValueError:
                            status = 400
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: the demo prints its own summary

        self.server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WebhookSink:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234``."""
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail_next(self, *statuses: int) -> None:
        """Answer the next requests with these statuses (and keep nothing)."""
        with self._lock:
            self._failures.extend(statuses)

    @property
    def count(self) -> int:
        """How many bodies arrived."""
        with self._lock:
            return len(self.received)
