"""People, not machines, end to end in the database: record-time classification and
re-classification, scoring counts, event rules, reports and explain (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from alembic import command
from click.testing import CliRunner
from pydantic import TypeAdapter
from sqlalchemy import Engine, select, text

from nurture.cli import cli, common
from nurture.config import get_settings
from nurture.engagement.events import EventIn, reclassify_deliveries, record_events
from nurture.engagement.scoring import score_all
from nurture.journey.segments import RuleContext, compile_rule
from nurture.message.compose import compose_message, with_honeypot
from nurture.message.rendering import TemplateStore
from nurture.message.tokens import verify_click
from nurture.reporting.explain import explain_lead
from nurture.reporting.html_report import render_html
from nurture.reporting.report import build_report, campaign_funnels, report_tables
from nurture.spec.rules import Rule
from nurture.spec.schema import PipelineSpec, ScoringSpec
from nurture.store.db import alembic_config, session_scope
from nurture.store.models import Campaign, Delivery, Enrollment, Event, Lead
from tests.helpers import SECRET, TEMPLATES

SENT = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
HP = "https://track.example/_nurture/hp"
SCANNER = {"user_agent": "Mozilla/5.0 (compatible; Proofpoint URL Defense)", "ip": "203.0.113.7"}
PERSON = {
    "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/122.0.0.0 Safari/537.36",
    "ip": "198.51.100.20",
    "method": "GET",
}
NO_DECAY = ScoringSpec(points={"opened": 2, "clicked": 5, "replied": 15}, half_life=None)


def seed(engine: Engine, leads: int = 1) -> list[int]:
    """A campaign with one step and one sent delivery per lead (sent at SENT); delivery ids."""
    with session_scope(engine) as s:
        campaign = Campaign(
            name="welcome",
            spec={"steps": [{"id": "welcome"}]},
            spec_hash="0" * 64,
            created_at=SENT,
            updated_at=SENT,
        )
        s.add(campaign)
        s.flush()
        ids = []
        for n in range(leads):
            lead = Lead(email=f"p{n}@example.com", created_at=SENT, updated_at=SENT)
            s.add(lead)
            s.flush()
            enrollment = Enrollment(
                campaign_id=campaign.id, lead_id=lead.id, step_id="welcome", enrolled_at=SENT
            )
            s.add(enrollment)
            s.flush()
            delivery = Delivery(
                enrollment_id=enrollment.id,
                campaign_id=campaign.id,
                lead_id=lead.id,
                step_id="welcome",
                template="b2b/welcome",
                domain="example.com",
                status="sent",
                message_id=f"<m{n}@nurture.example>",
                due_at=SENT,
                queued_at=SENT,
                sent_at=SENT,
                updated_at=SENT,
            )
            s.add(delivery)
            s.flush()
            ids.append(delivery.id)
        return ids


def record(engine: Engine, *events: EventIn) -> None:
    with session_scope(engine) as s:
        record_events(s, list(events), now=SENT + timedelta(days=1))


def click(
    delivery: int, seconds: float, url: str, payload: dict[str, Any] | None = None
) -> EventIn:
    return EventIn(
        "clicked",
        SENT + timedelta(seconds=seconds),
        delivery_id=delivery,
        url=url,
        payload=PERSON if payload is None else payload,
    )


def opened(delivery: int, seconds: float, payload: dict[str, Any] | None = None) -> EventIn:
    return EventIn(
        "opened",
        SENT + timedelta(seconds=seconds),
        delivery_id=delivery,
        payload=PERSON if payload is None else payload,
    )


def classes(engine: Engine) -> list[tuple[str, str | None, str | None, bool, bool]]:
    """(type, engagement, reason, counted_human, counted_any) of every event, in id order."""
    with session_scope(engine) as s:
        return [
            (r.type, r.engagement, r.engagement_reason, r.counted_human, r.counted_any)
            for r in s.execute(
                select(
                    Event.type,
                    Event.engagement,
                    Event.engagement_reason,
                    Event.counted_human,
                    Event.counted_any,
                ).order_by(Event.id)
            )
        ]


def behaviour(engine: Engine, spec: ScoringSpec, now: datetime) -> float:
    score_all(engine, spec, now)
    with session_scope(engine) as s:
        return float(s.scalars(select(Lead.behaviour_score)).one())


def test_request_signals_are_stored_at_record_time(engine: Engine) -> None:
    (d,) = seed(engine)
    record(
        engine,
        opened(d, 600, {**PERSON, "method": "HEAD"}),
        opened(d, 700, {**PERSON, "ip": "17.58.12.3"}),
        opened(d, 800, {**PERSON, "prefetch": True}),
        click(d, 900, "https://shop.example/", SCANNER),
        opened(d, 1000),
        EventIn("replied", SENT + timedelta(hours=1), delivery_id=d),
    )
    assert classes(engine) == [
        ("opened", "machine", "head-request", False, True),
        ("opened", "machine", "network:apple-mpp", False, False),
        ("opened", "machine", "prefetch", False, False),
        ("clicked", "machine", "user-agent:Proofpoint", False, True),
        ("opened", "human", None, True, False),
        ("replied", None, None, True, True),
    ]


def test_a_burst_recognised_on_its_third_click_marks_the_first_two(engine: Engine) -> None:
    (d,) = seed(engine)
    # Each click in its own batch, as the tracking writer may deliver them.
    record(engine, click(d, 60.0, "https://a.example/"))
    record(engine, click(d, 60.4, "https://b.example/"))
    assert [c[1] for c in classes(engine)] == ["human", "human"]
    record(engine, click(d, 60.8, "https://c.example/"))
    assert classes(engine) == [("clicked", "machine", "link-burst", False, True)] * 3
    # The person clicks one of the links half an hour later: that click counts.
    record(engine, click(d, 1800, "https://a.example/"))
    assert classes(engine)[-1] == ("clicked", "human", None, True, False)


def test_a_honeypot_hit_marks_the_whole_burst_of_its_delivery_only(engine: Engine) -> None:
    d, other = seed(engine, leads=2)
    record(
        engine,
        opened(d, 20),
        click(d, 20.5, "https://a.example/"),
        click(other, 21, "https://a.example/"),
    )
    assert [c[1] for c in classes(engine)] == ["human", "human", "human"]
    record(engine, click(d, 40, HP))
    assert classes(engine) == [
        ("opened", "machine", "honeypot-burst", False, True),
        ("clicked", "machine", "honeypot-burst", False, True),
        ("clicked", "human", None, True, True),  # another delivery: untouched
        ("clicked", "machine", "honeypot", False, True),
    ]


def test_too_fast_after_the_send(engine: Engine) -> None:
    (d,) = seed(engine)
    record(engine, opened(d, 0.8), click(d, 3, "https://a.example/"), click(d, 9, "https://b/"))
    assert [c[2] for c in classes(engine)] == ["too-fast:0.8s", "too-fast:3.0s", None]


def test_fifty_repeated_opens_score_as_one(engine: Engine) -> None:
    (d,) = seed(engine)
    # A minute apart: a person re-reading (50 within a minute would be a flood, all machine).
    record(engine, *(opened(d, 3600 + 60 * i) for i in range(50)))
    now = SENT + timedelta(days=1)
    assert behaviour(engine, NO_DECAY, now) == 2.0
    decaying = ScoringSpec(points={"opened": 2}, half_life="1d")
    # Decay still applies, to the first open (23 h old at now).
    expected = 2.0 * 0.5 ** ((86400 - 3600) / 86400)
    assert behaviour(engine, decaying, now) == pytest.approx(expected, rel=1e-9)


def test_a_scanner_burst_adds_nothing_and_the_person_after_it_counts(engine: Engine) -> None:
    (d,) = seed(engine)
    links = ["https://a.example/", "https://b.example/", "https://c.example/", HP]
    record(
        engine,
        opened(d, 0.5, SCANNER),
        *(click(d, 0.6 + i * 0.1, url, SCANNER) for i, url in enumerate(links)),
    )
    now = SENT + timedelta(days=1)
    assert behaviour(engine, NO_DECAY, now) == 0.0
    # Scored with machines: one open and one click per link (the honeypot included).
    with_machines = NO_DECAY.model_copy(update={"count_machine_engagement": True})
    assert behaviour(engine, with_machines, now) == 2.0 + 4 * 5.0
    # The person opens and clicks two links, one of them twice, hours later.
    record(
        engine,
        opened(d, 7200),
        click(d, 7300, links[0]),
        click(d, 7400, links[0]),
        click(d, 7500, links[1]),
    )
    assert behaviour(engine, NO_DECAY, now) == 2.0 + 5.0 + 5.0
    assert behaviour(engine, with_machines, now) == 2.0 + 4 * 5.0


RULE: TypeAdapter[Any] = TypeAdapter(Rule)


def matching(engine: Engine, data: dict[str, Any]) -> set[str]:
    ctx = RuleContext(now=SENT + timedelta(days=1))
    with session_scope(engine) as s:
        query = select(Lead.email).where(compile_rule(RULE.validate_python(data), ctx))
        return set(s.scalars(query))


def test_event_rules_ignore_machines_unless_asked(engine: Engine) -> None:
    scanned, person = seed(engine, leads=2)
    record(
        engine,
        *(click(scanned, 1 + i * 0.1, f"https://{i}.example/", SCANNER) for i in range(3)),
        opened(scanned, 0.3, {"user_agent": "Mozilla/5.0", "ip": "17.0.0.9"}),
        click(person, 3600, "https://1.example/"),
    )
    assert matching(engine, {"event": "clicked"}) == {"p1@example.com"}
    assert matching(engine, {"event": "opened"}) == set()
    assert matching(engine, {"event": "clicked", "engagement": "any"}) == {
        "p0@example.com",
        "p1@example.com",
    }
    assert matching(engine, {"event": "opened", "engagement": "any"}) == {"p0@example.com"}
    assert matching(engine, {"event": "clicked", "op": "eq", "count": 0}) == {"p0@example.com"}
    assert matching(engine, {"event": "clicked", "engagement": "any", "count": 3}) == {
        "p0@example.com"
    }


def test_reports_split_people_and_machines_per_step(engine: Engine) -> None:
    d = seed(engine, leads=4)
    record(
        engine,
        # 0: a gateway clicks everything at delivery, the person clicks later.
        *(click(d[0], 0.5 + i * 0.1, u, SCANNER) for i, u in enumerate(["https://a/", HP])),
        opened(d[0], 5000),
        click(d[0], 5100, "https://a/"),
        # 1: an Apple MPP pixel fetch only.
        opened(d[1], 1, {"user_agent": "Mozilla/5.0", "ip": "17.33.1.1"}),
        # 2: a person who opens twice.
        opened(d[2], 4000),
        opened(d[2], 9000),
    )
    report = build_report(engine, PipelineSpec())
    (row,) = report.steps
    assert (row.sent, row.opened, row.clicked) == (4, 2, 1)
    assert (row.machine_opened, row.machine_clicked) == (1, 1)
    counted = build_report(engine, PipelineSpec(), count_machine=True)
    (all_row,) = counted.steps
    assert (all_row.opened, all_row.clicked) == (3, 1)
    assert (all_row.machine_opened, all_row.machine_clicked) == (1, 1)
    # JSON, terminal/markdown and HTML tables all carry the split.
    data = json.loads(json.dumps(report.as_dict(), default=str))
    assert data["steps"][0]["machine_opened"] == 1 and data["steps"][0]["machine_clicked"] == 1
    assert data["count_machine"] is False
    steps = next(t for t in report_tables(report) if t.title == "Campaign steps")
    assert steps.columns[-2:] == ["machine opens", "machine clicks"]
    assert steps.rows[0][-2:] == ["1", "1"]
    assert "people only" in steps.note
    html = render_html(report)
    assert "machine opens" in html and "machine clicks" in html
    (funnel,) = campaign_funnels(engine)
    assert (funnel.opened, funnel.clicked, funnel.machine_opened, funnel.machine_clicked) == (
        2,
        1,
        1,
        1,
    )


def test_explain_lists_what_scoring_leaves_out_and_still_adds_up(engine: Engine) -> None:
    (d,) = seed(engine)
    record(
        engine,
        click(d, 1, "https://a/", SCANNER),
        opened(d, 4000),
        opened(d, 4100),
        click(d, 4200, "https://a/"),
        click(d, 4300, "https://a/"),
    )
    spec = ScoringSpec(points={"opened": 2, "clicked": 5}, half_life="7d")
    now = SENT + timedelta(days=2)
    score_all(engine, spec, now)
    ex = explain_lead(engine, "p0@example.com", spec, now)
    assert [e.type for e in ex.events] == ["opened", "clicked"]
    with session_scope(engine) as s:
        stored = s.scalars(select(Lead.behaviour_score)).one()
    assert ex.behaviour == pytest.approx(stored, abs=1e-9)
    assert ex.behaviour == pytest.approx(
        2 * 0.5 ** ((2 * 86400 - 4000) / (7 * 86400))
        + 5 * 0.5 ** ((2 * 86400 - 4200) / (7 * 86400))
    )
    assert [(x.type, x.reason) for x in ex.excluded] == [
        ("clicked", "machine: user-agent:Proofpoint,too-fast:1.0s"),
        ("opened", "repeat: one open per delivery counts"),
        ("clicked", "repeat: one click per link per delivery counts"),
    ]
    assert ex.as_dict()["excluded"][0]["occurred_at"] == (SENT + timedelta(seconds=1)).isoformat()


def _part(message: Message, kind: str) -> str:
    for part in message.walk():
        if part.get_content_type() == kind:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode()
    raise AssertionError(f"no {kind} part")


def test_every_tracked_html_message_carries_one_invisible_honeypot() -> None:
    settings = SimpleNamespace(
        store=TemplateStore(TEMPLATES),
        from_address="N <hello@nurture.example>",
        secret=SECRET,
        tracking_url="https://track.example/",
        track=True,
        unsubscribe_mailto=None,
        skeletons=True,
    )
    row = SimpleNamespace(
        id=41, lead_id=7, email="ann@example.com", first_name="Ann", last_name="Lee",
        company="Acme", source="website", country="US", lifecycle_stage="lead", attributes={},
        campaign="welcome", step_id="welcome", template="b2b/welcome",
        message_id="<m41@nurture.example>",
    )  # fmt: skip
    message = message_from_bytes(compose_message(settings, row, SENT))
    html, text = _part(message, "text/html"), _part(message, "text/plain")
    assert html.count('aria-hidden="true" tabindex="-1"') == 1
    start = html.index('aria-hidden="true" tabindex="-1"')
    anchor = html[html.rindex("<a ", 0, start) : html.index("</a>", start) + 4]
    assert "display:none" in anchor and "mso-hide:all" in anchor
    assert anchor.endswith("></a>")  # no text to see or to read aloud
    href = anchor.split('href="', 1)[1].split('"', 1)[0]
    assert verify_click(href.rsplit("/c/", 1)[1], SECRET) == (41, HP)
    assert html.index(anchor) < html.lower().rindex("</body>")
    assert "_nurture" not in text and href not in text
    assert "aria-hidden" not in text
    # Untracked mail has none.
    settings.track = False
    plain = message_from_bytes(compose_message(settings, row, SENT))
    assert "aria-hidden" not in _part(plain, "text/html")


def test_with_honeypot_without_a_body_tag_appends() -> None:
    assert with_honeypot("<p>hi</p>", "https://t/c/x?a=1&b=2").startswith("<p>hi</p><a ")
    assert "a=1&amp;b=2" in with_honeypot("<p>hi</p>", "https://t/c/x?a=1&b=2")
    assert with_honeypot("<BODY>x</BODY>", "u").endswith('"></a></BODY>')


def test_migration_keeps_one_open_per_delivery_and_one_click_per_link(
    engine: Engine,
) -> None:
    """Events stored before 0005: repeats stop counting, the rest is people's."""
    command.downgrade(alembic_config(engine), "0004")
    (d,) = seed_raw(engine)
    rows = [
        ("opened", 100, None),
        ("opened", 50, None),  # the earliest open counts, whatever the insertion order
        ("clicked", 200, "https://a/"),
        ("clicked", 300, "https://a/"),
        ("clicked", 300, "https://b/"),
        ("replied", 400, None),
        ("replied", 500, None),
    ]
    with engine.begin() as conn:
        for kind, seconds, url in rows:
            conn.execute(
                text(
                    "INSERT INTO events (lead_id, delivery_id, type, occurred_at, url, payload) "
                    "SELECT lead_id, id, :t, :at, :u, '{}' FROM deliveries WHERE id = :d"
                ),
                {
                    "t": kind,
                    "at": (SENT + timedelta(seconds=seconds)).replace(tzinfo=None),
                    "u": url,
                    "d": d,
                },
            )
    command.upgrade(alembic_config(engine), "head")
    assert classes(engine) == [
        ("opened", "human", None, False, False),
        ("opened", "human", None, True, True),
        ("clicked", "human", None, True, True),
        ("clicked", "human", None, False, False),
        ("clicked", "human", None, True, True),
        ("replied", None, None, True, True),
        ("replied", None, None, True, True),
    ]


def seed_raw(engine: Engine) -> list[int]:
    """:func:`seed` in plain SQL, for a schema older than the models."""
    with engine.begin() as conn:
        stamp = SENT.replace(tzinfo=None)
        conn.execute(
            text(
                "INSERT INTO campaigns (name, spec, spec_hash, version, active, created_at, "
                "updated_at) VALUES ('welcome', '{}', :h, 1, true, :n, :n)"
            ),
            {"h": "0" * 64, "n": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO leads (email, source, lifecycle_stage, attributes, behaviour_score, "
                "fit_score, created_at, updated_at) "
                "VALUES ('p0@example.com', 'import', 'subscriber', '{}', 0, 0, :n, :n)"
            ),
            {"n": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO enrollments (campaign_id, lead_id, cycle, status, step_id, "
                "enrolled_at) SELECT c.id, l.id, 1, 'active', 'welcome', :n "
                "FROM campaigns c, leads l"
            ),
            {"n": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO deliveries (enrollment_id, campaign_id, lead_id, step_id, template, "
                "domain, status, message_id, attempts, due_at, queued_at, sent_at, updated_at) "
                "SELECT e.id, e.campaign_id, e.lead_id, 'welcome', 'b2b/welcome', "
                "'example.com', 'sent', '<m0@x>', 0, :n, :n, :n, :n FROM enrollments e"
            ),
            {"n": stamp},
        )
        return [int(i) for i in conn.execute(text("SELECT id FROM deliveries")).scalars()]


def test_cli_explain_shows_what_is_not_counted(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NURTURE_DATABASE_URL", str(sqlite_engine.url))
    monkeypatch.setattr(common.console, "width", 200)
    get_settings.cache_clear()
    try:
        (d,) = seed(sqlite_engine)
        record(
            sqlite_engine,
            click(d, 1, "https://x.example/[/]", SCANNER),  # rich markup in a URL
            opened(d, 4000),
            opened(d, 4100),
        )
        path = tmp_path / "scoring.yaml"
        path.write_text("points: {opened: 2, clicked: 5}\nhalf_life: null\n")
        now = (SENT + timedelta(days=1)).isoformat()
        args = ["leads", "explain", "p0@example.com", "--scoring", str(path), "--now", now]
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
        assert "not counted" in out.output
        assert "https://x.example/[/]" in out.output
        assert "machine: user-agent:Proofpoint,too-fast:1.0s" in out.output
        assert "repeat: one open per delivery counts" in out.output
        data = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
        assert data["behaviour"] == 2.0
        assert [x["type"] for x in data["excluded"]] == ["clicked", "opened"]
    finally:
        get_settings.cache_clear()


def test_incremental_classification_equals_a_full_one(engine: Engine) -> None:
    """Batches arriving in any order and any size, re-classified by window only, end
    exactly where classifying every event of the delivery from scratch ends."""
    ids = seed(engine, leads=3)
    rng = random.Random(5)
    urls = ["https://a/", "https://b/", "https://c/", "https://d/", HP]
    payloads = [PERSON, PERSON, PERSON, SCANNER, {**PERSON, "method": "HEAD"}]
    for scenario in range(12):
        events = []
        for _ in range(rng.randint(1, 40)):
            # Clusters of activity: at delivery, a few minutes later, hours later.
            base = rng.choice([0, 0.5, 90, 200, 3600, 7200])
            at = base + rng.random() * rng.choice([0.8, 3, 120])
            d = rng.choice(ids)
            payload = rng.choice(payloads)
            if rng.random() < 0.35:
                events.append(opened(d, at, payload))
            else:
                events.append(click(d, at, rng.choice(urls), payload))
        rng.shuffle(events)  # out of order, as several tracking hosts deliver them
        while events:
            size = rng.randint(1, 8)
            record(engine, *events[:size])
            events = events[size:]
        with session_scope(engine) as s:
            assert reclassify_deliveries(s, ids) == 0, f"scenario {scenario}"


def test_a_hammered_link_is_a_flood_and_never_counts(engine: Engine) -> None:
    first, second = seed(engine, leads=2)
    # A person opens once; then one link of the same message is requested 40 times within
    # half a minute, in one batch; the other delivery gets two ordinary clicks.
    record(engine, opened(first, 3600))
    url = "https://acme.example/pricing"
    hammer = [click(first, 4000 + i * 0.5, url) for i in range(40)]
    record(engine, *hammer, click(second, 4000, url), click(second, 4100, url))
    rows = classes(engine)
    assert rows[0] == ("opened", "human", None, True, True)  # the person's open still counts
    flood = rows[1:41]
    assert all(r[:3] == ("clicked", "machine", "flood") and not r[3] and not r[4] for r in flood)
    # The other delivery was classified as usual: two clicks of one link, the first counted.
    assert rows[41] == ("clicked", "human", None, True, True)
    assert rows[42] == ("clicked", "human", None, False, False)


def test_many_events_of_one_delivery_spread_over_weeks_are_no_flood(engine: Engine) -> None:
    (delivery,) = seed(engine)
    url = "https://acme.example/pricing"
    record(engine, *(click(delivery, 3600 + i * 86400, url) for i in range(25)))
    rows = classes(engine)
    assert {r[1] for r in rows} == {"human"}
    assert sum(r[3] for r in rows) == 1  # one click per link counts
