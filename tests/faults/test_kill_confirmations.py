"""Double opt-in confirmations under SIGKILL: each pending signup gets its one
confirmation email at most once, and only the messages on the wire at the kill are in
doubt; every other one still goes out on the next tick (none is lost)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from nurture.dev.synthetic import generate, insert_leads
from nurture.store.db import make_engine, session_scope, upgrade
from nurture.store.models import Lead, OptIn
from nurture.store.sql import insert_for
from tests.faults.test_kill_points import CONNECTIONS, IN_DOUBT_CAP, _database
from tests.helpers import TEMPLATES
from tests.servers import SmtpSink

PROGRAMME = Path(__file__).parent.parent.parent / "campaigns"
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
SIGNUPS = 400


def _tick(db_url: str, smtp_url: str, campaigns: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NURTURE_DATABASE_URL": db_url,
        "NURTURE_SMTP_URL": smtp_url,
        "NURTURE_SMTP_CONNECTIONS": str(CONNECTIONS),
    }
    cmd = [sys.executable, "-m", "nurture", "tick", "--now", NOW.isoformat(), "--json",
           "--campaigns", str(campaigns), "--templates", str(TEMPLATES)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _states(db_url: str) -> dict[str | None, set[str]]:
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as session:
            rows = session.execute(
                select(OptIn.confirmation_state, Lead.email).join(Lead, Lead.id == OptIn.lead_id)
            ).all()
    finally:
        engine.dispose()
    out: dict[str | None, set[str]] = {}
    for state, email in rows:
        out.setdefault(state, set()).add(email)
    return out


@pytest.mark.parametrize(
    ("kind", "seed"),
    [("sqlite", 1), ("sqlite", 2), pytest.param("postgres", 3, marks=pytest.mark.postgres)],
)
def test_sigkill_mid_confirmations_leaves_only_the_wire_in_doubt(
    tmp_path: Path,
    smtp_server: SmtpSink,
    request: pytest.FixtureRequest,
    kind: str,
    seed: int,
) -> None:
    rng = random.Random(seed)
    # The programme's consent rules only (double opt-in for website signups), no campaign.
    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    shutil.copy(PROGRAMME / "consent.yaml", campaigns / "consent.yaml")
    db_url = _database(kind, tmp_path, request)
    engine = make_engine(db_url)
    upgrade(engine)
    leads = list(generate(SIGNUPS))
    insert_leads(engine, leads, NOW)
    with session_scope(engine) as session:
        ids = list(session.scalars(select(Lead.id)))
        session.execute(
            insert_for(session, OptIn),
            [
                {
                    "lead_id": i,
                    "source": "website",
                    "topics": {"topics": ["newsletter"]},
                    "requested_at": NOW,
                    "holds": True,
                }
                for i in ids
            ],
        )
    engine.dispose()
    expected = {lead.email for lead in leads}

    kill_after = rng.randint(1, SIGNUPS - 100)
    proc = _tick(db_url, smtp_server.url, campaigns)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if smtp_server.count() >= kill_after:
            time.sleep(rng.uniform(0, 0.02))
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    arrived_at_kill = smtp_server.count()
    assert proc.returncode == -signal.SIGKILL, "the tick ended before the kill"
    assert 0 < arrived_at_kill < SIGNUPS, "the kill did not land mid-send"
    in_doubt = _states(db_url).get("sending", set())
    print(f"confirmations {kind}: {arrived_at_kill} arrived at the kill, {len(in_doubt)} in doubt")
    assert len(in_doubt) <= IN_DOUBT_CAP

    rerun = _tick(db_url, smtp_server.url, campaigns)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()

    final = _states(db_url)
    sent, unknown = final.get("sent", set()), final.get("unknown", set())
    assert set(final) <= {"sent", "unknown"}, f"rows left in {set(final) - {'sent', 'unknown'}}"
    assert sent | unknown == expected and not sent & unknown
    assert unknown == in_doubt
    smtp_server.wait_for(len(expected) - len(unknown), timeout=10)
    copies = Counter(smtp_server.recipients())
    assert max(copies.values()) == 1, "a signup got two confirmation emails"
    assert sent <= set(copies)  # each `sent` arrived, exactly once
    assert expected - set(copies) <= unknown  # nothing due was lost
