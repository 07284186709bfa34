"""A local SMTP sink for the demo and for trying nurture out: it keeps every message as .eml.

It is a real SMTP server (aiosmtpd) on 127.0.0.1, so the demo exercises the same transport
code as production.
"""

from __future__ import annotations

import email
import email.policy
import re
import threading
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

_SAFE = re.compile(r"[^A-Za-z0-9._@-]+")


class _Handler:
    def __init__(self, sink: OutboxSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sink.accept(envelope.original_content or b"")
        return "250 Message accepted for delivery"


class OutboxSink:
    """An SMTP server that writes each message to ``folder/<message-id>.eml``."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = folder
        self.host = host
        self.port = port
        self.count = 0
        self.lock = threading.Lock()
        self.recent: dict[str, str] = {}  # Message-ID -> HTML body, for the demo's simulator
        self._controller: Controller | None = None

    def accept(self, raw: bytes) -> None:
        """Store one message (called from the server thread)."""
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        mid = str(msg.get("Message-ID", "")).strip("<>") or f"msg-{self.count}"
        (self.folder / f"{_SAFE.sub('_', mid)}.eml").write_bytes(raw)
        body = msg.get_body(preferencelist=("html",))
        html = body.get_content() if body is not None else ""
        with self.lock:
            self.count += 1
            self.recent[f"<{mid}>"] = html

    def take_recent(self) -> dict[str, str]:
        """The HTML of messages received since the last call, by Message-ID."""
        with self.lock:
            recent, self.recent = self.recent, {}
        return recent

    def start(self) -> OutboxSink:
        """Listen (on a free port when ``port`` is 0)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.port:
            import socket

            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = int(s.getsockname()[1])
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._controller is not None:
            self._controller.stop()

    @property
    def url(self) -> str:
        """The ``smtp://`` URL to send to."""
        return f"smtp://{self.host}:{self.port}"
