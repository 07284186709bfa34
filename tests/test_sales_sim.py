"""The demo's simulated sales team: reproducible, time-true, and better leads win more."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select

from nurture.dev.sales_sim import work_pipeline
from nurture.reporting.analytics import auc
from nurture.store.db import session_scope
from nurture.store.models import Event, Lead, StageTransition
from tests.helpers import add_leads


def _promote(engine: Engine, count: int, at: datetime) -> list[int]:
    ids = add_leads(
        engine,
        at,
        *(
            {
                "email": f"p{i}@example.com",
                "lifecycle_stage": "mql",
                "attributes": {"propensity": (i % 10) / 10},
            }
            for i in range(count)
        ),
    )
    with session_scope(engine) as session:
        session.add_all(
            StageTransition(
                lead_id=i, from_stage="lead", to_stage="mql", occurred_at=at, cause="promoted"
            )
            for i in ids
        )
    return ids


def _stages(engine: Engine) -> dict[int, str]:
    with session_scope(engine) as session:
        return dict(session.execute(select(Lead.id, Lead.lifecycle_stage)).all())


def test_reps_work_leads_through_the_pipeline(sqlite_engine: Engine, now: datetime) -> None:
    ids = _promote(sqlite_engine, 200, now)
    first = work_pipeline(sqlite_engine, now + timedelta(hours=1))
    # Most leads are picked up within the hour, each at its own simulated instant.
    assert 80 <= sum(first.moves.values()) <= 160
    with session_scope(sqlite_engine) as session:
        times = session.scalars(
            select(StageTransition.occurred_at).where(StageTransition.cause == "crm pull via local")
        ).all()
    assert all(now < t <= now + timedelta(hours=1) for t in times)
    assert len(set(times)) > 50
    # The same instant again moves nobody twice.
    assert sum(work_pipeline(sqlite_engine, now + timedelta(hours=1)).moves.values()) == 0
    for day in range(1, 40):
        work_pipeline(sqlite_engine, now + timedelta(days=day))
    stages = _stages(sqlite_engine)
    counts = {s: sum(1 for v in stages.values() if v == s) for s in set(stages.values())}
    assert set(counts) <= {"customer", "lost", "recycled"}
    assert counts["customer"] >= 5 and counts["lost"] >= 20 and counts["recycled"] >= 20
    # Better leads (higher hidden propensity) win more often.
    with session_scope(sqlite_engine) as session:
        rows = session.execute(select(Lead.id, Lead.attributes)).all()
    propensity = {lid: attrs["propensity"] for lid, attrs in rows}
    value = auc([propensity[i] for i in ids], [stages[i] == "customer" for i in ids])
    assert value is not None and value > 0.6
    # Each customer answers the NPS survey once, a week after the win.
    with session_scope(sqlite_engine) as session:
        answers = session.scalar(select(func.count()).where(Event.type == "nps"))
    assert answers == counts["customer"]


def test_the_same_seed_gives_the_same_run(tmp_path: object, now: datetime) -> None:
    from nurture.store.db import get_engine

    outcomes = []
    for name in ("a", "b"):
        engine = get_engine(f"sqlite:///{tmp_path}/{name}.db")
        _promote(engine, 50, now)
        for day in range(0, 30, 2):
            work_pipeline(engine, now + timedelta(days=day, hours=3), seed=11)
        outcomes.append(_stages(engine))
        engine.dispose()
    assert outcomes[0] == outcomes[1]
