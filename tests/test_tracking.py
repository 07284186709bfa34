"""The tracking service, driven over real HTTP: uvicorn on 127.0.0.1 in a thread, httpx.

Opens, clicks and unsubscribes reach the database through the spool; ``service.drain()``
waits (on a condition, not a clock) until the writer has recorded what was answered."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from nurture.dev.webserver import ThreadedServer
from nurture.engagement.tracking import SIGNATURE_HEADER, create_app, webhook_signature
from nurture.message.tokens import click_token, open_token, tracking_links, unsubscribe_token
from nurture.store.db import session_scope
from nurture.store.models import Event
from tests.test_events import Seeded, event_rows, seed, suppressions

SECRET = "tracking-test-secret"
WEBHOOK_SECRET = "whsec-test"
INGEST_KEY = "ingest-key-1"
MAX_BODY = 4096
EVIL_NAME = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Service:
    """A running tracking service and what the tests need to talk to it."""

    base_url: str
    client: httpx.Client
    clock: Clock
    engine: Engine
    ids: Seeded
    app: Any

    def drain(self) -> None:
        """Wait until the spool writer has recorded every answered request."""
        assert self.app.state.spool.wait_drained(30), self.app.state.spool.stats()

    def rows(self) -> list[tuple[int, int | None, str, str | None, str | None]]:
        """Event rows once drained, with spool ids (``track:<uuid>``) shown as ``track:``."""
        self.drain()
        return [
            (*r[:4], "track:" if r[4] and r[4].startswith("track:") else r[4])
            for r in event_rows(self.engine)
        ]

    @property
    def links(self) -> Any:
        return tracking_links(self.base_url, self.ids.delivery_id, self.ids.lead_id, SECRET)


@pytest.fixture
def service(engine: Engine, now: datetime, tmp_path: Path) -> Iterator[Service]:
    ids = seed(engine, now, first_name=EVIL_NAME)
    clock = Clock(now)
    app = create_app(
        engine,
        secret=SECRET,
        clock=clock,
        webhook_secret=WEBHOOK_SECRET,
        ingest_keys=[INGEST_KEY, "ingest-key-2"],
        max_body=MAX_BODY,
        spool_dir=tmp_path / "spool",
    )
    with (
        ThreadedServer(app) as server,
        httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client,
    ):
        yield Service(server.url, client, clock, engine, ids, app)


def payloads(engine: Engine) -> list[tuple[str, dict[str, Any]]]:
    """(type, payload) of every event, in insertion order."""
    with session_scope(engine) as s:
        return [(t, p) for t, p in s.execute(select(Event.type, Event.payload).order_by(Event.id))]


def _path(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[1].join(["/", ""])


# -- health, open, click --------------------------------------------------------------


def test_healthz(service: Service) -> None:
    response = service.client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["spool"]["pending"] == 0


def test_open_pixel_records_an_open(service: Service) -> None:
    response = service.client.get(_path(service.links.open_pixel_url))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content.startswith(b"GIF89a") and len(response.content) < 100
    assert "no-store" in response.headers["cache-control"]
    assert service.rows() == [
        (service.ids.lead_id, service.ids.delivery_id, "opened", None, "track:")
    ]


def test_open_pixel_with_bad_token_records_nothing(service: Service) -> None:
    good = open_token(service.ids.delivery_id, SECRET)
    forged = open_token(service.ids.delivery_id, "guessed-secret")
    flipped = good[:5] + ("A" if good[5] != "A" else "B") + good[6:]
    for token in (forged, flipped, "garbage", good[:-1]):
        assert service.client.get(f"/o/{token}.gif").status_code == 404
    # An unsubscribe token is not an open token.
    unsub = unsubscribe_token(service.ids.delivery_id, service.ids.lead_id, SECRET)
    assert service.client.get(f"/o/{unsub}.gif").status_code == 404
    assert service.app.state.spool.written == 0
    assert service.rows() == []


def test_click_redirects_exactly_to_the_signed_url(service: Service) -> None:
    target = "https://shop.example.com/pricing?plan=pro&utm_source=nurture%20mail#compare"
    response = service.client.get(_path(service.links.click_url(target)))
    assert response.status_code == 302
    assert response.headers["location"] == target
    assert service.rows() == [
        (service.ids.lead_id, service.ids.delivery_id, "clicked", target, "track:")
    ]


def test_head_requests_are_recorded_with_their_method(service: Service) -> None:
    # The classifier marks HEAD (link checkers) as machine; the service records it as such.
    url = _path(service.links.click_url("https://example.com/"))
    assert service.client.head(url).status_code == 302
    assert service.client.head(_path(service.links.open_pixel_url)).status_code == 200
    service.drain()
    assert [(p["method"], t) for t, p in payloads(service.engine)] == [
        ("HEAD", "clicked"),
        ("HEAD", "opened"),
    ]


def test_tampered_or_foreign_click_links_are_refused(service: Service) -> None:
    d = service.ids.delivery_id
    good = click_token(d, "https://shop.example.com/", SECRET)
    attempts = [
        # A token for an attacker's URL, signed with a guessed key.
        click_token(d, "https://evil.example/phish", "not-the-secret"),
        # The signed URL's body swapped for another URL's body, keeping the good MAC.
        click_token(d, "https://evil.example/", SECRET)[:-22] + good[-22:],
        # One character changed.
        good[:3] + ("x" if good[3] != "x" else "y") + good[4:],
        # An open token replayed as a click.
        open_token(d, SECRET),
    ]
    for token in attempts:
        response = service.client.get(f"/c/{token}")
        assert response.status_code == 404, token
        assert "location" not in response.headers
    # Parameters added to a good link are ignored: the redirect goes to the signed URL.
    response = service.client.get(f"/c/{good}", params={"u": "https://evil.example/"})
    assert response.headers["location"] == "https://shop.example.com/"
    assert [r[3] for r in service.rows()] == ["https://shop.example.com/"]


# -- unsubscribe ----------------------------------------------------------------------


def test_unsubscribe_page_then_confirm(service: Service) -> None:
    path = _path(service.links.unsubscribe_url)
    page = service.client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    body = page.text
    # The lead's name is escaped; no script can run (none in the page, CSP forbids it).
    assert "<script" not in body and "<img" not in body
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in body
    assert "script-src" not in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # The address is masked, and the form posts back to the same URL.
    assert "J***@example.com" in body and service.ids.email not in body
    assert re.search(r'<form method="post">', body) and "action=" not in body
    assert "Unsubscribe from all marketing email" in body
    # Showing the page changed nothing (mail scanners fetch links).
    assert suppressions(service.engine) == {}

    done = service.client.post(path, data={"scope": "all"})
    assert done.status_code == 200
    assert "You are unsubscribed" in done.text and "<script" not in done.text
    service.drain()
    assert suppressions(service.engine) == {service.ids.email: ("unsubscribed", "unsubscribe-page")}
    # Idempotent: a second POST adds neither an event nor a suppression.
    assert service.client.post(path, data={"scope": "all"}).status_code == 200
    rows = service.rows()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (service.ids.lead_id, service.ids.delivery_id, "unsubscribed")
    ]
    again = service.client.get(path)
    assert "You are unsubscribed" in again.text and "<form" not in again.text


@pytest.mark.parametrize("encoding", ["form", "multipart"])
def test_one_click_unsubscribe(service: Service, encoding: str) -> None:
    path = _path(service.links.unsubscribe_url)
    if encoding == "form":
        response = service.client.post(path, data={"List-Unsubscribe": "One-Click"})
    else:
        boundary = "nurtureboundary"
        content = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
            f"One-Click\r\n--{boundary}--\r\n"
        ).encode()
        response = service.client.post(
            path,
            content=content,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 200
    assert [r[2] for r in service.rows()] == ["unsubscribed"]
    assert suppressions(service.engine) == {service.ids.email: ("unsubscribed", "one-click")}


def test_forged_unsubscribe_is_refused(service: Service) -> None:
    forged = unsubscribe_token(service.ids.delivery_id, service.ids.other_lead_id, "guess")
    # A real token for one lead cannot be edited into another lead's.
    real = unsubscribe_token(service.ids.delivery_id, service.ids.lead_id, SECRET)
    other = unsubscribe_token(service.ids.delivery_id, service.ids.other_lead_id, SECRET)
    spliced = other[:-22] + real[-22:]
    for token in (forged, spliced, real + "A"):
        get = service.client.get(f"/u/{token}")
        post = service.client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
        assert (get.status_code, post.status_code) == (404, 404)
        assert "not valid" in post.text
    assert service.rows() == []
    assert suppressions(service.engine) == {}


# -- bounce webhook -------------------------------------------------------------------


def _post_webhook(
    service: Service,
    doc: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    at: datetime | None = None,
    header: str | None = None,
) -> httpx.Response:
    body = json.dumps(doc).encode()
    timestamp = int((at or service.clock.now).timestamp())
    signature = header if header is not None else webhook_signature(body, secret, timestamp)
    headers = {"Content-Type": "application/json"}
    if signature:
        headers[SIGNATURE_HEADER] = signature
    return service.client.post("/webhooks/bounces", content=body, headers=headers)


def test_webhook_bounce_suppresses(service: Service) -> None:
    doc = {
        "events": [
            {"type": "bounce", "email": "bob@example.org", "hard": True, "id": "b-1",
             "timestamp": int(service.clock.now.timestamp()) - 60, "reason": "5.1.1 unknown"},
            {"type": "bounce", "message_id": service.ids.message_id.strip("<>"), "hard": False,
             "id": "b-2"},
            {"type": "complaint", "email": "stranger@example.net", "id": "c-1"},
        ]
    }  # fmt: skip
    response = _post_webhook(service, doc)
    assert response.status_code == 200, response.text
    assert response.json()["inserted"] == 2
    assert response.json()["unknown_lead"] == 1
    # The hard bounce and the complaint suppress; the soft bounce (found by Message-ID) not.
    assert suppressions(service.engine) == {
        "bob@example.org": ("bounced", "webhook"),
        "stranger@example.net": ("complained", "webhook"),
    }
    assert event_rows(service.engine) == [
        (service.ids.other_lead_id, None, "bounced", None, "webhook:b-1"),
        (service.ids.lead_id, service.ids.delivery_id, "bounced", None, "webhook:b-2"),
    ]
    # The ESP re-sends the same events later, freshly signed: nothing new is recorded.
    service.clock.now += timedelta(minutes=30)
    again = _post_webhook(service, doc)
    assert again.status_code == 200
    assert again.json()["inserted"] == 0 and again.json()["duplicates"] == 2
    assert len(event_rows(service.engine)) == 2


def test_webhook_rejects_unsigned_forged_and_replayed(service: Service) -> None:
    doc = {"events": [{"type": "bounce", "email": "bob@example.org", "hard": True, "id": "x"}]}
    body = json.dumps(doc).encode()
    now = int(service.clock.now.timestamp())
    cases = {
        "unsigned": _post_webhook(service, doc, header=""),
        "wrong secret": _post_webhook(service, doc, secret="guessed"),
        "garbage header": _post_webhook(service, doc, header="v1=deadbeef"),
        "replayed": _post_webhook(service, doc, at=service.clock.now - timedelta(minutes=6)),
        "future": _post_webhook(service, doc, at=service.clock.now + timedelta(minutes=6)),
        # A valid signature of another body.
        "body swapped": _post_webhook(
            service,
            doc,
            header=webhook_signature(body.replace(b"bob", b"eve"), WEBHOOK_SECRET, now),
        ),
    }
    for name, response in cases.items():
        assert response.status_code == 401, name
    assert suppressions(service.engine) == {}
    assert event_rows(service.engine) == []


def test_webhook_bad_items_are_listed_and_good_ones_recorded(service: Service) -> None:
    doc = {
        "events": [
            {"type": "bounce", "email": "bob@example.org", "hard": True, "id": "ok"},
            {"type": "explosion", "email": "bob@example.org"},
            {"type": "bounce", "email": "bob@example.org", "hard": "yes"},
        ]
    }
    response = _post_webhook(service, doc)
    assert response.status_code == 207
    body = response.json()
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(1, "type"), (2, "hard")]
    assert body["inserted"] == 1
    assert suppressions(service.engine) == {"bob@example.org": ("bounced", "webhook")}
    # Nothing valid at all: 422, nothing recorded.
    only_bad = {"events": doc["events"][1:]}
    response = _post_webhook(service, only_bad)
    assert response.status_code == 422
    assert [(e["index"], e["field"]) for e in response.json()["errors"]] == [
        (0, "type"),
        (1, "hard"),
    ]
    assert len(event_rows(service.engine)) == 1


# -- event ingestion ------------------------------------------------------------------


def _events_doc(email: str) -> dict[str, Any]:
    return {
        "events": [
            {"id": "w-1", "type": "page_view", "email": email,
             "occurred_at": "2026-03-03T09:00:00Z", "url": "https://www.example.com/pricing"},
            {"id": "w-2", "type": "demo_request", "email": email,
             "occurred_at": "2026-03-03T09:01:00Z", "payload": {"company_size": "50-200"}},
            {"type": "webinar_attended", "email": "unknown@example.net",
             "occurred_at": "2026-03-03T09:02:00Z"},
        ]
    }  # fmt: skip


def test_event_ingestion_needs_a_key(service: Service) -> None:
    doc = _events_doc(service.ids.email)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {INGEST_KEY}"},
        {"Authorization": "Bearer"},
    ):
        response = service.client.post("/events", json=doc, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert event_rows(service.engine) == []


def test_event_ingestion_with_key(service: Service) -> None:
    headers = {"Authorization": f"Bearer {INGEST_KEY}"}
    response = service.client.post("/events", json=_events_doc(service.ids.email), headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "inserted": 2, "duplicates": 0, "unknown_lead": 1, "suppressed": 0,
        "unknown_indices": [2], "errors": [],
    }  # fmt: skip
    assert [(r[2], r[4]) for r in event_rows(service.engine)] == [
        ("page_view", "w-1"),
        ("demo_request", "w-2"),
    ]
    again = service.client.post(
        "/events",
        json=_events_doc(service.ids.email),
        headers={"Authorization": "Bearer ingest-key-2"},
    )
    assert again.json()["duplicates"] == 2
    assert len(event_rows(service.engine)) == 2


def test_event_ingestion_records_good_items_and_lists_bad_ones(service: Service) -> None:
    doc = _events_doc(service.ids.email)
    doc["events"][1]["occurred_at"] = "last tuesday"
    doc["events"].append({"type": "page_view", "occurred_at": "2026-03-03T09:00:00Z"})
    auth = {"Authorization": f"Bearer {INGEST_KEY}"}
    response = service.client.post("/events", json=doc, headers=auth)
    assert response.status_code == 207
    body = response.json()
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(1, "occurred_at"), (3, "email")]
    assert "ISO 8601" in body["errors"][0]["message"]
    # Item 0 recorded, item 2 names an address no lead has.
    assert (body["inserted"], body["unknown_indices"]) == (1, [2])
    assert [(r[2], r[4]) for r in event_rows(service.engine)] == [("page_view", "w-1")]
    # The client fixes item 1 and resends the whole batch: w-1 is a duplicate, w-2 is new.
    doc["events"][1]["occurred_at"] = "2026-03-03T09:01:00Z"
    del doc["events"][3]
    again = service.client.post("/events", json=doc, headers=auth)
    assert again.status_code == 200, again.text
    assert (again.json()["inserted"], again.json()["duplicates"]) == (1, 1)
    assert service.client.post("/events", content=b"{nope", headers=auth).status_code == 400
    deep = b'{"events": ' + b"[" * 1900 + b"]" * 1900 + b"}"
    assert service.client.post("/events", content=deep, headers=auth).status_code == 400
    # Data PostgreSQL cannot store is refused with a 4xx naming the field, not a 500.
    item = {"type": "page_view", "email": service.ids.email, "occurred_at": "2026-03-03T09:00:00Z"}
    nul = {"events": [{**item, "payload": {"q": "a\u0000b"}}, {**item, "url": "\ud83d"}]}
    response = service.client.post("/events", content=json.dumps(nul).encode(), headers=auth)
    assert response.status_code == 422
    assert [(e["index"], e["field"]) for e in response.json()["errors"]] == [
        (0, "payload.q"),
        (1, "url"),
    ]
    assert len(event_rows(service.engine)) == 2


# -- request size limit ---------------------------------------------------------------


def test_body_over_the_limit_is_refused(service: Service) -> None:
    headers = {"Authorization": f"Bearer {INGEST_KEY}"}
    item = {"type": "page_view", "email": service.ids.email, "occurred_at": "2026-03-03T09:00:00Z"}
    big = {"events": [{**item, "payload": {"x": "y" * MAX_BODY}}]}
    declared = service.client.post("/events", json=big, headers=headers)
    assert declared.status_code == 413

    # Without a Content-Length (chunked), the limit is enforced while reading.
    def chunks() -> Iterator[bytes]:
        raw = json.dumps(big).encode()
        for start in range(0, len(raw), 1024):
            yield raw[start : start + 1024]

    streamed = service.client.post("/events", content=chunks(), headers=headers)
    assert streamed.status_code == 413
    assert "transfer-encoding" not in declared.request.headers
    assert streamed.request.headers["transfer-encoding"] == "chunked"

    path = _path(service.links.unsubscribe_url)
    assert service.client.post(path, content=b"x" * (MAX_BODY + 1)).status_code == 413
    signed = _post_webhook(service, big)
    assert signed.status_code == 413
    assert event_rows(service.engine) == [] and suppressions(service.engine) == {}
