"""The demo's engagement simulator: synthetic people open, click and reply to real emails.

It reads the HTML that the SMTP sink received, follows the signed links inside it through
the tracking service's ASGI app (the same path a real recipient's mail client takes), and
records replies through :func:`nurture.events.record_events`, as the inbox poller does.
"""

from __future__ import annotations

import multiprocessing
import random
import re
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, select

from nurture.db import session_scope
from nurture.events import EventIn, record_events
from nurture.models import Delivery, Lead

_HREF = re.compile(r'(?:href|src)="([^"]+)"')


@dataclass
class SimulatedEngagement:
    """What the simulated recipients did in one round."""

    opened: int = 0
    clicked: int = 0
    replied: int = 0
    unsubscribed: int = 0
    website: int = 0


class Clock:
    """A settable clock shared with the tracking service's process, so the events it records
    carry simulated times. The instant lives in shared memory as a UNIX timestamp."""

    def __init__(self, now: datetime) -> None:
        self._value = multiprocessing.get_context("spawn").Value("d", now.timestamp())

    @property
    def now(self) -> datetime:
        """The simulated instant."""
        return datetime.fromtimestamp(self._value.value, UTC)

    @now.setter
    def now(self, value: datetime) -> None:
        self._value.value = value.timestamp()

    def __call__(self) -> datetime:
        return self.now


def _serve_tracking(
    db_url: str, secret: str, ingest_key: str, clock: Clock, port: int, spool_dir: str
) -> None:
    """Entry point of the tracking service's process (spawned, so it shares no threads)."""
    import uvicorn

    from nurture.db import get_engine
    from nurture.tracking import create_app

    app = create_app(
        get_engine(db_url), secret=secret, clock=clock, webhook_secret=secret,
        ingest_keys={ingest_key}, spool_dir=spool_dir,
    )  # fmt: skip
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
        proxy_headers=False,
    )  # fmt: skip


class TrackingProcess:
    """The real tracking service in its own process on 127.0.0.1, using the second core."""

    def __init__(
        self, db_url: str, secret: str, ingest_key: str, clock: Clock, spool_dir: Path
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(
            target=_serve_tracking,
            args=(db_url, secret, ingest_key, clock, self.port, str(spool_dir)),
            daemon=True,
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> TrackingProcess:
        """Start it and wait until /healthz answers."""
        self._proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._proc.is_alive():
                raise RuntimeError("the tracking service exited during start-up")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"the tracking service on {self.url} did not start")

    def stop(self) -> None:
        """Stop the process."""
        self._proc.terminate()
        self._proc.join(timeout=10)


def wait_drained(client: httpx.Client, timeout: float = 120.0) -> None:
    """Wait until the tracking service's spool has reached the database (the next tick
    must see the engagement it answered), polling ``/healthz``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/healthz")
        if response.status_code == 200 and response.json()["spool"]["pending"] == 0:
            return
        time.sleep(0.02)
    raise RuntimeError("the tracking service's spool did not drain")


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def simulate_engagement(
    engine: Engine,
    client: httpx.Client,
    clock: Clock,
    received: Mapping[str, str],
    now: datetime,
    *,
    tracking_prefix: str,
    ingest_key: str,
    seed: int = 11,
) -> SimulatedEngagement:
    """React to the messages in ``received`` (Message-ID -> HTML), by each lead's propensity."""
    result = SimulatedEngagement()
    if not received:
        return result
    with session_scope(engine) as session:
        rows = session.execute(
            select(Delivery.id, Delivery.message_id, Delivery.variant, Lead.email, Lead.attributes)
            .join(Lead, Lead.id == Delivery.lead_id)
            .where(Delivery.message_id.in_(list(received)))
        ).all()
    replies: list[EventIn] = []
    website: list[dict[str, object]] = []
    visits: list[list[tuple[str, str]]] = []  # per recipient: the requests, in order
    clock.now = now + timedelta(hours=1)
    for delivery_id, mid, variant, email, attrs in rows:
        rng = random.Random(f"{seed}:{delivery_id}")
        p = float((attrs or {}).get("propensity", 0.2))
        if variant in ("roi", "percent"):
            p *= 1.35  # give the A/B test a real winner to find
        links = [u for u in _HREF.findall(received[mid]) if u.startswith(tracking_prefix)]
        pixel = [u for u in links if "/o/" in u]
        clicks = [u for u in links if "/c/" in u]
        unsubscribe = [u for u in links if "/u/" in u]
        visit: list[tuple[str, str]] = []
        if pixel and rng.random() < min(0.95, 0.25 + p * 1.6):
            visit.append(("GET", _path(pixel[0])))
            result.opened += 1
            if clicks and rng.random() < min(0.9, p * 1.4):
                visit.append(("GET", _path(rng.choice(clicks))))
                result.clicked += 1
                if rng.random() < p * 0.6:
                    replies.append(
                        EventIn(
                            type="replied",
                            occurred_at=clock.now,
                            delivery_id=delivery_id,
                            external_id=f"sim-reply-{delivery_id}",
                        )
                    )
                if (attrs or {}).get("type") == "b2b" and rng.random() < p:
                    website.append(
                        {
                            "type": "demo_request" if p > 0.45 else "page_view",
                            "email": email,
                            "occurred_at": clock.now.isoformat(),
                            "id": f"sim-web-{delivery_id}",
                        }
                    )
        elif unsubscribe and rng.random() < 0.015:
            visit.append(("POST", _path(unsubscribe[0])))
            result.unsubscribed += 1
        if visit:
            visits.append(visit)

    def follow(visit: list[tuple[str, str]]) -> None:
        for method, path in visit:
            if method == "POST":  # RFC 8058 one-click, as a mail client sends it
                response = client.post(path, data={"List-Unsubscribe": "One-Click"})
            else:
                response = client.get(path, follow_redirects=False)
            if response.status_code >= 400:
                raise RuntimeError(f"tracking service answered {response.status_code} to {path}")

    # Recipients act independently: a few at a time, each one's requests in order.
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(follow, visits))
    if visits:
        wait_drained(client)
    if replies:
        with session_scope(engine) as session:
            result.replied = record_events(session, replies, now=clock.now).inserted
    if website:
        resp = client.post(
            "/events", json={"events": website}, headers={"Authorization": f"Bearer {ingest_key}"}
        )
        result.website = len(website) if resp.status_code < 300 else 0
    return result
