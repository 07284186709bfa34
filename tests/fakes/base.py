"""What every fake CRM shares: injectable faults, call counting, a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from nurture.dev.webserver import ThreadedServer


@dataclass
class Faults:
    """Faults a fake injects, decided per call from a seeded RNG.

    ``rate`` of calls fail: half of them with a 429, half with a 5xx; of the 5xx, half
    happen *after* the write was applied (the response is lost, the write is not), which
    is what makes idempotent writes necessary. ``outage`` answers 503 to everything;
    ``hang`` delays that many next responses by ``hang_seconds`` (client timeouts).
    """

    rate: float = 0.0
    seed: int = 7
    outage: bool = False
    hang: int = 0
    hang_seconds: float = 1.0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self) -> str | None:
        """'429', '5xx-before', '5xx-after' or None for this call."""
        if self.outage:
            return "5xx-before"
        if self.rate and self.rng.random() < self.rate:
            return self.rng.choice(["429", "429", "5xx-before", "5xx-after"])
        return None


class FakeCrm:
    """Base of the fakes: a lock around state, counters, a clock and the server."""

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self.lock = threading.Lock()
        self.faults = Faults()
        self.calls: Counter[str] = Counter()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.server: ThreadedServer | None = None
        self._next_id = 100
        self._switch = sys.getswitchinterval()

    def new_id(self) -> int:
        """A fresh numeric id (call with the lock held)."""
        self._next_id += 1
        return self._next_id

    async def maybe_hang(self) -> None:
        """Delay this response when a hang is armed (the client times out meanwhile)."""
        if self.faults.hang > 0:
            self.faults.hang -= 1
            await asyncio.sleep(self.faults.hang_seconds)

    def count(self, request: Request) -> None:
        """Count the call by method and path."""
        with self.lock:
            self.calls[f"{request.method} {request.url.path}"] += 1

    @property
    def total_calls(self) -> int:
        """Every call received, faulted or not."""
        return sum(self.calls.values())

    def app(self) -> object:
        """The ASGI app; subclasses build it."""
        raise NotImplementedError

    def start(self) -> str:
        """Serve on 127.0.0.1 and return the base URL."""
        # Client and server share one GIL here; the default 5 ms switch interval would
        # make every loopback round trip wait for it (about 9 ms a call instead of 3).
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        self.server = ThreadedServer(self.app()).start()
        return self.server.url

    def stop(self) -> None:
        """Stop serving."""
        if self.server:
            self.server.stop()
            sys.setswitchinterval(self._switch)

    def __enter__(self) -> FakeCrm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response."""
    return JSONResponse(body, status_code=status, headers=headers)


def iso(ts: datetime) -> str:
    """RFC 3339 with milliseconds and Z, as the vendors write it."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
