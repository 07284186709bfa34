"""Scoring on SQLite and PostgreSQL: decay (property-tested), points, grades, roll-up, stages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select, update

from nurture.engagement.scoring import SCORE_TOLERANCE, score_all
from nurture.journey.pipeline import apply_stage_thresholds
from nurture.spec.rules import parse_duration
from nurture.spec.schema import PipelineSpec, ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Account, Event, Lead, StageTransition
from tests.helpers import add_leads

POINTS = {"opened": 2.0, "clicked": 5.0, "replied": 15.0, "bounced": -10.0}


def add_events(engine: Engine, lead_id: int, events: Sequence[tuple[str, datetime]]) -> None:
    """Insert raw events for one lead."""
    with session_scope(engine) as session:
        session.add_all(
            Event(lead_id=lead_id, type=t, occurred_at=at, payload={}) for t, at in events
        )


def scores(engine: Engine) -> dict[str, tuple[float, float, str | None]]:
    """(behaviour, fit, grade) by email."""
    with session_scope(engine) as session:
        rows = session.execute(select(Lead.email, Lead.behaviour_score, Lead.fit_score, Lead.grade))
        return {e: (b, f, g) for e, b, f, g in rows}


def reference(events: Sequence[tuple[str, float]], half_life_s: float | None) -> float:
    """The decayed behaviour score in plain Python: points * 0.5 ** (age / half_life)."""
    if half_life_s is None:
        return sum(POINTS.get(t, 0.0) for t, _ in events)
    return sum(POINTS.get(t, 0.0) * 0.5 ** (age / half_life_s) for t, age in events)


event_lists = st.lists(
    st.tuples(
        st.sampled_from([*POINTS, "page_view_custom"]),
        st.integers(min_value=0, max_value=400 * 86400),  # age in seconds
    ),
    max_size=12,
)


def _replace_events(engine: Engine, lead_id: int, now: datetime, events: list) -> None:
    """New events for the lead, and a stored score far from any: the next run rewrites it."""
    with session_scope(engine) as session:
        session.execute(delete(Event))
        session.execute(update(Lead).values(behaviour_score=-1000.0))
    add_events(engine, lead_id, [(t, now - timedelta(seconds=age)) for t, age in events])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=event_lists, half_life=st.sampled_from(["6h", "1d", "7d", "30d", "90d"]))
def test_decay_matches_python_reference(
    engine: Engine, now: datetime, events: list, half_life: str
) -> None:
    with session_scope(engine) as session:
        lead = session.scalars(select(Lead.id).where(Lead.email == "p@x.test")).first()
    lead_id = lead or add_leads(engine, now, {"email": "p@x.test"})[0]
    _replace_events(engine, lead_id, now, events)
    spec = ScoringSpec(points=POINTS, half_life=half_life)
    score_all(engine, spec, now)
    expected = reference(events, parse_duration(half_life).total_seconds())
    assert scores(engine)["p@x.test"][0] == pytest.approx(expected, rel=1e-9, abs=1e-6)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(list(POINTS)), st.integers(0, 100 * 86400)), max_size=8
    ),
    hours=st.integers(min_value=1, max_value=24 * 60),
)
def test_doubling_half_life_equals_halving_ages(
    engine: Engine, now: datetime, events: list, hours: int
) -> None:
    """Scaling both the half-life and every age by 2 leaves the score unchanged."""
    with session_scope(engine) as session:
        lead = session.scalars(select(Lead.id).where(Lead.email == "h@x.test")).first()
    lead_id = lead or add_leads(engine, now, {"email": "h@x.test"})[0]
    _replace_events(engine, lead_id, now, events)
    score_all(engine, ScoringSpec(points=POINTS, half_life=f"{hours}h"), now)
    short = scores(engine)["h@x.test"][0]
    _replace_events(engine, lead_id, now, [(t, 2 * age) for t, age in events])
    score_all(engine, ScoringSpec(points=POINTS, half_life=f"{2 * hours}h"), now)
    doubled = scores(engine)["h@x.test"][0]
    assert doubled == pytest.approx(short, rel=1e-9, abs=1e-6)


def test_one_and_two_half_lives(engine: Engine, now: datetime) -> None:
    a, b, c = add_leads(
        engine, now, {"email": "a@x.test"}, {"email": "b@x.test"}, {"email": "c@x.test"}
    )
    add_events(engine, a, [("replied", now - timedelta(days=30))])
    add_events(engine, b, [("replied", now - timedelta(days=60))])
    add_events(engine, c, [("replied", now)])
    score_all(engine, ScoringSpec(points=POINTS, half_life="30d"), now)
    got = scores(engine)
    assert got["a@x.test"][0] == pytest.approx(7.5, abs=1e-6)
    assert got["b@x.test"][0] == pytest.approx(3.75, abs=1e-6)
    assert got["c@x.test"][0] == pytest.approx(15.0, abs=1e-6)
    # Halving the half-life quarters the 30-day-old reply.
    score_all(engine, ScoringSpec(points=POINTS, half_life="15d"), now)
    assert scores(engine)["a@x.test"][0] == pytest.approx(3.75, abs=1e-6)


def test_decay_too_small_to_show_is_not_written(engine: Engine, now: datetime) -> None:
    """A score moves on every tick by decay alone; it is rewritten once it moved 0.005."""
    (lead,) = add_leads(engine, now, {"email": "d@x.test"})
    add_events(engine, lead, [("replied", now - timedelta(days=1))])
    spec = ScoringSpec(points=POINTS, half_life="30d")
    day = 86400.0
    score_all(engine, spec, now)
    first = scores(engine)["d@x.test"][0]
    assert first == pytest.approx(reference([("replied", day)], 30 * day), abs=1e-9)
    # 15 minutes later the exact score is 0.0035 lower: not written, still within 0.005.
    score_all(engine, spec, now + timedelta(minutes=15))
    exact = reference([("replied", day + 900)], 30 * day)
    assert 0.003 < first - exact < SCORE_TOLERANCE
    assert scores(engine)["d@x.test"][0] == first
    # An hour later it moved 0.014: written, exactly.
    score_all(engine, spec, now + timedelta(hours=1))
    exact = reference([("replied", day + 3600)], 30 * day)
    assert scores(engine)["d@x.test"][0] == pytest.approx(exact, abs=1e-9) != first


def test_points_per_type_count_every_occurrence(engine: Engine, now: datetime) -> None:
    """Unlike Mautic, a repeated action scores every time; future and unknown types don't."""
    (lead,) = add_leads(engine, now, {"email": "r@x.test"})
    hour = timedelta(hours=1)
    add_events(
        engine,
        lead,
        [
            ("clicked", now - hour),
            ("clicked", now - 2 * hour),
            ("clicked", now - 3 * hour),
            ("opened", now - hour),
            ("opened", now),
            ("page_view_custom", now - hour),  # no points configured
            ("replied", now + hour),  # in the future at `now`
        ],
    )
    score_all(engine, ScoringSpec(points=POINTS, half_life=None), now)
    assert scores(engine)["r@x.test"][0] == pytest.approx(3 * 5 + 2 * 2)
    # Later, the reply counts; events that vanish bring the score back to zero.
    score_all(engine, ScoringSpec(points=POINTS, half_life=None), now + 2 * hour)
    assert scores(engine)["r@x.test"][0] == pytest.approx(3 * 5 + 2 * 2 + 15)
    with session_scope(engine) as session:
        session.execute(delete(Event))
    score_all(engine, ScoringSpec(points=POINTS, half_life=None), now + 2 * hour)
    assert scores(engine)["r@x.test"][0] == 0.0


def _fit_spec(**extra: object) -> ScoringSpec:
    rules = [
        {"name": k, "when": {"field": f"attributes.{k}", "op": "eq", "value": True}, "points": 20}
        for k in ("a", "b", "c", "d")
    ]
    rules.append(
        {"name": "e", "when": {"field": "attributes.e", "op": "eq", "value": True}, "points": -0.01}
    )
    return ScoringSpec.model_validate(
        {"points": POINTS, "fit": rules, "grades": {"A": 80, "B": 60, "C": 40, "D": 20}, **extra}
    )


def _attrs(n: int, minus: bool = False) -> dict[str, bool]:
    out = {k: True for k in "abcd"[:n]}
    if minus:
        out["e"] = True
    return out


def test_fit_grades_at_the_thresholds(engine: Engine, now: datetime) -> None:
    cases = {
        "f0@x.test": (_attrs(0), 0.0, "F"),
        "f1@x.test": (_attrs(1, minus=True), 19.99, "F"),
        "d@x.test": (_attrs(1), 20.0, "D"),
        "c@x.test": (_attrs(2), 40.0, "C"),
        "b@x.test": (_attrs(3), 60.0, "B"),
        "b2@x.test": (_attrs(4, minus=True), 79.99, "B"),
        "a@x.test": (_attrs(4), 80.0, "A"),
    }
    add_leads(engine, now, *({"email": e, "attributes": a} for e, (a, _, _) in cases.items()))
    assert score_all(engine, _fit_spec(), now) == len(cases)
    got = scores(engine)
    for email, (_, fit, grade) in cases.items():
        assert got[email][1] == pytest.approx(fit), email
        assert got[email][2] == grade, email


def test_new_thresholds_regrade_leads_whose_fit_did_not_change(
    engine: Engine, now: datetime
) -> None:
    add_leads(engine, now, {"email": "c@x.test", "attributes": _attrs(2)})
    score_all(engine, _fit_spec(), now)
    assert scores(engine)["c@x.test"][1:] == (40.0, "C")
    score_all(engine, _fit_spec(grades={"A": 40, "B": 30}), now)
    assert scores(engine)["c@x.test"][1:] == (40.0, "A")


@pytest.mark.parametrize(
    ("account", "expected"),
    [
        ({"method": "top_n", "top": 3}, 90.0),
        ({"method": "top_n", "top": 1}, 40.0),
        ({"method": "sum"}, 100.0),
        ({"method": "max"}, 40.0),
        ({"method": "weighted", "weights": [1.0, 0.5, 0.25]}, 40 + 15 + 5),
    ],
)
def test_account_roll_up(
    engine: Engine, now: datetime, account: dict[str, object], expected: float
) -> None:
    # Contacts' totals: 10 (fit-only... via behaviour), 40, 30, 20.
    with session_scope(engine) as session:
        acme = Account(name="Acme", domain="acme.test", created_at=now, updated_at=now)
        empty = Account(
            name="Empty", domain="empty.test", score=99.0, created_at=now, updated_at=now
        )
        session.add_all([acme, empty])
        session.flush()
        acme_id, empty_id = acme.id, empty.id
    ids = add_leads(
        engine,
        now,
        {"email": "one@acme.test", "attributes": _attrs(0)},
        {"email": "two@acme.test", "attributes": _attrs(2)},
        {"email": "three@acme.test", "attributes": _attrs(1)},
        {"email": "four@acme.test", "attributes": _attrs(1)},
        {"email": "loner@else.test", "attributes": _attrs(4)},
    )
    with session_scope(engine) as session:
        for lead_id in ids[:4]:
            session.get_one(Lead, lead_id).account_id = acme_id
    add_events(engine, ids[0], [("clicked", now), ("clicked", now)])  # 10 behaviour
    add_events(engine, ids[2], [("clicked", now), ("clicked", now)])  # 20 + 10
    score_all(engine, _fit_spec(account=account, half_life=None), now)
    with session_scope(engine) as session:
        assert session.get_one(Account, acme_id).score == pytest.approx(expected)
        assert session.get_one(Account, empty_id).score == 0.0


def test_rescoring_follows_every_change(engine: Engine, now: datetime) -> None:
    # Behaviour and fit are written by separate statements on SQLite: a later run must
    # follow a fit-only change, a behaviour-only change, and a contact leaving its account.
    with session_scope(engine) as session:
        acme = Account(name="Acme", domain="acme.test", created_at=now, updated_at=now)
        session.add(acme)
        session.flush()
        acme_id = acme.id
    ids = add_leads(
        engine,
        now,
        {"email": "fit@acme.test", "attributes": _attrs(1)},
        {"email": "busy@acme.test", "attributes": _attrs(0)},
    )
    with session_scope(engine) as session:
        for lead_id in ids:
            session.get_one(Lead, lead_id).account_id = acme_id
    add_events(engine, ids[1], [("replied", now)])
    spec = _fit_spec(account={"method": "sum"}, half_life=None)
    score_all(engine, spec, now)
    assert scores(engine) == {
        "fit@acme.test": (0.0, 20.0, "D"),
        "busy@acme.test": (15.0, 0.0, "F"),
    }
    with session_scope(engine) as session:
        session.get_one(Lead, ids[0]).attributes = _attrs(3)  # fit only: 20 -> 60
        session.get_one(Lead, ids[1]).account_id = None
    add_events(engine, ids[1], [("clicked", now)])  # behaviour only: 15 -> 20
    score_all(engine, spec, now)
    assert scores(engine) == {
        "fit@acme.test": (0.0, 60.0, "B"),
        "busy@acme.test": (20.0, 0.0, "F"),
    }
    with session_scope(engine) as session:
        assert session.get_one(Account, acme_id).score == pytest.approx(60.0)


def test_stage_thresholds_move_leads_and_record_transitions(engine: Engine, now: datetime) -> None:
    spec = ScoringSpec.model_validate(
        {
            "points": POINTS,
            "half_life": None,
            "stages": [
                {"stage": "lead", "when": {"score": "behaviour", "op": "gte", "value": 4}},
                {"stage": "mql", "when": {"score": "behaviour", "op": "gte", "value": 15}},
            ],
        }
    )
    quiet, warm, hot, sold = add_leads(
        engine,
        now,
        {"email": "quiet@x.test"},
        {"email": "warm@x.test"},
        {"email": "hot@x.test"},
        {"email": "sold@x.test", "lifecycle_stage": "sql"},
    )
    add_events(engine, quiet, [("opened", now)])
    add_events(engine, warm, [("clicked", now)])
    add_events(engine, hot, [("replied", now)])
    add_events(engine, sold, [("replied", now)])
    score_all(engine, spec, now)
    moved = apply_stage_thresholds(engine, spec, PipelineSpec(), now)
    assert moved == {"lead": 2, "mql": 1}
    with session_scope(engine) as session:
        stages = dict(session.execute(select(Lead.email, Lead.lifecycle_stage)).all())
        transitions = session.execute(
            select(Lead.email, StageTransition.from_stage, StageTransition.to_stage)
            .join(Lead, Lead.id == StageTransition.lead_id)
            .order_by(StageTransition.id)
        ).all()
    assert stages == {
        "quiet@x.test": "subscriber",
        "warm@x.test": "lead",
        "hot@x.test": "mql",
        "sold@x.test": "sql",  # never moved backwards
    }
    assert [tuple(t) for t in transitions] == [
        ("warm@x.test", "subscriber", "lead"),
        ("hot@x.test", "subscriber", "lead"),
        ("hot@x.test", "lead", "mql"),
    ]
    # A second pass moves nobody and records nothing new.
    assert apply_stage_thresholds(engine, spec, PipelineSpec(), now) == {"lead": 0, "mql": 0}
    assert math.isclose(scores(engine)["hot@x.test"][0], 15.0)


def test_a_recycled_lead_crosses_a_threshold_only_after_it_engages_again(
    engine: Engine, now: datetime
) -> None:
    """Sales handed it back: the score it brought with it must not send it straight up."""
    spec = ScoringSpec.model_validate(
        {
            "points": POINTS,
            "half_life": None,
            "stages": [{"stage": "lead", "when": {"score": "behaviour", "op": "gte", "value": 4}}],
        }
    )
    handed_back, imported, machine = add_leads(
        engine,
        now - timedelta(days=30),
        {"email": "back@x.test", "lifecycle_stage": "recycled"},
        {"email": "imported@x.test", "lifecycle_stage": "recycled"},
        {"email": "machine@x.test", "lifecycle_stage": "recycled"},
    )
    recycled_at = now - timedelta(days=2)
    with session_scope(engine) as session:
        session.add_all(
            StageTransition(
                lead_id=i,
                from_stage="mql",
                to_stage="recycled",
                occurred_at=recycled_at,
                cause="crm",
            )
            for i in (handed_back, machine)
        )
    # All three are hot from before the hand-back (for the imported lead, which has no
    # transition, from before it was created here).
    for lead in (handed_back, machine):
        add_events(engine, lead, [("replied", now - timedelta(days=10))])
    add_events(engine, imported, [("clicked", now - timedelta(days=31))])
    add_events(engine, machine, [("bounced", now - timedelta(days=1))])
    with session_scope(engine) as session:  # a gateway's click: not a person
        session.add(
            Event(
                lead_id=machine,
                type="clicked",
                occurred_at=now - timedelta(hours=5),
                payload={},
                engagement="machine",
            )
        )
    score_all(engine, spec, now)

    def stages() -> dict[str, str]:
        with session_scope(engine) as session:
            return dict(session.execute(select(Lead.email, Lead.lifecycle_stage)).all())

    assert apply_stage_thresholds(engine, spec, PipelineSpec(), now) == {"lead": 0}
    assert set(stages().values()) == {"recycled"}
    # One real click after the hand-back: now it may cross.
    add_events(engine, handed_back, [("clicked", now - timedelta(hours=1))])
    add_events(engine, imported, [("opened", now - timedelta(hours=1))])
    score_all(engine, spec, now)
    assert apply_stage_thresholds(engine, spec, PipelineSpec(), now) == {"lead": 2}
    assert stages() == {
        "back@x.test": "lead",
        "imported@x.test": "lead",
        "machine@x.test": "recycled",
    }
