"""The demo's engagement simulator: synthetic people open, click and reply to real emails.

It reads the HTML that the SMTP sink received, follows the signed links inside it through
the tracking service's ASGI app (the same path a real recipient's mail client takes), and
records replies through :func:`nurture.events.record_events`, as the inbox poller does.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import Engine, select
from starlette.testclient import TestClient

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
    """A settable clock for the tracking app, so simulated events carry simulated times."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def simulate_engagement(
    engine: Engine,
    client: TestClient,
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
            select(
                Delivery.id,
                Delivery.message_id,
                Delivery.variant,
                Lead.id,
                Lead.email,
                Lead.attributes,
            )
            .join(Lead, Lead.id == Delivery.lead_id)
            .where(Delivery.message_id.in_(list(received)))
        ).all()
    replies: list[EventIn] = []
    website: list[dict[str, object]] = []
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
        if pixel and rng.random() < min(0.95, 0.25 + p * 1.6):
            client.get(_path(pixel[0]))
            result.opened += 1
            if clicks and rng.random() < min(0.9, p * 1.4):
                resp = client.get(_path(rng.choice(clicks)), follow_redirects=False)
                result.clicked += resp.status_code in (302, 303, 307)
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
                client.post(_path(unsubscribe[0]), data={"List-Unsubscribe": "One-Click"})
                result.unsubscribed += 1
    if replies:
        with session_scope(engine) as session:
            result.replied = record_events(session, replies, now=clock.now).inserted
    if website:
        resp = client.post(
            "/events", json={"events": website}, headers={"Authorization": f"Bearer {ingest_key}"}
        )
        result.website = len(website) if resp.status_code < 300 else 0
    return result
