"""Exactly once: SIGKILL a sending tick at random points, rerun it, count what arrived."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from nurture.db import make_engine, session_scope, upgrade
from nurture.models import Delivery
from nurture.synthetic import generate, insert_leads
from tests.helpers import TEMPLATES
from tests.servers import SmtpSink

CAMPAIGNS = Path(__file__).parent / "data" / "exactly_once"
NOW = "2026-03-03T10:00:00+00:00"
LEADS = 2000


def _tick(db_url: str, smtp_url: str, workers: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NURTURE_DATABASE_URL": db_url,
        "NURTURE_SMTP_URL": smtp_url,
        "NURTURE_BATCH_SIZE": "100",
        "NURTURE_RENDER_WORKERS": str(workers),
    }
    cmd = [sys.executable, "-m", "nurture", "tick", "--now", NOW, "--json",
           "--campaigns", str(CAMPAIGNS), "--templates", str(TEMPLATES)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _statuses(engine: Engine) -> Counter[str]:
    with session_scope(engine) as session:
        return Counter(
            dict(
                session.execute(
                    select(Delivery.status, func.count(Delivery.id)).group_by(Delivery.status)
                ).all()
            )
        )


@pytest.mark.parametrize(("seed", "workers"), [(1, 0), (2, 0), (3, 2), (4, 2)])
def test_sigkill_mid_tick_never_sends_twice(
    tmp_path: Path, smtp_server: SmtpSink, seed: int, workers: int
) -> None:
    # With render workers the next batch is claimed (and rendered) while one is sent.
    in_flight_cap = 100 * (2 if workers else 1)
    rng = random.Random(seed)
    db_url = f"sqlite:///{tmp_path}/nurture.db"
    engine = make_engine(db_url)
    upgrade(engine)
    leads = [lead for lead in generate(LEADS * 2) if lead.attributes["type"] == "b2b"][:LEADS]
    insert_leads(engine, leads, datetime(2026, 3, 1, tzinfo=UTC))
    expected = {lead.email for lead in leads}

    # Kill the tick once it has sent a random share of the messages (or before any).
    kill_after = rng.randint(0, LEADS - 200)
    proc = _tick(db_url, smtp_server.url, workers)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if smtp_server.count() >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    killed = proc.returncode == -signal.SIGKILL
    in_flight = _statuses(engine)["sending"]

    rerun = _tick(db_url, smtp_server.url, workers)
    _, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err.decode()
    smtp_server.wait_for(LEADS - in_flight, timeout=5)

    copies = Counter(smtp_server.recipients())
    assert max(copies.values()) == 1, "a lead received the same step twice"
    statuses = _statuses(engine)
    assert sum(statuses.values()) == LEADS  # one delivery row per lead for the due step
    assert statuses["sending"] == 0
    # Every due message was delivered once, except the ones in flight at the kill: those
    # are `unknown` (reported, never resent): at most one batch, two with render workers.
    assert statuses["unknown"] == in_flight
    assert statuses["sent"] + statuses["unknown"] == LEADS
    assert in_flight <= in_flight_cap
    never_arrived = expected - set(copies)
    assert len(never_arrived) <= statuses["unknown"]
    assert set(copies) <= expected
    if killed and kill_after > 0:
        assert statuses["sent"] >= kill_after - in_flight_cap
