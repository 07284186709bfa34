"""Run an ASGI app under uvicorn in a background thread (the demo and the tests use it)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn that signals when it listens, so callers wait on an event, not a sleep."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


class ThreadedServer:
    """A real HTTP server for ``app`` on ``host``; a free port when ``port`` is 0."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        if not port:
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
        self.host, self.port = host, port
        # No proxy-header rewriting: an app that wants X-Forwarded-For reads it itself (the
        # tracking service takes the first hop only from a local proxy).
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="auto", proxy_headers=False
        )
        self._server = _Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8123``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> ThreadedServer:
        """Start serving; raise if the server is not listening within ``timeout`` seconds."""
        self._thread.start()
        if not self._server.ready.wait(timeout) or not self._server.started:
            raise RuntimeError(f"HTTP server on {self.url} did not start")
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
