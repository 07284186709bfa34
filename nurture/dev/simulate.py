"""The demo's engagement simulator: synthetic people open, click and reply to real emails.

It reads the HTML that the SMTP sink received, follows the signed links inside it through
the tracking service's ASGI app (the same path a real recipient's mail client takes), and
records replies through :func:`nurture.engagement.events.record_events`, as the inbox poller does.

Some recipients sit behind machines, as real ones do: a share of them behind a mail
security gateway that fetches every link of every message (the honeypot included) within
a second of delivery, with a scanner's user agent; a share on an Apple Mail Privacy
Protection client, whose pixel Apple fetches from its own network minutes after
delivery (the person's own opens are then invisible, their clicks are not). People send a
browser's user agent. The report then shows the human/machine split.
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

from nurture.engagement.events import EventIn, record_events
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Lead

_HREF = re.compile(r'(?:href|src)="([^"]+)"')
# The honeypot anchor (nurture.message.compose): machines fetch it, people never see it.
_HIDDEN_LINK = re.compile(r'<a [^>]*aria-hidden="true"[^>]*></a>')
#: Shares of recipients behind a link-scanning gateway and on an MPP-style mail client.
GATEWAY_SHARE = 0.2
MPP_SHARE = 0.25
PERSON_HEADERS = {
    "User-Agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/122.0.0.0 Safari/537.36"
}
SCANNER_HEADERS = {
    "User-Agent": "Mozilla/5.0 (compatible; Proofpoint URL Defense)",
    "X-Forwarded-For": "203.0.113.25",
}
# Apple's proxy sends a bare agent from Apple's 17.0.0.0/8 (the tracking service trusts
# X-Forwarded-For from loopback, where the demo's requests come from).
MPP_HEADERS = {"User-Agent": "Mozilla/5.0", "X-Forwarded-For": "17.58.63.201"}

Visit = list[tuple[str, str, dict[str, str]]]


@dataclass
class SimulatedEngagement:
    """What the simulated recipients did in one round."""

    opened: int = 0
    clicked: int = 0
    replied: int = 0
    unsubscribed: int = 0
    website: int = 0
    scanned: int = 0  # messages a gateway scanned
    proxied: int = 0  # pixels an MPP-style proxy fetched


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

    from nurture.engagement.tracking import create_app
    from nurture.store.db import get_engine

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
    visits: list[Visit] = []  # per recipient: the requests, in order
    scans: list[Visit] = []  # per scanned message: every link, at delivery
    proxied: list[Visit] = []  # per MPP recipient: the pixel, minutes after delivery
    for delivery_id, mid, variant, email, attrs in rows:
        rng = random.Random(f"{seed}:{delivery_id}")
        p = float((attrs or {}).get("propensity", 0.2))
        if variant in ("roi", "percent"):
            p *= 1.35  # give the A/B test a real winner to find
        html = received[mid]
        links = [u for u in _HREF.findall(html) if u.startswith(tracking_prefix)]
        visible = _HREF.findall(_HIDDEN_LINK.sub("", html))
        pixel = [u for u in links if "/o/" in u]
        clicks = [u for u in visible if u.startswith(tracking_prefix) and "/c/" in u]
        unsubscribe = [u for u in links if "/u/" in u]
        # Where the person reads mail is theirs, not the message's: seeded by address.
        where = random.Random(f"{seed}:client:{email}").random()
        behind_gateway = where < GATEWAY_SHARE
        on_mpp = GATEWAY_SHARE <= where < GATEWAY_SHARE + MPP_SHARE
        if behind_gateway:
            scans.append([("GET", _path(u), SCANNER_HEADERS) for u in links if "/u/" not in u])
        if on_mpp and pixel:
            proxied.append([("GET", _path(pixel[0]), MPP_HEADERS)])
        visit: Visit = []
        if pixel and rng.random() < min(0.95, 0.25 + p * 1.6):
            if not on_mpp:  # Apple's proxy fetched the pixel already: this open is unseen
                visit.append(("GET", _path(pixel[0]), PERSON_HEADERS))
            result.opened += 1
            if clicks and rng.random() < min(0.9, p * 1.4):
                visit.append(("GET", _path(rng.choice(clicks)), PERSON_HEADERS))
                result.clicked += 1
                if rng.random() < p * 0.6:
                    replies.append(
                        EventIn(
                            type="replied",
                            occurred_at=now + timedelta(hours=1),
                            delivery_id=delivery_id,
                            external_id=f"sim-reply-{delivery_id}",
                        )
                    )
                if (attrs or {}).get("type") == "b2b" and rng.random() < p:
                    website.append(
                        {
                            "type": "demo_request" if p > 0.45 else "page_view",
                            "email": email,
                            "occurred_at": (now + timedelta(hours=1)).isoformat(),
                            "id": f"sim-web-{delivery_id}",
                        }
                    )
        elif unsubscribe and rng.random() < 0.015:
            visit.append(("POST", _path(unsubscribe[0]), PERSON_HEADERS))
            result.unsubscribed += 1
        if visit:
            visits.append(visit)

    def follow(visit: Visit) -> None:
        for method, path, headers in visit:
            if method == "POST":  # RFC 8058 one-click, as a mail client sends it
                response = client.post(
                    path, data={"List-Unsubscribe": "One-Click"}, headers=headers
                )
            else:
                response = client.get(path, follow_redirects=False, headers=headers)
            if response.status_code >= 400:
                raise RuntimeError(f"tracking service answered {response.status_code} to {path}")

    # The tracking service stamps events with the shared clock: one phase per instant.
    # Gateways scan at delivery, Apple's proxy fetches minutes later, people an hour later.
    # Recipients act independently: a few at a time, each one's requests in order.
    for instant, batch in (
        (now + timedelta(seconds=0.8), scans),
        (now + timedelta(minutes=4), proxied),
        (now + timedelta(hours=1), visits),
    ):
        clock.now = instant
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(follow, batch))
    if scans or proxied or visits:
        wait_drained(client)  # the service records through its spool: wait for it
    result.scanned = len(scans)
    result.proxied = len(proxied)
    if replies:
        with session_scope(engine) as session:
            result.replied = record_events(session, replies, now=clock.now).inserted
    if website:
        resp = client.post(
            "/events", json={"events": website}, headers={"Authorization": f"Bearer {ingest_key}"}
        )
        result.website = len(website) if resp.status_code < 300 else 0
    return result
