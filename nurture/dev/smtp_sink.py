"""A local SMTP sink for the demo and for trying nurture out: it keeps every message as .eml.

It is a real SMTP server (aiosmtpd) on 127.0.0.1, in a process of its own so that it does
not compete with the sender for the interpreter, and the demo exercises the same transport
code as production. Whatever reads the mail reads the ``.eml`` files it writes.
"""

from __future__ import annotations

import binascii
import email
import multiprocessing
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9._@-]+")
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)


def decoded_text(raw: bytes) -> str:
    """The message's text as a reader sees it, cheaply: quoted-printable undone on the whole
    message (links and all); a base64 body falls back to the parser."""
    if b"Content-Transfer-Encoding: base64" in raw:
        return html_part(raw)
    return binascii.a2b_qp(raw).decode("utf-8", "replace")


def html_part(raw: bytes) -> str:
    """The decoded text/html part of a message ('' when it has none)."""
    msg = email.message_from_bytes(raw)  # compat32: several times faster than policy.default
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
    return ""


class _Handler:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or b""
        match = _MESSAGE_ID.search(raw)
        self.count += 1
        name = match.group(1).decode("ascii", "replace") if match else f"msg-{self.count}"
        # Write then rename, so a reader never sees half a message.
        tmp = self.folder / f".{_SAFE.sub('_', name)}.tmp"
        tmp.write_bytes(raw)
        tmp.rename(self.folder / f"{_SAFE.sub('_', name)}.eml")
        return "250 Message accepted for delivery"


def _serve(folder: str, host: str, port: int) -> None:
    """Entry point of the sink's process."""
    from aiosmtpd.controller import Controller

    controller = Controller(_Handler(Path(folder)), hostname=host, port=port)
    controller.start()
    threading.Event().wait()  # until terminated


class OutboxSink:
    """An SMTP server process that writes each message to ``folder/<message-id>.eml``."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = folder
        self.host = host
        if not port:
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
        self.port = port
        self._seen: set[str] = set()
        self._proc = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(str(folder), host, port), daemon=True
        )

    @property
    def url(self) -> str:
        """The ``smtp://`` URL to send to."""
        return f"smtp://{self.host}:{self.port}"

    @property
    def count(self) -> int:
        """How many messages the sink has stored."""
        return sum(1 for _ in self.folder.glob("*.eml"))

    def take_recent(self) -> dict[str, str]:
        """The decoded text of messages stored since the last call, by Message-ID."""
        recent: dict[str, str] = {}
        for path in self.folder.glob("*.eml"):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            raw = path.read_bytes()
            match = _MESSAGE_ID.search(raw)
            if match:
                recent[f"<{match.group(1).decode('ascii', 'replace')}>"] = decoded_text(raw)
        return recent

    def start(self, timeout: float = 20.0) -> OutboxSink:
        """Start the server and wait until it accepts connections."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._proc.is_alive():
                raise RuntimeError("the SMTP sink exited during start-up")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the SMTP sink on {self.url} did not start")

    def stop(self) -> None:
        """Stop the server."""
        self._proc.terminate()
        self._proc.join(timeout=10)
