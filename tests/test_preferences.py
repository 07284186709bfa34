"""The preference centre: topic toggles on the unsubscribe page, in headless Chromium too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from nurture.dev.webserver import ThreadedServer
from nurture.engagement.tracking import create_app
from nurture.message.tokens import unsubscribe_token
from nurture.spec.consent import ConsentSpec
from nurture.store.consent import ConsentIn, record_consents
from nurture.store.db import session_scope
from nurture.store.models import Consent, Event, Suppression
from tests.test_events import Seeded, seed
from tests.test_report_html import chromium_page

SECRET = "prefs-secret"
SPEC = ConsentSpec.model_validate(
    {
        "topics": {
            "newsletter": {"label": "Monthly <newsletter>", "bases": ["consent"]},
            "offers": {"label": "Offers", "bases": ["consent", "legitimate_interest"]},
            "events": {"label": "Event invitations"},
        }
    }
)


@dataclass
class Service:
    url: str
    client: httpx.Client
    engine: Engine
    ids: Seeded
    app: Any

    @property
    def path(self) -> str:
        return f"/u/{unsubscribe_token(self.ids.delivery_id, self.ids.lead_id, SECRET)}"

    def drain(self) -> None:
        assert self.app.state.spool.wait_drained(30), self.app.state.spool.stats()

    def consents(self) -> list[tuple[str, str, str, str]]:
        self.drain()
        with session_scope(self.engine) as session:
            return sorted(
                session.execute(
                    select(Consent.topic, Consent.status, Consent.basis, Consent.source_kind).where(
                        Consent.lead_id == self.ids.lead_id
                    )
                ).all()
            )


@pytest.fixture
def service(engine: Engine, now: datetime, tmp_path: Path) -> Iterator[Service]:
    ids = seed(engine, now)
    with session_scope(engine) as session:
        record_consents(
            session,
            [
                ConsentIn(ids.lead_id, "newsletter", "consent", source_kind="form"),
                ConsentIn(ids.lead_id, "*", "legitimate_interest", source_kind="import"),
            ],
            now,
        )
    app = create_app(
        engine,
        secret=SECRET,
        clock=lambda: now,
        webhook_secret=None,
        ingest_keys=[],
        spool_dir=tmp_path / "spool",
        consent=SPEC,
    )
    with (
        ThreadedServer(app) as server,
        httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client,
    ):
        yield Service(server.url, client, engine, ids, app)


BEFORE = [
    ("*", "granted", "legitimate_interest", "import"),
    ("newsletter", "granted", "consent", "form"),
]

STATE = """JSON.stringify({
  boxes: Object.fromEntries(Array.from(document.querySelectorAll('input[name=topic]'))
    .map(b => [b.value, b.checked])),
  labels: Array.from(document.querySelectorAll('label')).map(l => l.textContent.trim()),
  h1: document.querySelector('h1').textContent,
  scripts: document.scripts.length,
})"""
CENTRE = """(() => { const r = document.querySelector('%s').getBoundingClientRect();
  return JSON.stringify([r.left + r.width / 2, r.top + r.height / 2]); })()"""


def _click(page: Any, selector: str) -> None:
    """A real mouse click at the element's centre (no script of the page is involved)."""
    found = page.call("Runtime.evaluate", expression=CENTRE % selector, returnByValue=True)
    x, y = json.loads(found["result"]["value"])
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def _state(page: Any) -> dict[str, Any]:
    result = page.call("Runtime.evaluate", expression=STATE, returnByValue=True)
    return dict(json.loads(result["result"]["value"]))


def test_the_preference_centre_in_headless_chromium(service: Service, tmp_path: Path) -> None:
    with chromium_page(tmp_path / "profile") as page:
        page.call("Runtime.enable")
        page.call("Log.enable")
        page.call("Page.enable")
        page.call("Page.navigate", url=service.url + service.path)
        page.wait_for("Page.loadEventFired")
        shown = _state(page)
        # Ticked where the lead may be mailed now: newsletter by consent, offers by the
        # legitimate interest on every topic; events accepts consent only.
        assert shown["boxes"] == {"newsletter": True, "offers": True, "events": False}
        assert "Monthly <newsletter>" in shown["labels"]  # escaped, shown as text
        assert shown["scripts"] == 0
        _click(page, "#topic-newsletter")  # untick
        _click(page, "#topic-events")  # tick
        assert _state(page)["boxes"] == {"newsletter": False, "offers": True, "events": True}
        page.events.clear()
        _click(page, "#save")
        page.wait_for("Page.loadEventFired")
        saved = _state(page)
        errors = page.errors()
    assert saved["h1"] == "Your choices are saved"
    assert errors == []
    assert service.consents() == [
        ("*", "granted", "legitimate_interest", "import"),
        ("events", "granted", "consent", "preferences"),
        ("newsletter", "withdrawn", "consent", "preferences"),
    ]
    with session_scope(service.engine) as session:
        types = list(
            session.scalars(select(Event.type).where(Event.lead_id == service.ids.lead_id))
        )
        assert session.scalar(select(Suppression.id)) is None  # not unsubscribed from all
    assert types.count("consent_withdrawn") == 1 and "preferences_saved" in types


def test_unsubscribe_from_everything_and_one_click(service: Service) -> None:
    page = service.client.get(service.path)
    assert page.status_code == 200
    assert "Monthly &lt;newsletter&gt;" in page.text and 'name="scope" value="all"' in page.text
    # RFC 8058 one-click means everything: the address is suppressed, the topics untouched.
    one = service.client.post(service.path, data={"List-Unsubscribe": "One-Click"})
    assert one.status_code == 200
    assert service.consents() == BEFORE
    with session_scope(service.engine) as session:
        assert session.scalar(select(Suppression.reason)) == "unsubscribed"
    again = service.client.get(service.path)
    assert "You are unsubscribed" in again.text


def test_the_all_button_and_hostile_posts(service: Service) -> None:
    bad = service.client.post(
        service.path, content=b"scope=topics&topic=%ff%fe&topic=nope", headers={
            "content-type": "application/x-www-form-urlencoded"}
    )  # fmt: skip
    assert bad.status_code == 200  # unknown topics are ignored, the known ones all untick
    assert service.consents() == [
        ("*", "granted", "legitimate_interest", "import"),
        ("newsletter", "withdrawn", "consent", "preferences"),
        ("offers", "withdrawn", "consent", "preferences"),
    ]
    allout = service.client.post(service.path, data={"scope": "all"})
    assert "You are unsubscribed" in allout.text
    service.drain()
    with session_scope(service.engine) as session:
        assert session.scalar(select(Suppression.reason)) == "unsubscribed"
    assert service.client.get("/u/forged").status_code == 404
