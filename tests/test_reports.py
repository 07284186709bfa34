"""The analytics report on hand-built histories whose every figure is known in advance."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from nurture.journey.sequences import sync_campaigns
from nurture.reporting.analytics import auc, normal_ppf, percentile, two_proportion_test
from nurture.reporting.report import Period, Report, build_report, campaign_funnels, report_markdown
from nurture.spec.schema import PipelineSpec
from nurture.store.db import session_scope
from nurture.store.models import (
    Campaign,
    CampaignVersion,
    Delivery,
    Enrollment,
    Event,
    Lead,
    Promotion,
    ScoreSnapshot,
    StageTransition,
)
from tests.helpers import campaign

T0 = datetime(2026, 3, 2, tzinfo=UTC)
H = timedelta(hours=1)
M = timedelta(minutes=1)
PIPELINE = PipelineSpec()

AB_SPEC = """
name: {name}
audience: {{field: source, op: eq, value: website}}
description: {description}
steps:
  - {{id: welcome, template: b2b/welcome}}
  - id: case-study
    wait: 2d
    variants:
      - {{name: roi, template: b2b/case_study_roi, weight: 50}}
      - {{name: story, template: b2b/case_study_story, weight: 50}}
"""
PLAIN_SPEC = """
name: {name}
audience: {{field: source, op: eq, value: website}}
description: {description}
steps:
  - {{id: welcome, template: b2b/welcome}}
"""


@dataclass
class History:
    """Builds rows directly, so each test states its history exactly."""

    engine: Engine
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    leads: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    enrollments: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def lead(self, created: datetime, source: str = "website", stage: str = "subscriber") -> int:
        lid = next(self.ids)
        self.leads.append(
            {
                "id": lid,
                "email": f"lead{lid}@example.com",
                "first_name": f"Lead {lid}",
                "source": source,
                "lifecycle_stage": stage,
                "attributes": {},
                "behaviour_score": 0.0,
                "fit_score": 0.0,
                "created_at": created,
                "updated_at": created,
            }
        )
        return lid

    def move(self, lead: int, path: list[tuple[str, datetime]]) -> None:
        """Transitions along ``path`` from the lead's current stage; sets the final stage."""
        row = next(r for r in self.leads if r["id"] == lead)
        for stage, when in path:
            self.transitions.append(
                {
                    "lead_id": lead,
                    "from_stage": row["lifecycle_stage"],
                    "to_stage": stage,
                    "occurred_at": when,
                    "cause": "test",
                }
            )
            row["lifecycle_stage"] = stage

    def send(
        self,
        campaign_id: int,
        lead: int,
        step: str,
        *,
        sent_at: datetime | None,
        variant: str | None = None,
        template: str = "b2b/welcome",
        events: tuple[str, ...] = (),
        status: str = "sent",
    ) -> int:
        eid = next(self.ids)
        did = next(self.ids)
        when = sent_at or T0
        self.enrollments.append(
            {
                "id": eid,
                "campaign_id": campaign_id,
                "lead_id": lead,
                "cycle": 1,
                "status": "active",
                "enrolled_at": when,
            }
        )
        self.deliveries.append(
            {
                "id": did,
                "enrollment_id": eid,
                "campaign_id": campaign_id,
                "lead_id": lead,
                "step_id": step,
                "template": template,
                "variant": variant,
                "domain": "example.com",
                "status": status,
                "message_id": f"<{did}@test>",
                "attempts": 1,
                "due_at": when,
                "queued_at": when,
                "sent_at": sent_at,
                "updated_at": when,
            }
        )
        for etype in events:
            self.events.append(
                {"lead_id": lead, "delivery_id": did, "type": etype, "occurred_at": when + M}
            )
        return did

    def save(self) -> None:
        with session_scope(self.engine) as session:
            for model, rows in (
                (Lead, self.leads),
                (StageTransition, self.transitions),
                (Enrollment, self.enrollments),
                (Delivery, self.deliveries),
                (Event, self.events),
            ):
                if rows:
                    session.execute(insert(model), rows)


def add_campaign(engine: Engine, text: str, now: datetime, **fmt: str) -> int:
    with session_scope(engine) as session:
        [ref] = sync_campaigns(session, [campaign(text.format(**fmt))], now)
        return ref.id


def stage_history(engine: Engine) -> tuple[History, int]:
    """Five leads with known journeys, sends and engagement (see the test docstrings)."""
    cid = add_campaign(engine, PLAIN_SPEC, T0, name="welcome", description="v1")
    h = History(engine, ids=itertools.count(1000))
    l1 = h.lead(T0)
    l2 = h.lead(T0 + H)
    l3 = h.lead(T0 + 2 * H, "social")
    l4 = h.lead(T0 + 3 * H, "social")
    h.lead(T0 + 4 * H, "partner", stage="lead")  # imported straight into "lead"
    h.move(
        l1,
        [
            ("lead", T0 + 2 * H),
            ("mql", T0 + 10 * H),
            ("sql", T0 + 30 * H),
            ("opportunity", T0 + 50 * H),
            ("customer", T0 + 74 * H),
        ],
    )
    h.move(l2, [("lead", T0 + 5 * H), ("lost", T0 + 25 * H)])
    h.move(l3, [("lead", T0 + 8 * H)])
    h.send(cid, l1, "welcome", sent_at=T0 + 30 * M, events=("opened", "opened", "clicked"))
    h.send(cid, l2, "welcome", sent_at=T0 + 3 * H, events=("bounced",))
    h.send(cid, l3, "welcome", sent_at=T0 + 2 * H + 50 * M, events=("unsubscribed", "replied"))
    h.send(cid, l4, "welcome", sent_at=None, status="failed")
    h.save()
    return h, cid


def by_stage(report: Report) -> dict[str, Any]:
    return {r.stage: r for r in report.stages}


def test_stages_over_all_time(engine: Engine) -> None:
    """Entered, exited forward, dropped, still, conversion and time in stage, by hand."""
    stage_history(engine)
    report = build_report(engine, PIPELINE)
    s = by_stage(report)
    assert [r.stage for r in report.stages] == [
        *PIPELINE.order(),
        "lost",
        "recycled",
    ]
    got = {k: (r.entered, r.exited_forward, r.dropped, r.still_in_stage) for k, r in s.items()}
    assert got == {
        "subscriber": (4, 3, 0, 1),  # l5 entered "lead" at capture
        "lead": (4, 1, 1, 2),
        "mql": (1, 1, 0, 0),
        "sql": (1, 1, 0, 0),
        "opportunity": (1, 1, 0, 0),
        "customer": (1, 0, 0, 1),
        "lost": (1, 0, 0, 1),
        "recycled": (0, 0, 0, 0),
    }
    assert s["subscriber"].conversion_to_next == pytest.approx(3 / 4)
    assert s["lead"].conversion_to_next == pytest.approx(1 / 4)
    assert s["mql"].conversion_to_next == 1.0
    assert s["customer"].conversion_to_next is None
    # subscriber stays: 2 h, 4 h, 6 h -> median 4, p90 = 4 + 0.8 * 2
    assert (s["subscriber"].median_hours, s["subscriber"].p90_hours) == (4.0, 5.6)
    # lead stays that ended: 8 h (l1), 20 h (l2) -> median 14, p90 = 8 + 0.9 * 12
    assert (s["lead"].median_hours, s["lead"].p90_hours) == (14.0, 18.8)
    assert s["lead"].completed_stays == 2
    assert (s["mql"].median_hours, s["sql"].median_hours, s["opportunity"].median_hours) == (
        20.0,
        20.0,
        24.0,
    )
    assert s["customer"].median_hours is None
    assert {(t.from_stage, t.to_stage): t.count for t in report.transitions} == {
        ("(capture)", "subscriber"): 4,
        ("(capture)", "lead"): 1,
        ("subscriber", "lead"): 3,
        ("lead", "mql"): 1,
        ("lead", "lost"): 1,
        ("mql", "sql"): 1,
        ("sql", "opportunity"): 1,
        ("opportunity", "customer"): 1,
    }


def test_stages_in_a_window_are_half_open(engine: Engine) -> None:
    """[T0+6h, T0+30h): a move at exactly T0+30h is outside, so the lead is still in mql."""
    stage_history(engine)
    report = build_report(engine, PIPELINE, period=Period(T0 + 6 * H, T0 + 30 * H))
    s = by_stage(report)
    got = {
        k: (r.entered, r.exited_forward, r.dropped, r.still_in_stage)
        for k, r in s.items()
        if k in ("subscriber", "lead", "mql", "sql")
    }
    assert got == {
        "subscriber": (0, 1, 0, 1),  # l3 left at 8 h; l4 never left
        "lead": (1, 1, 1, 2),  # l3 entered; l1 went on at 10 h; l2 lost at 25 h; l3, l5 stay
        "mql": (1, 0, 0, 1),  # l1 entered at 10 h and left at 30 h, the window's end
        "sql": (0, 0, 0, 0),
    }
    assert s["subscriber"].conversion_to_next is None  # nobody entered in the window
    assert s["lead"].conversion_to_next == 0.0
    assert s["subscriber"].median_hours == 6.0  # only l3's stay ended in the window
    assert {(t.from_stage, t.to_stage): t.count for t in report.transitions} == {
        ("subscriber", "lead"): 1,
        ("lead", "mql"): 1,
        ("lead", "lost"): 1,
    }


def test_speed_to_lead_steps_and_touchpoints(engine: Engine) -> None:
    """Capture -> first sent email: 30, 120 and 50 minutes; two leads never contacted."""
    stage_history(engine)
    report = build_report(engine, PIPELINE, by="owner")
    s = report.speed_to_lead
    assert (s.captured, s.contacted, s.within_hour) == (5, 3, 2)
    assert s.share_within_hour == pytest.approx(0.4)
    assert s.median_minutes == 50.0
    assert s.p90_minutes == pytest.approx(50 + 0.8 * 70)
    [step] = report.steps
    assert (step.campaign, step.step, step.sent, step.delivered) == ("welcome", "welcome", 3, 2)
    assert (step.opened, step.clicked, step.replied, step.unsubscribed, step.bounced) == (
        1,
        1,
        1,
        1,
        1,
    )
    tp = {g.key: g for g in report.touchpoints}
    assert sorted(tp) == ["partner", "social", "website"]
    assert (tp["website"].captured, tp["website"].contacted, tp["website"].qualified) == (2, 2, 1)
    assert tp["website"].won == 1
    assert tp["website"].share_within_hour == 0.5
    assert tp["website"].median_minutes_to_lead == 75.0
    assert (tp["social"].captured, tp["social"].contacted, tp["social"].qualified) == (2, 1, 0)
    assert (tp["partner"].contacted, tp["partner"].median_minutes_to_lead) == (0, None)
    assert [(g.key, g.captured) for g in report.breakdown] == [("(none)", 5)]
    # Only the leads captured in the window count for speed to lead.
    late = build_report(engine, PIPELINE, period=Period(T0 + 90 * M, None))
    assert (late.speed_to_lead.captured, late.speed_to_lead.contacted) == (3, 1)


def test_campaign_filter_and_bad_input(engine: Engine) -> None:
    """--campaign limits leads to those enrolled; unknown names and --by values are refused."""
    stage_history(engine)
    report = build_report(engine, PIPELINE, campaign="welcome", by="campaign")
    assert report.speed_to_lead.captured == 4  # l5 was never enrolled
    assert [(g.key, g.captured) for g in report.breakdown] == [("welcome", 4)]
    with pytest.raises(ValueError, match="unknown campaign 'nope' \\(known: welcome\\)"):
        build_report(engine, PIPELINE, campaign="nope")
    with pytest.raises(ValueError, match="--by must be one of"):
        build_report(engine, PIPELINE, by="colour")
    # The demo's funnel still works beside the new report.
    [funnel] = campaign_funnels(engine)
    assert (funnel.campaign, funnel.sent, funnel.opened, funnel.clicked) == ("welcome", 3, 1, 1)


def reference_p_value(x1: int, n1: int, x2: int, n2: int) -> float:
    """The textbook pooled two-proportion z-test, written out independently."""
    p1, p2, p = x1 / n1, x2 / n2, (x1 + x2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    return math.erfc(abs(z) / math.sqrt(2))


def ab_history(engine: Engine) -> int:
    """case-study: roi 40/200 clicks vs story 20/200; a second campaign 12/100 vs 10/100."""
    cid = add_campaign(engine, AB_SPEC, T0, name="ab", description="v1")
    close = add_campaign(engine, AB_SPEC, T0, name="close", description="v1")
    h = History(engine, ids=itertools.count(1000))
    for cid_, variants in (
        (cid, (("roi", 200, 40), ("story", 200, 20))),
        (close, (("roi", 100, 12), ("story", 100, 10))),
    ):
        for name, n, clicks in variants:
            for i in range(n):
                lead = h.lead(T0)
                events = ("opened", "clicked") if i < clicks else ()
                h.send(
                    cid_,
                    lead,
                    "case-study",
                    sent_at=T0 + H,
                    variant=name,
                    template=f"b2b/case_study_{name}",
                    events=events,
                )
    # Two bounces on story: they leave "delivered", so story's denominator is 198.
    h.events += [
        {"lead_id": d["lead_id"], "delivery_id": d["id"], "type": "bounced", "occurred_at": T0}
        for d in h.deliveries
        if d["variant"] == "story" and d["campaign_id"] == cid
    ][-2:]
    h.save()
    return cid


def test_ab_significance_against_a_hand_computed_reference(engine: Engine) -> None:
    ab_history(engine)
    report = build_report(engine, PIPELINE)
    tests = {(a.campaign, a.step): a for a in report.ab_tests}
    ab = tests[("ab", "case-study")]
    assert (ab.leader, ab.runner_up, ab.winner) == ("roi", "story", "roi")
    variants = {v.variant: v for v in ab.variants}
    assert (variants["roi"].delivered, variants["roi"].clicked) == (200, 40)
    assert (variants["story"].delivered, variants["story"].clicked) == (198, 20)
    assert ab.test is not None
    assert ab.test.p_value == pytest.approx(reference_p_value(40, 200, 20, 198), rel=1e-9)
    # By hand: p1 = .2, p2 = 20/198, pooled 60/398; z = 2.7596, two-sided p = 0.005787.
    assert ab.test.z == pytest.approx(2.7596, abs=1e-4)
    assert ab.test.p_value == pytest.approx(0.005787, abs=1e-6)
    se = math.sqrt(0.2 * 0.8 / 200 + (20 / 198) * (1 - 20 / 198) / 198)
    diff = 0.2 - 20 / 198
    assert ab.test.ci_low == pytest.approx(diff - 1.959964 * se, abs=1e-6)
    assert ab.test.ci_high == pytest.approx(diff + 1.959964 * se, abs=1e-6)
    assert ab.promotion is not None
    assert "template: b2b/case_study_roi" in ab.promotion
    assert "variants" not in ab.promotion.split("\n", 1)[1]
    close = tests[("close", "case-study")]
    assert close.winner is None and close.promotion is None
    assert close.test is not None
    assert close.test.p_value == pytest.approx(reference_p_value(12, 100, 10, 100), rel=1e-9)
    assert close.test.p_value > 0.6
    assert "no significant difference" in close.verdict
    md = report_markdown(report)
    assert "## Winners to promote" in md and "template: b2b/case_study_roi" in md


def test_campaign_health_from_version_history(engine: Engine) -> None:
    """humming: every version had its data; thrashing: two versions retired under 100 sends."""
    steady = add_campaign(engine, PLAIN_SPEC, T0, name="steady", description="v1")
    churny = add_campaign(engine, PLAIN_SPEC, T0, name="churny", description="v1")
    add_campaign(engine, AB_SPEC, T0, name="testing", description="v1")
    h = History(engine, ids=itertools.count(1000))
    for n, cid, when in ((150, steady, T0 + H), (10, churny, T0 + H)):
        for _ in range(n):
            h.send(cid, h.lead(T0), "welcome", sent_at=when)
    h.save()
    add_campaign(engine, PLAIN_SPEC, T0 + 24 * H, name="steady", description="v2")
    add_campaign(engine, PLAIN_SPEC, T0 + 24 * H, name="churny", description="v2")
    h = History(engine, ids=itertools.count(5000))
    for n, cid in ((120, steady), (5, churny)):
        for _ in range(n):
            h.send(cid, h.lead(T0), "welcome", sent_at=T0 + 25 * H)
    h.save()
    add_campaign(engine, PLAIN_SPEC, T0 + 48 * H, name="churny", description="v3")
    with session_scope(engine) as session:
        history = session.execute(
            select(CampaignVersion.version, CampaignVersion.created_at, CampaignVersion.retired_at)
            .where(CampaignVersion.campaign_id == churny)
            .order_by(CampaignVersion.version)
        ).all()
        assert session.scalar(select(Campaign.version).where(Campaign.id == churny)) == 3
    assert [tuple(r) for r in history] == [
        (1, T0, T0 + 24 * H),
        (2, T0 + 24 * H, T0 + 48 * H),
        (3, T0 + 48 * H, None),
    ]
    health = {r.campaign: r for r in build_report(engine, PIPELINE, min_sends=100).health}
    assert health["steady"].status == "humming"
    assert health["steady"].sends_per_version == {1: 150, 2: 120}
    assert health["churny"].status == "thrashing"
    assert health["churny"].sends_per_version == {1: 10, 2: 5, 3: 0}
    assert "v1 at 10, v2 at 5" in health["churny"].explanation
    assert health["testing"].status == "experimenting"
    assert "A/B test on case-study" in health["testing"].explanation
    assert all("\n" not in r.explanation for r in health.values())


def test_score_backtest_auc_and_win_rate_per_grade(engine: Engine) -> None:
    """Positives score 90, 70; negatives 60, 30, 80 -> AUC = 5/6; later snapshots ignored."""
    h = History(engine, ids=itertools.count(1000))
    leads = {name: h.lead(T0) for name in "abcde"}
    h.move(leads["a"], [("mql", T0 + H), ("customer", T0 + 5 * H)])
    h.move(leads["b"], [("mql", T0 + H), ("customer", T0 + 5 * H), ("lost", T0 + 9 * H)])
    for name in "cde":
        h.move(leads[name], [("mql", T0 + H)])
    h.save()
    scores = {"a": (60, 30, "A"), "b": (40, 30, "B"), "c": (30, 30, "B")}
    scores |= {"d": (10, 20, "C"), "e": (50, 30, "A")}
    with session_scope(engine) as session:
        for name, (behaviour, fit, grade) in scores.items():
            lid = leads[name]
            session.add(
                Promotion(
                    lead_id=lid,
                    connector="local",
                    stage="mql",
                    status="done",
                    attempts=1,
                    created_at=T0 + H,
                    next_attempt_at=T0 + H,
                    done_at=T0 + H,
                )
            )
            session.add(
                ScoreSnapshot(
                    lead_id=lid, computed_at=T0 + H, behaviour=behaviour, fit=fit, grade=grade
                )
            )
        # A snapshot taken later (not at promotion) must not count.
        session.add(
            ScoreSnapshot(
                lead_id=leads["c"], computed_at=T0 + 3 * H, behaviour=500, fit=0, grade="A"
            )
        )
    b = build_report(engine, PIPELINE).backtest
    assert (b.promoted, b.won) == (5, 2)
    assert b.auc == pytest.approx(5 / 6)
    assert [(g.grade, g.leads, g.won, g.win_rate) for g in b.by_grade] == [
        ("A", 2, 1, 0.5),
        ("B", 2, 1, 0.5),
        ("C", 1, 0, 0.0),
    ]


# --- the pure statistics ------------------------------------------------------------------------


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([], 50) is None
    assert percentile([7], 90) == 7
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_normal_quantile_and_test_edges() -> None:
    assert normal_ppf(0.975) == pytest.approx(1.959963985, abs=1e-8)
    assert normal_ppf(0.5) == pytest.approx(0, abs=1e-12)
    same = two_proportion_test(0, 10, 0, 20)
    assert (same.z, same.p_value, same.significant) == (0.0, 1.0, False)
    with pytest.raises(ValueError, match="group b"):
        two_proportion_test(1, 10, 5, 4)


def test_auc_rank_statistic_with_ties() -> None:
    assert auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert auc([1, 1, 1, 1], [False, True, False, True]) == 0.5
    # One tie across classes counts one half: (1 + 1 + 0.5 + 1) / 4... by hand below.
    # positives {2, 3}, negatives {1, 2}: pairs 2>1, 2=2 (.5), 3>1, 3>2 -> 3.5 / 4
    assert auc([1, 2, 2, 3], [False, False, True, True]) == 0.875
    assert auc([1, 2], [True, True]) is None
