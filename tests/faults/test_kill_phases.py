"""SIGKILL a tick while it scores and promotes, then rerun it: every promotion happens once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from nurture.dev.synthetic import generate, insert_leads
from nurture.store.db import make_engine, session_scope, upgrade
from nurture.store.models import CrmLink, Enrollment, Event, Lead, Promotion, StageTransition
from nurture.store.sql import insert_for
from tests.helpers import TEMPLATES

CAMPAIGNS = Path(__file__).parent.parent / "data" / "promote_only"
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
LEADS = 2000


def _tick(db_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NURTURE_DATABASE_URL": db_url, "NURTURE_SMTP_URL": "smtp://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "nurture", "tick", "--now", NOW.isoformat(), "--json",
           "--campaigns", str(CAMPAIGNS), "--templates", str(TEMPLATES)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _count(engine: Engine, query: Any) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(query) or 0)


@pytest.mark.parametrize(("phase", "seed"), [("scoring", 1), ("scoring", 2), ("promoting", 3),
                                             ("promoting", 4)])  # fmt: skip
def test_sigkill_while_scoring_or_promoting(tmp_path: Path, phase: str, seed: int) -> None:
    db_url = f"sqlite:///{tmp_path}/nurture.db"
    engine = make_engine(db_url)
    upgrade(engine)
    leads = [lead for lead in generate(LEADS * 2) if lead.attributes["type"] == "b2b"][:LEADS]
    insert_leads(engine, leads, NOW)
    # Everyone clicked, so all qualify. Scoring 2,000 leads with 200 events each takes about
    # 0.2 s here, and the stages between enrollment and scoring about 0.015 s: a kill 20 to
    # 60 ms after enrollment commits lands inside scoring, with margin on a faster machine
    # (60 events and a kill up to 100 ms late once landed after scoring had committed).
    history = 1 if phase == "promoting" else 200
    with session_scope(engine) as session:
        ids = list(session.scalars(select(Lead.id)))
        session.execute(
            insert_for(session, Event),
            [
                {"lead_id": i, "type": "clicked", "occurred_at": NOW, "payload": {}}
                for i in ids
                for _ in range(history)
            ],
        )
    rng = random.Random(seed)
    enrolled = select(func.count(Enrollment.id))
    done = select(func.count(Promotion.id)).where(Promotion.status == "done")
    # Scoring runs right after enrollment; promotions commit in batches of 500.
    gate, target = (enrolled, 1) if phase == "scoring" else (done, rng.randint(1, LEADS - 500))
    proc = _tick(db_url)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _count(engine, gate) >= target:
            if phase == "scoring":
                time.sleep(rng.uniform(0.02, 0.06))  # inside the scoring statements
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the tick finished before the kill point"
    if phase == "promoting":
        assert 0 < _count(engine, done) < LEADS
    else:
        # The kill landed after enrollment committed and before scoring did: no lead has
        # a score yet and the promotion queue was not reached.
        assert _count(engine, enrolled) == LEADS
        assert _count(engine, select(func.count(Lead.id)).where(Lead.behaviour_score > 0)) == 0
        assert _count(engine, select(func.count(Promotion.id))) == 0

    rerun = _tick(db_url)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()

    with session_scope(engine) as session:
        assert session.scalar(select(func.count(Promotion.id))) == LEADS
        assert (
            session.scalar(select(func.count(Promotion.id)).where(Promotion.status == "done"))
            == LEADS
        )
        assert session.scalar(select(func.count(CrmLink.id))) == LEADS
        moves = session.execute(
            select(StageTransition.lead_id, func.count(StageTransition.id))
            .where(StageTransition.to_stage == "mql")
            .group_by(StageTransition.lead_id)
        ).all()
        assert len(moves) == LEADS and {n for _, n in moves} == {1}
        assert (
            session.scalar(select(func.count(Lead.id)).where(Lead.lifecycle_stage == "mql"))
            == LEADS
        )
        assert session.scalar(select(func.min(Lead.behaviour_score))) > 0
