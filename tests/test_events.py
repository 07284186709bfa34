"""Recording engagement events: resolution, idempotency, suppression, and file import."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select

from nurture.cli.events import events as events_cli
from nurture.config import get_settings
from nurture.engagement.events import EventError, EventIn, parse_event, record_events
from nurture.store.db import session_scope
from nurture.store.models import Campaign, Delivery, Enrollment, Event, Lead, Suppression
from nurture.store.suppression import suppress


@dataclass(frozen=True)
class Seeded:
    """Ids of the rows :func:`seed` made."""

    lead_id: int
    other_lead_id: int
    delivery_id: int
    email: str
    message_id: str


def seed(engine: Engine, now: datetime, *, first_name: str = "Jane") -> Seeded:
    """One campaign, two leads, and one sent delivery to the first lead, made by hand."""
    with session_scope(engine) as s:
        lead = Lead(
            email="Jane.Doe@example.com", first_name=first_name, created_at=now, updated_at=now
        )
        other = Lead(email="bob@example.org", first_name="Bob", created_at=now, updated_at=now)
        campaign = Campaign(
            name="welcome", spec={}, spec_hash="0" * 64, created_at=now, updated_at=now
        )
        s.add_all([lead, other, campaign])
        s.flush()
        enrollment = Enrollment(
            campaign_id=campaign.id, lead_id=lead.id, step_id="welcome", enrolled_at=now
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
            message_id="<welcome.1@nurture.example>",
            due_at=now,
            queued_at=now,
            sent_at=now,
            updated_at=now,
        )
        s.add(delivery)
        s.flush()
        return Seeded(lead.id, other.id, delivery.id, lead.email, delivery.message_id)


def event_rows(engine: Engine) -> list[tuple[int, int | None, str, str | None, str | None]]:
    """(lead_id, delivery_id, type, url, external_id) of every event, in insertion order."""
    with session_scope(engine) as s:
        return [
            tuple(r)  # type: ignore[misc]
            for r in s.execute(
                select(
                    Event.lead_id, Event.delivery_id, Event.type, Event.url, Event.external_id
                ).order_by(Event.id)
            )
        ]


def suppressions(engine: Engine) -> dict[str, tuple[str, str | None]]:
    """email -> (reason, source)."""
    with session_scope(engine) as s:
        rows = s.execute(select(Suppression.email, Suppression.reason, Suppression.source))
        return {email: (reason, source) for email, reason, source in rows}


def test_resolves_leads_by_delivery_lead_id_and_email(engine: Engine, now: datetime) -> None:
    ids = seed(engine, now)
    batch = [
        EventIn("opened", now, delivery_id=ids.delivery_id),
        EventIn("page_view", now, lead_id=ids.other_lead_id, url="https://x.example/a"),
        EventIn("form_submit", now, email="jane.doe@EXAMPLE.com"),  # case-insensitive fallback
        EventIn("clicked", now, email="  Jane.Doe@example.com "),
        EventIn("page_view", now, email="stranger@example.net"),
        EventIn("page_view", now, lead_id=999_999),
        EventIn("opened", now, delivery_id=999_999),
        # An unknown delivery id is dropped, the lead still resolves by email.
        EventIn("opened", now, delivery_id=888_888, email="bob@example.org"),
    ]
    with session_scope(engine) as s:
        result = record_events(s, batch, now=now)
    assert (result.inserted, result.duplicates, result.unknown_lead) == (5, 0, 3)
    assert result.unknown_indices == (4, 5, 6)
    rows = event_rows(engine)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (ids.lead_id, ids.delivery_id, "opened"),
        (ids.other_lead_id, None, "page_view"),
        (ids.lead_id, None, "form_submit"),
        (ids.lead_id, None, "clicked"),
        (ids.other_lead_id, None, "opened"),
    ]


def test_idempotent_by_external_id(engine: Engine, now: datetime) -> None:
    ids = seed(engine, now)
    batch = [
        EventIn("clicked", now, lead_id=ids.lead_id, external_id="e1", url="https://a.example"),
        EventIn("clicked", now, lead_id=ids.lead_id, external_id="e1", url="https://b.example"),
        EventIn("opened", now, lead_id=ids.lead_id, external_id="e2"),
    ]
    with session_scope(engine) as s:
        first = record_events(s, batch, now=now)
    with session_scope(engine) as s:
        second = record_events(s, batch, now=now)
    assert (first.inserted, first.duplicates) == (2, 1)
    assert (second.inserted, second.duplicates) == (0, 3)
    assert [(r[2], r[3], r[4]) for r in event_rows(engine)] == [
        ("clicked", "https://a.example", "e1"),
        ("opened", None, "e2"),
    ]


def test_suppression_side_effects(engine: Engine, now: datetime) -> None:
    ids = seed(engine, now)
    batch = [
        EventIn("unsubscribed", now, delivery_id=ids.delivery_id),
        EventIn("bounced", now, lead_id=ids.other_lead_id, payload={"hard": False}),
        # Suppression wins even without a lead: the address is refused if imported later.
        EventIn("complained", now, email="Nobody@Example.NET"),
        EventIn("bounced", now, email="gone@example.net", payload={"hard": True}),
    ]
    with session_scope(engine) as s:
        result = record_events(s, batch, now=now)
    assert result.suppressed == 3
    assert suppressions(engine) == {
        ids.email: ("unsubscribed", "event:unsubscribed"),
        "nobody@example.net": ("complained", "event:complained"),
        "gone@example.net": ("bounced", "event:bounced"),
    }
    with session_scope(engine) as s:
        again = record_events(s, batch, now=now + timedelta(hours=1))
        assert again.suppressed == 0
        assert s.scalar(select(func.count()).select_from(Suppression)) == 3


def test_suppress_helper_is_bulk_and_idempotent(engine: Engine, now: datetime) -> None:
    with session_scope(engine) as s:
        assert suppress(s, ["a@x.example", "b@x.example", "a@x.example", " "], "manual", "cli", now)
    with session_scope(engine) as s:
        assert suppress(s, ["b@x.example", "c@x.example"], "manual", "cli", now) == 1
    assert set(suppressions(engine)) == {"a@x.example", "b@x.example", "c@x.example"}


def test_large_batch_is_chunked(engine: Engine, now: datetime) -> None:
    ids = seed(engine, now)
    batch = [EventIn("page_view", now, email=ids.email, external_id=f"pv-{i}") for i in range(2500)]
    with session_scope(engine) as s:
        assert record_events(s, batch, now=now).inserted == 2500
    with session_scope(engine) as s:
        assert record_events(s, batch, now=now).duplicates == 2500


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"type": "Opened"}, "type"),
        ({"type": "x" * 33}, "type"),
        ({"type": "drop table"}, "type"),
        ({"occurred_at": datetime(2026, 1, 1)}, "occurred_at"),
        ({"email": None, "lead_id": None}, "email"),
        ({"email": "not-an-email"}, "email"),
        ({"lead_id": True}, "lead_id"),
        ({"lead_id": -1}, "lead_id"),
        ({"external_id": ""}, "id"),
        ({"payload": {"x": object()}}, "payload.x"),
        ({"lead_id": 2**63}, "lead_id"),
        ({"occurred_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))}, "occurred_at"),
        ({"occurred_at": datetime(1969, 12, 31, tzinfo=UTC)}, "occurred_at"),
        # What PostgreSQL cannot store must fail here, with the field named, not in the INSERT.
        ({"url": "https://x.example/\x00"}, "url"),
        ({"external_id": "a\x00b"}, "id"),
        ({"payload": {"note": "\ud800"}}, "payload.note"),
        ({"payload": {"n": float("nan")}}, "payload.n"),
        (
            {"payload": {"a": [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}},
            "payload.a[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]",
        ),
    ],
)
def test_eventin_validation(kwargs: dict[str, object], field: str, now: datetime) -> None:
    base: dict[str, object] = {"type": "opened", "occurred_at": now, "email": "a@b.example"}
    with pytest.raises(EventError) as info:
        EventIn(**{**base, **kwargs})  # type: ignore[arg-type]
    assert info.value.field == field


def test_custom_types_are_accepted(now: datetime) -> None:
    assert EventIn("webinar_attended", now, lead_id=1).type == "webinar_attended"


def test_parse_event() -> None:
    event = parse_event(
        {"id": 17, "type": "page_view", "email": "a@b.example",
         "occurred_at": "2026-03-03T10:00:00Z", "payload": {"path": "/pricing"}}
    )  # fmt: skip
    assert event.external_id == "17"
    assert event.occurred_at.utcoffset() == timedelta(0)
    with pytest.raises(EventError, match=r"occurred_at.*UTC offset"):
        parse_event({"type": "opened", "lead_id": 1, "occurred_at": "2026-03-03T10:00:00"})
    with pytest.raises(EventError, match="colour: unknown field"):
        parse_event({"type": "opened", "lead_id": 1, "occurred_at": "2026-03-03", "colour": 1})


# -- nurture events import ---------------------------------------------------------------


@pytest.fixture
def cli_env(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """Point the CLI's settings at the test database."""
    monkeypatch.setenv("NURTURE_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    yield engine  # type: ignore[misc]
    get_settings.cache_clear()


def _write_jsonl(path: Path, email: str) -> None:
    lines = [
        json.dumps({"id": "a1", "type": "page_view", "email": email,
                    "occurred_at": "2026-03-01T09:00:00Z", "url": "https://x.example/"}),
        "",
        "{not json",
        json.dumps({"id": "a2", "type": "demo_request", "email": email,
                    "occurred_at": "2026-03-01T09:05:00+01:00"}),
        json.dumps({"id": "a3", "type": "Page View", "email": email,
                    "occurred_at": "2026-03-01T09:00:00Z"}),
        json.dumps({"id": "a4", "type": "opened", "email": "nobody@nowhere.example",
                    "occurred_at": "2026-03-01T09:00:00Z"}),
        json.dumps({"id": "a5", "type": "opened", "email": email, "occurred_at": "yesterday"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "a6", "type": "unsubscribed", "email": email,
                    "occurred_at": "2026-03-01T10:00:00Z"}),
    ]  # fmt: skip
    data = "\n".join(lines).encode() + b"\n" + b'{"id": "\xff\xfe"}\n'
    path.write_bytes(b"\xef\xbb\xbf" + data)  # a BOM, as editors on Windows write


def test_events_import_cli(cli_env: Engine, now: datetime, tmp_path: Path) -> None:
    ids = seed(cli_env, now)
    path = tmp_path / "events.jsonl"
    _write_jsonl(path, ids.email)
    runner = CliRunner()

    first = runner.invoke(events_cli, ["import", str(path), "--json", "--batch-size", "2"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["lines"] == 10
    assert (report["inserted"], report["duplicates"], report["unknown_lead"]) == (3, 0, 1)
    assert report["unknown_lead_lines"] == [6]
    assert [(b["line"], b["field"]) for b in report["bad"]] == [
        (3, "line"), (5, "type"), (7, "occurred_at"), (8, "event"), (10, "line"),
    ]  # fmt: skip
    assert "not UTF-8" in report["bad"][-1]["reason"]
    assert report["suppressed"] == 1
    assert [r[4] for r in event_rows(cli_env)] == ["a1", "a2", "a6"]
    assert suppressions(cli_env) == {ids.email: ("unsubscribed", "event:unsubscribed")}

    # Re-importing the same file adds nothing.
    again = runner.invoke(events_cli, ["import", str(path), "--json"])
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert (report["inserted"], report["duplicates"]) == (0, 3)
    assert len(event_rows(cli_env)) == 3

    human = runner.invoke(events_cli, ["import", str(path)])
    assert human.exit_code == 0
    assert "0 inserted" in human.output
    assert "skipped lines" in human.output and "not valid JSON" in human.output
