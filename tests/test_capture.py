"""Capture: POST /forms/{form}, honeypot, rate limits, double opt-in with one confirmation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from nurture.dev.webserver import ThreadedServer
from nurture.engagement.tracking import create_app
from nurture.privacy.erasure import erase
from nurture.privacy.opt_in import expire_opt_ins
from nurture.spec.consent import ConsentSpec
from nurture.spec.programme import Programme
from nurture.store.db import session_scope
from nurture.store.models import Consent, Event, Lead, OptIn, Suppression
from nurture.tick import tick
from tests.helpers import SECRET, add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

SPEC = ConsentSpec.model_validate(
    {
        "topics": {"newsletter": {"label": "Newsletter"}, "offers": {"label": "Offers"}},
        "double_opt_in": ["website"],
        "unconfirmed": {"after": "7d", "action": "purge"},
        "forms": {
            "signup": {
                "touchpoint": "website",
                "fields": {"email": "email", "name": "first_name", "team": "attributes.team"},
                "topics": ["newsletter", "offers"],
                "consent_text": "Send me the newsletter",
                "consent_version": "v3",
                "redirect": "https://site.example/thanks",
            },
            "partner": {
                "touchpoint": "partner",
                "fields": {"mail": "email", "first": "first_name"},
                "topics": ["offers"],
                "basis": "consent",
                "consent_version": "p1",
            },
        },
    }
)
NEWS = campaign("""
name: news
topic: newsletter
audience: {field: source, op: in, value: [website, partner]}
steps:
  - {id: welcome, template: retail/welcome}
""")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Service:
    client: httpx.Client
    clock: Clock
    engine: Engine
    app: Any

    def drain(self) -> None:
        assert self.app.state.spool.wait_drained(30), self.app.state.spool.stats()


@pytest.fixture
def service(engine: Engine, now: datetime, tmp_path: Path) -> Iterator[Service]:
    clock = Clock(now)
    app = create_app(
        engine,
        secret=SECRET,
        clock=clock,
        webhook_secret=None,
        ingest_keys=[],
        spool_dir=tmp_path / "spool",
        consent=SPEC,
    )
    with (
        ThreadedServer(app) as server,
        httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client,
    ):
        yield Service(client, clock, engine, app)


def _prog() -> Programme:
    p = programme(NEWS)
    return Programme(p.campaigns, p.scoring, p.pipeline, p.templates, SPEC)


def _lead(engine: Engine, email: str) -> Lead | None:
    with session_scope(engine) as session:
        lead = session.scalars(select(Lead).where(Lead.email == email)).one_or_none()
        if lead is not None:
            session.expunge(lead)
        return lead


def test_a_form_post_redirects_and_a_json_post_is_accepted_then_recorded(
    service: Service, now: datetime
) -> None:
    html = service.client.post(
        "/forms/signup",
        data={"email": " Ada@Example.COM ", "name": "Ada", "team": "data", "website": ""},
        headers={"User-Agent": "Mozilla/5.0 Test"},
    )
    assert html.status_code == 303
    assert html.headers["location"] == "https://site.example/thanks"
    api = service.client.post("/forms/partner", json={"mail": "bo@partner.example", "first": "Bo"})
    assert (api.status_code, api.json()) == (202, {"status": "accepted"})
    service.drain()
    ada = _lead(service.engine, "ada@example.com")
    assert ada is not None
    assert (ada.source, ada.first_name, ada.created_at) == ("website", "Ada", now)
    assert ada.attributes == {"team": "data"}
    with session_scope(service.engine) as session:
        event = session.execute(
            select(Event.type, Event.payload).where(Event.lead_id == ada.id)
        ).one()
        opt_in = session.get(OptIn, ada.id)
        assert opt_in is not None
        assert (opt_in.holds, opt_in.confirmed_at, opt_in.topics["topics"]) == (
            True,
            None,
            ["newsletter", "offers"],
        )
        bo_consent = session.execute(
            select(Consent.topic, Consent.basis, Consent.source_kind, Consent.source,
                   Consent.text_version, Consent.ip)
            .join(Lead, Lead.id == Consent.lead_id)
            .where(Lead.email == "bo@partner.example")
        ).all()  # fmt: skip
    assert event[0] == "form_submit"
    assert event[1]["form"] == "signup" and event[1]["user_agent"] == "Mozilla/5.0 Test"
    assert "capture" not in event[1]
    # The partner form has no double opt-in: the consent is recorded at once.
    assert bo_consent == [("offers", "consent", "form", "partner", "p1", "127.0.0.1")]


def test_the_answer_never_tells_whether_an_address_was_known(
    service: Service, now: datetime
) -> None:
    add_leads(service.engine, now, {"email": "known@example.com", "first_name": "Kim"})
    with session_scope(service.engine) as session:
        session.add(Suppression(email="gone@example.com", reason="unsubscribed", created_at=now))

    def answer(email: str, as_json: bool) -> tuple[int, str, str | None]:
        if as_json:
            r = service.client.post("/forms/signup", json={"email": email, "name": "Mallory"})
        else:
            r = service.client.post("/forms/signup", data={"email": email, "name": "Mallory"})
        return r.status_code, r.text, r.headers.get("location")

    for as_json in (True, False):
        answers = {answer(e, as_json) for e in ("known@example.com", "new@example.com",
                                                 "gone@example.com")}  # fmt: skip
        assert len(answers) == 1, answers
    service.drain()
    known = _lead(service.engine, "known@example.com")
    assert known is not None and known.first_name == "Kim"  # a form cannot rename anyone
    with session_scope(service.engine) as session:
        # A known lead asking again is not held out of its campaigns.
        held = session.scalar(select(OptIn.holds).where(OptIn.lead_id == known.id))
    assert held is False


def test_honeypot_bad_input_and_rate_limits(service: Service, now: datetime) -> None:
    bot = service.client.post("/forms/signup", data={"email": "bot@example.com", "website": "x"})
    assert (bot.status_code, bot.headers["location"]) == (303, "https://site.example/thanks")
    bad = service.client.post("/forms/signup", json={"email": "not-an-address", "name": "x" * 300})
    assert bad.status_code == 422
    assert {e["field"] for e in bad.json()["errors"]} == {"email", "name"}
    page = service.client.post("/forms/signup", data={"email": "<script>@x"})
    assert page.status_code == 422 and "<script>" not in page.text
    assert service.client.post("/forms/nope", json={"email": "a@b.example"}).status_code == 404
    plain = {"content-type": "text/plain"}
    assert service.client.post("/forms/signup", content=b"\xff", headers=plain).status_code == 415
    as_json = {"content-type": "application/json"}
    assert service.client.post("/forms/signup", content=b"{", headers=as_json).status_code == 400
    # Per address: five an hour.
    codes = [
        service.client.post("/forms/signup", json={"email": "same@example.com"}).status_code
        for _ in range(6)
    ]
    assert codes == [202] * 5 + [429]
    # Per IP: twenty an hour, whatever the address (earlier requests count too).
    more = [
        service.client.post("/forms/signup", json={"email": f"p{i}@example.com"}).status_code
        for i in range(20)
    ]
    assert 429 in more and more.index(429) > 0
    limited = service.client.post("/forms/signup", json={"email": "late@example.com"})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    service.clock.now = now + timedelta(hours=1, seconds=1)  # the window slides
    assert (
        service.client.post("/forms/signup", json={"email": "late@example.com"}).status_code == 202
    )
    service.drain()
    assert _lead(service.engine, "bot@example.com") is None


def test_double_opt_in_sends_exactly_one_confirmation_then_the_campaign(
    service: Service, smtp_server: SmtpSink, now: datetime
) -> None:
    engine = service.engine
    for _ in range(2):  # asking twice still means one email
        service.client.post("/forms/signup", data={"email": "dee@example.com", "name": "Dee"})
    service.drain()
    m = mailer(smtp_server.url)
    prog = _prog()
    first = tick(engine, now, prog, m, worker="t")
    assert first.confirmations.sent == 1
    assert first.summary()["enrolled"] == 0
    for hours in (1, 2, 30):  # later ticks send nothing more, and the campaign waits
        again = tick(engine, now + timedelta(hours=hours), prog, m, worker="t")
        assert (again.confirmations.sent, again.summary()["sent"]) == (0, 0)
    smtp_server.wait_for(1)
    assert smtp_server.count() == 1
    (rcpt, msg) = smtp_server.messages[0]
    assert rcpt == "dee@example.com"
    body = msg.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    token = re.search(r"/confirm/([A-Za-z0-9_-]+)", body)
    assert token is not None
    # GET only shows the button (scanners prefetch); POST confirms.
    page = service.client.get(f"/confirm/{token.group(1)}")
    assert page.status_code == 200 and "<form" in page.text
    service.drain()
    with session_scope(engine) as session:
        assert session.scalar(select(OptIn.confirmed_at)) is None
    service.clock.now = now + timedelta(days=2)
    done = service.client.post(f"/confirm/{token.group(1)}", data={"action": "confirm"})
    assert done.status_code == 200
    service.drain()
    with session_scope(engine) as session:
        topics = sorted(
            session.execute(select(Consent.topic, Consent.source_kind, Consent.text_version))
        )
    assert topics == [("newsletter", "double_opt_in", "v3"), ("offers", "double_opt_in", "v3")]
    after = tick(engine, now + timedelta(days=2, minutes=1), prog, m, worker="t")
    assert after.summary()["sent"] == 1
    smtp_server.wait_for(2)
    assert smtp_server.recipients() == ["dee@example.com", "dee@example.com"]
    assert "Fern" in str(smtp_server.messages[1][1]["Subject"])
    assert service.client.get("/confirm/forged-token-xyz").status_code == 404


def test_one_click_on_the_confirmation_declines_and_expired_signups_are_purged(
    service: Service, smtp_server: SmtpSink, now: datetime
) -> None:
    engine = service.engine
    service.client.post("/forms/signup", json={"email": "no@example.com"})
    service.client.post("/forms/signup", json={"email": "late@example.com"})
    service.drain()
    tick(engine, now, _prog(), mailer(smtp_server.url), worker="t")
    smtp_server.wait_for(2)
    no = next(msg for r, msg in smtp_server.messages if r == "no@example.com")
    url = no["List-Unsubscribe"].strip("<>")
    path = "/" + url.split("/", 3)[3]
    assert service.client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    service.drain()
    with session_scope(engine) as session:
        assert (
            session.scalar(select(Suppression.reason).where(Suppression.email == "no@example.com"))
            == "unsubscribed"
        )
        assert session.scalar(select(OptIn.confirmed_at).join(Lead, Lead.id == OptIn.lead_id)
                              .where(Lead.email == "no@example.com")) is None  # fmt: skip
    assert expire_opt_ins(engine, SPEC, now + timedelta(days=6)) == 0
    assert expire_opt_ins(engine, SPEC, now + timedelta(days=8)) == 2
    assert _lead(engine, "late@example.com") is None
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(OptIn)) == 0
    keep = SPEC.model_copy(
        update={"unconfirmed": SPEC.unconfirmed.model_copy(update={"action": "keep"})}
    )
    assert expire_opt_ins(engine, keep, now + timedelta(days=80)) == 0


def test_an_erased_person_signing_up_again_is_suppressed(service: Service, now: datetime) -> None:
    add_leads(service.engine, now, {"email": "er@example.com"})
    erase(service.engine, ["er@example.com"], now, key=SECRET)
    service.client.post("/forms/partner", json={"mail": "er@example.com"})
    service.drain()
    with session_scope(service.engine) as session:
        reason = session.scalar(
            select(Suppression.reason).where(Suppression.email == "er@example.com")
        )
    assert reason == "erased"


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(
    body=st.dictionaries(
        st.sampled_from(["email", "name", "team", "website", "topics", "other"]),
        JSONISH,
        max_size=6,
    )
    | JSONISH
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_hostile_json_never_gets_a_5xx_or_parks(fuzz_service: Service, body: Any) -> None:
    response = fuzz_service.client.post("/forms/signup", json=body)
    assert response.status_code in (202, 400, 422, 429), response.text
    raw = fuzz_service.client.post(
        "/forms/signup",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert raw.status_code < 500


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from nurture.store.db import make_engine, upgrade

    folder = tmp_path_factory.mktemp("capture-fuzz")
    engine = make_engine(f"sqlite:///{folder}/nurture.db")
    upgrade(engine)
    clock = Clock(datetime(2026, 3, 3, 10, 0, tzinfo=UTC))
    app = create_app(
        engine, secret=SECRET, clock=clock, webhook_secret=None, ingest_keys=[],
        spool_dir=folder / "spool", consent=SPEC,
    )  # fmt: skip
    # No rate limit in the way of the fuzzing: it is tested above.
    with (
        ThreadedServer(app) as server,
        httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client,
    ):
        for route in app.routes:
            owner = getattr(getattr(route, "endpoint", None), "__self__", None)
            if owner is not None and hasattr(owner, "by_ip"):
                owner.by_ip.limit = owner.by_address.limit = 10**9
        yield Service(client, clock, engine, app)
        assert app.state.spool.wait_drained(30)
        assert app.state.spool.parked == 0
    engine.dispose()
