"""Retention thins and strips old raw events while reports and scores read the same numbers;
the compliance lint wants the postal address when one is configured."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, insert, select

from nurture.engagement.scoring import score_all
from nurture.message.rendering import TemplateStore
from nurture.privacy.compliance import postal_address_problems
from nurture.privacy.retention import apply_retention
from nurture.reporting.report import campaign_funnels
from nurture.spec.schema import ScoringSpec
from nurture.store.consent import ConsentIn, record_consents
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Event, Lead
from nurture.tick import tick
from tests.helpers import TEMPLATES, add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

WELCOME = campaign("""
name: welcome
audience: {field: source, op: eq, value: website}
steps:
  - {id: welcome, template: b2b/welcome}
""")
RETAIL_ADDRESS = "Fern & Field Goods Co. · 1418 NW Lovejoy Street · Portland, OR 97209 · USA"


def _maker(did: int, lid: int, old: datetime) -> Callable[..., dict[str, object]]:
    def ev(
        kind: str, minutes: int, *, engagement: str, counted: bool, url: str | None = None
    ) -> dict[str, object]:
        return {
            "lead_id": lid, "delivery_id": did, "type": kind, "url": url,
            "occurred_at": old + timedelta(minutes=minutes), "engagement": engagement,
            "counted_human": counted and engagement == "human", "counted_any": counted,
            "payload": {"ip": "203.0.113.5", "user_agent": "UA-secret"},
            "external_id": f"x-{did}-{kind}-{minutes}",
        }  # fmt: skip

    return ev


def _engagement(engine: Engine, now: datetime) -> None:
    """Per delivery: opens and clicks, human and machine, first ones counted, repeats not."""
    old = now - timedelta(days=800)
    with session_scope(engine) as session:
        rows = []
        for did, lid in session.execute(select(Delivery.id, Delivery.lead_id)):
            ev = _maker(did, lid, old)
            rows += [
                ev("opened", 0, engagement="machine", counted=True),
                ev("opened", 1, engagement="machine", counted=False),
                ev("opened", 5, engagement="human", counted=False),
                ev("opened", 6, engagement="human", counted=False),
                ev("clicked", 7, engagement="human", counted=True, url="https://a.example/1"),
                ev("clicked", 8, engagement="human", counted=False, url="https://a.example/1"),
                ev("clicked", 9, engagement="human", counted=True, url="https://a.example/2"),
                # A recent repeat stays as it is.
                {**ev("opened", 0, engagement="human", counted=False),
                 "occurred_at": now - timedelta(days=3), "external_id": f"recent-{did}"},
            ]  # fmt: skip
        session.execute(insert(Event), rows)
        lead = session.scalar(select(Lead.id).order_by(Lead.id))
        assert lead is not None
        record_consents(session, [ConsentIn(lead, "*", "consent", ip="198.51.100.1",
                                            occurred_at=old)], old)  # fmt: skip


def _numbers(engine: Engine, now: datetime) -> dict[str, object]:
    out: dict[str, object] = {}
    for machine in (False, True):
        out[f"funnel-{machine}"] = [
            f.as_dict() for f in campaign_funnels(engine, count_machine=machine)
        ]
        score_all(engine, ScoringSpec(half_life=None, count_machine_engagement=machine), now)
        with session_scope(engine) as session:
            out[f"scores-{machine}"] = sorted(
                session.execute(select(Lead.email, Lead.behaviour_score)).all()
            )
    return out


def test_retention_keeps_every_count_and_drops_the_raw_detail(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    add_leads(engine, now, {"email": "a@x.example"}, {"email": "b@x.example"})
    tick(engine, now - timedelta(days=801), programme(WELCOME), mailer(smtp_server.url), worker="t")
    _engagement(engine, now)
    before = _numbers(engine, now)
    with session_scope(engine) as session:
        total = session.scalar(select(func.count()).select_from(Event))
    funnel = before["funnel-False"][0]  # type: ignore[index]
    assert (funnel["opened"], funnel["machine_opened"], funnel["clicked"]) == (2, 2, 2)

    result = apply_retention(engine, timedelta(days=730), now)
    # Per delivery: the repeated machine open, the second human open, the repeated click.
    assert result.deleted == 2 * 3
    assert _numbers(engine, now) == before
    with session_scope(engine) as session:
        left = session.execute(
            select(Event.type, Event.payload, Event.external_id, Event.occurred_at)
        ).all()
    assert len(left) == total - 6
    for etype, payload, xid, when in left:
        if etype == "consent_granted":
            assert payload["ip"] == "198.51.100.1"  # proof of consent is kept whole
        elif when < now - timedelta(days=730):
            assert (payload, xid) == ({}, None)
        else:
            assert payload["user_agent"] == "UA-secret"
    again = apply_retention(engine, timedelta(days=730), now)
    assert (again.deleted, again.stripped) == (0, 0)


def test_postal_address_lint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TemplateStore(TEMPLATES)
    assert postal_address_problems(store, None) == []
    problems = postal_address_problems(store, RETAIL_ADDRESS)
    failing = sorted(Path(p.file).stem.removesuffix(".html") for p in problems)
    # The retail footer shows this address; the B2B brand (and the lifecycle mail in its
    # layout) shows its own.
    assert {"breakup", "case_study_roi", "case_study_story", "demo_offer", "welcome"} <= set(
        failing
    )
    assert all("retail" not in p.file and p.severity == "error" for p in problems)

    from nurture.cli import cli
    from nurture.config import get_settings

    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    (campaigns / "consent.yaml").write_text(f"postal_address: {json.dumps(RETAIL_ADDRESS)}\n")
    monkeypatch.setenv("NURTURE_CAMPAIGNS", str(campaigns))
    monkeypatch.setenv("NURTURE_TEMPLATES", str(TEMPLATES))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        bad = runner.invoke(cli, ["templates", "lint", "b2b/welcome", "--json"])
        assert bad.exit_code == 1
        messages = [p["message"] for p in json.loads(bad.output)["problems"]]
        assert any("no postal address" in m for m in messages)
        ok = runner.invoke(cli, ["templates", "lint", "retail/welcome", "--json"])
        assert ok.exit_code == 0, ok.output
    finally:
        get_settings.cache_clear()


def test_the_unsubscribe_link_lint_still_holds(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "x").mkdir(parents=True)
    (root / "x" / "bare.html.j2").write_text(
        "{% block subject %}Hi{% endblock %}{% block body %}<p>no footer</p>"
        '<img src="{{ open_pixel_url }}">{% endblock %}'
    )
    problems = TemplateStore(root).lint("x/bare")
    assert any("no unsubscribe link" in p.message for p in problems)
