"""Goals in pipeline.yaml: periods, each metric's actual figure, pace and verdict, and where
they show (terminal tables, markdown for the Prefect artifact, HTML)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from nurture.reporting.goals import evaluate_goals, period_bounds
from nurture.reporting.html_report import write_html
from nurture.reporting.report import build_report, report_markdown, report_tables
from nurture.spec.schema import GoalSpec, PipelineSpec, SpecErrors, load_pipeline
from nurture.store.db import session_scope
from nurture.store.models import Campaign, Delivery, Enrollment, StageTransition
from tests.helpers import add_leads

MARCH_11 = datetime(2026, 3, 11, 0, 0, tzinfo=UTC)  # 10 of March's 31 days gone


def d(day: int, hour: int = 0, minute: int = 0, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("per", "now", "start", "end"),
    [
        ("day", d(11, 15), d(11), d(12)),
        ("week", d(11, 15), d(9), d(16)),  # Wednesday -> Monday to Monday
        ("month", d(11, 15), d(1), d(1, month=4)),
        (
            "month",
            datetime(2026, 12, 31, 23, tzinfo=UTC),
            d(1, month=12),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        ("quarter", d(11, 15, month=2), d(1, month=1), d(1, month=4)),
        ("quarter", d(5, month=11), d(1, month=10), datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_period_bounds(per: str, now: datetime, start: datetime, end: datetime) -> None:
    assert period_bounds(per, now) == (start, end)


def _campaign(engine: Engine) -> int:
    with session_scope(engine) as session:
        row = Campaign(name="c", spec={}, spec_hash="x", created_at=d(1), updated_at=d(1))
        session.add(row)
        session.flush()
        return row.id


def _sent(engine: Engine, campaign_id: int, lead_id: int, at: datetime) -> None:
    with session_scope(engine) as session:
        enrollment = Enrollment(
            campaign_id=campaign_id, lead_id=lead_id, step_id=None, enrolled_at=at
        )
        session.add(enrollment)
        session.flush()
        session.add(
            Delivery(
                enrollment_id=enrollment.id,
                campaign_id=campaign_id,
                lead_id=lead_id,
                step_id="welcome",
                template="b2b/welcome",
                domain="example.com",
                status="sent",
                message_id=f"<{lead_id}@test>",
                due_at=at,
                queued_at=at,
                sent_at=at,
                updated_at=at,
            )
        )


def _moved(engine: Engine, lead_id: int, to: str, at: datetime, cause: str) -> None:
    with session_scope(engine) as session:
        session.add(
            StageTransition(
                lead_id=lead_id, from_stage="mql", to_stage=to, occurred_at=at, cause=cause
            )
        )


@pytest.fixture
def world(engine: Engine) -> Engine:
    """Four leads captured in March (one in February), with emails and touches."""
    cid = _campaign(engine)
    feb = add_leads(engine, d(20, month=2), {"email": "feb@example.com"})[0]
    march = [add_leads(engine, d(2, 9), {"email": f"m{i}@example.com"})[0] for i in range(4)]
    _sent(engine, cid, feb, d(20, 0, 5, month=2))  # fast, but captured last month
    _sent(engine, cid, march[0], d(2, 9, 10))  # 10 min
    _sent(engine, cid, march[1], d(2, 9, 59))  # 59 min
    _sent(engine, cid, march[2], d(2, 11))  # 2 h
    # march[3]: never mailed
    _moved(engine, march[0], "sql", d(2, 9, 20), "crm pull via local")  # a rep, 20 min
    _moved(engine, march[1], "sql", d(3), "crm pull via hubspot")  # a rep, next day
    _moved(engine, march[2], "mql", d(2, 9, 5), "promoted via local")  # automation, not a rep
    _moved(engine, march[2], "sql", d(4), "crm pull via local")
    _moved(engine, march[3], "sql", d(12), "crm pull via local")  # after now: not counted
    _moved(engine, feb, "sql", d(27, month=2), "crm pull via local")  # last month
    return engine


def test_each_metric_with_pace_and_verdict(world: Engine) -> None:
    goals = [
        GoalSpec(metric="stage_entered", stage="sql", target=9),  # 3 by day 10: pace 9.3
        GoalSpec(metric="stage_entered", stage="sql", target=10),
        GoalSpec(metric="stage_entered", stage="sql", target=3, name="three SQLs"),
        GoalSpec(metric="speed_to_lead_within_1h", target=0.5),
        GoalSpec(metric="speed_to_lead_within_1h", target=0.8),
        GoalSpec(metric="human_touch_within_1h", target=0.2),
        GoalSpec(metric="stage_entered", stage="sql", per="day", target=1),
        GoalSpec(metric="human_touch_within_1h", per="day", target=0.5),
    ]
    with session_scope(world) as session:
        rows = evaluate_goals(session, goals, MARCH_11)
    got = [(r.goal, r.actual, round(r.projected or 0, 2), r.status, r.basis) for r in rows]
    assert got == [
        ("sql entered per month", 3.0, 9.3, "on track", 3),
        ("sql entered per month", 3.0, 9.3, "at risk", 3),
        ("three SQLs", 3.0, 9.3, "met", 3),
        ("speed to lead within 1h (month)", 0.5, 0.5, "on track", 4),
        ("speed to lead within 1h (month)", 0.5, 0.5, "at risk", 4),
        ("human touch within 1h (month)", 0.25, 0.25, "on track", 4),
        ("sql entered per day", 0.0, 0.0, "at risk", 0),
        ("human touch within 1h (day)", None, 0, "no data", 0),
    ]
    assert rows[0].elapsed_share == pytest.approx(10 / 31)
    assert rows[0].period_start == d(1) and rows[0].period_end == d(1, month=4)


def test_report_shows_goals_and_speed_to_a_person(world: Engine, tmp_path: Path) -> None:
    pipeline = PipelineSpec(
        goals=[
            GoalSpec(metric="stage_entered", stage="sql", target=20),
            GoalSpec(metric="human_touch_within_1h", target=0.5),
        ]
    )
    report = build_report(world, pipeline, now=MARCH_11)
    tables = {t.title: t for t in report_tables(report)}
    assert tables["Goals"].rows == [
        ["sql entered per month", "2026-03-01 to 2026-04-01", "20", "3", "9", "32.3%", "at risk"],
        [
            "human touch within 1h (month)",
            "2026-03-01 to 2026-04-01",
            "50%",
            "25%",
            "25%",
            "32.3%",
            "at risk",
        ],
    ]
    # All time (no period end): five captured leads, all touched by a rep, one within the hour.
    person = tables["Speed to a person"].rows[0]
    assert person[:4] == ["5", "5", "1", "20.0%"]
    markdown = report_markdown(report)
    assert "## Goals" in markdown and "| sql entered per month |" in markdown
    html = write_html(report, tmp_path / "r.html").read_text()
    assert "Goals" in html and "human touch within 1h (month)" in html
    as_json = report.as_dict()
    assert as_json["goals"][0]["status"] == "at risk"
    assert as_json["goals"][0]["period_start"] == "2026-03-01T00:00:00+00:00"


def test_shipped_pipeline_goals_load() -> None:
    from nurture.config import PROJECT_ROOT

    pipeline = load_pipeline(PROJECT_ROOT / "campaigns" / "pipeline.yaml")
    assert {(g.metric, g.stage) for g in pipeline.goals} >= {
        ("stage_entered", "sql"),
        ("speed_to_lead_within_1h", None),
    }


@pytest.mark.parametrize(
    ("goal", "message"),
    [
        ("{metric: stage_entered, target: 3}", "goals.0: metric stage_entered needs a stage"),
        ("{metric: stage_entered, stage: won, target: 3}", "goals.0.stage: unknown stage 'won'"),
        ("{metric: speed_to_lead_within_1h, target: 80}", "is a share: expected a target from 0"),
        ("{metric: revenue, target: 3}", "goals.0.metric: Input should be"),
        ("{metric: stage_entered, stage: sql, per: year, target: 3}", "goals.0.per:"),
        ("{metric: stage_entered, stage: sql, target: 0}", "goals.0.target:"),
    ],
)
def test_bad_goals_name_the_key(tmp_path: Path, goal: str, message: str) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"goals:\n  - {goal}\n")
    with pytest.raises(SpecErrors) as info:
        load_pipeline(path)
    assert message in str(info.value)
    assert f"{path}:2" in str(info.value)


def test_pace_never_divides_by_zero_at_the_period_start(world: Engine) -> None:
    goal = GoalSpec(metric="stage_entered", stage="sql", target=1)
    with session_scope(world) as session:
        [row] = evaluate_goals(session, [goal], d(1) + timedelta(0))
    assert row.actual == 0 and row.status == "at risk"


def test_captured_in_window_uses_each_leads_zone(engine: Engine) -> None:
    from nurture.reporting.goals import captured_in_window

    spec = {
        "name": "w",
        "audience": {"field": "source", "op": "eq", "value": "website"},
        "send_window": {"days": ["tue"], "start": "09:00", "end": "17:00"},
        "steps": [{"id": "a", "template": "b2b/welcome"}],
    }
    with session_scope(engine) as session:
        row = Campaign(name="w", spec=spec, spec_hash="x", created_at=d(1), updated_at=d(1))
        session.add(row)
        session.flush()
        cid = row.id
    tuesday = d(3, 10)  # 2026-03-03 is a Tuesday
    inside = add_leads(engine, tuesday, {"email": "in@example.com"})[0]
    late = add_leads(engine, d(3, 20), {"email": "late@example.com"})[0]
    ny = add_leads(engine, d(3, 20), {"email": "ny@example.com", "timezone": "America/New_York"})
    never = add_leads(engine, tuesday, {"email": "never@example.com"})[0]
    with session_scope(engine) as session:
        session.add_all(
            Enrollment(campaign_id=cid, lead_id=lid, step_id="a", enrolled_at=tuesday)
            for lid in (inside, late, ny[0])
        )
    with session_scope(engine) as session:
        # 20:00 UTC is 15:00 in New York: inside; the UTC lead at 20:00 is not.
        assert captured_in_window(session, [inside, late, ny[0], never]) == {inside, ny[0]}
