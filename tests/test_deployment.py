"""End to end on a real Prefect server: the README's commands deploy prefect.yaml, workers
run the ticks, mail arrives at a real SMTP server, and concurrent ticks on PostgreSQL never
send a step twice.

The Prefect server itself runs on PostgreSQL (the production topology). Its scheduler is
off, so only the runs a test triggers happen; the schedules are still checked.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nurture.flows.artifacts import ALL_STEPS, TICK_HEALTH, TICK_TABLE
from sqlalchemy import Engine, func, insert, select

from nurture.config import PROJECT_ROOT
from nurture.store.db import make_engine, session_scope, upgrade
from nurture.store.models import Delivery, Lead
from tests.helpers import TEMPLATES
from tests.prefect_server import PrefectServer, run_id_from
from tests.servers import PostgresCluster, SmtpSink

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)

CAMPAIGN = """
name: e2e-welcome
audience: {field: attributes.type, op: eq, value: b2b}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: breakup, wait: 5d, template: b2b/breakup}
"""

# The commands of README.md's "Deploying on a Prefect server", run verbatim (the test
# checks that the README still says exactly these).
SET_UP = [
    "prefect work-pool create nurture --type process",
    "prefect gcl create smtp --limit 4",
    "prefect block register -m flows.blocks",
    "prefect --no-prompt deploy --all",
]
WORKER = "prefect worker start --pool nurture --limit 1"
TICK = "prefect deployment run nurture_tick/nurture-tick"
PARALLEL_TICK = "prefect deployment run nurture_tick/nurture-tick-parallel"


def _readme_commands() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split("## Deploying on a Prefect server", 1)[1]
    return [m.strip() for m in re.findall(r"^\$ (.+)$", section, flags=re.M)]


@pytest.fixture(scope="module")
def prefect_setup(pg_cluster: PostgresCluster, tmp_path_factory: Any) -> Iterator[PrefectServer]:
    """A real Prefect server on PostgreSQL, set up with the README's commands."""
    pg_cluster.execute("CREATE DATABASE prefect_e2e")
    db = f"postgresql+asyncpg://postgres@127.0.0.1:{pg_cluster.port}/prefect_e2e"
    server = PrefectServer(home=tmp_path_factory.mktemp("prefect-home"), database_url=db)
    server.start()
    try:
        env = server.env()
        for command in SET_UP:
            server.cli(command, env=env, timeout=180)
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefect_server(prefect_setup: PrefectServer) -> Iterator[PrefectServer]:
    """The module's server; the workers a test starts stop when it ends."""
    yield prefect_setup
    prefect_setup.stop_workers()


def _campaigns(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "e2e-welcome.yaml").write_text(CAMPAIGN)
    return folder


def _worker_env(server: PrefectServer, db_url: str, campaigns: Path) -> dict[str, str]:
    return server.env(
        NURTURE_CHECKOUT=str(PROJECT_ROOT),
        NURTURE_DATABASE_URL=db_url,
        NURTURE_CAMPAIGNS=str(campaigns),
        NURTURE_TEMPLATES=str(TEMPLATES),
        # A real deployment's key: the flows refuse the development one in production.
        NURTURE_SECRET_KEY="deployment-test-" + "k" * 32,
        # Nothing listens here: the runs must send through the SMTP block they are given.
        NURTURE_SMTP_URL="smtp://127.0.0.1:9",
    )


def _save_smtp_block(server: PrefectServer, name: str, url: str) -> None:
    server.cli(
        f".venv/bin/python -c 'from nurture.flows.blocks import NurtureSmtp; "
        f'NurtureSmtp(url="{url}").save("{name}", overwrite=True)\''
    )


def _trigger(server: PrefectServer, command: str, env: dict[str, str], **params: Any) -> str:
    args = " ".join(f"--param {k}={v}" for k, v in params.items())
    return run_id_from(server.cli(f"{command} {args}", env=env))


def _delivery_counts(engine: Engine) -> Counter[str]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(Lead.email, func.count(Delivery.id))
            .join(Lead, Lead.id == Delivery.lead_id)
            .where(Delivery.status == "sent")
            .group_by(Lead.email)
        ).all()
    return Counter({email: n for email, n in rows})


def _add_b2b_leads(engine: Engine, count: int) -> list[str]:
    emails = [f"lead{i:05d}@company{i % 97}.example" for i in range(count)]
    with session_scope(engine) as session:
        session.execute(
            insert(Lead),
            [
                {
                    "email": e,
                    "first_name": f"Lead{i}",
                    "source": "website",
                    "lifecycle_stage": "subscriber",
                    "attributes": {"type": "b2b"},
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i, e in enumerate(emails)
            ],
        )
    return emails


def test_readme_lists_the_commands_this_test_runs() -> None:
    commands = _readme_commands()
    for command in [*SET_UP, WORKER, TICK, PARALLEL_TICK]:
        assert any(command in c for c in commands), command


def test_deployed_tick_sends_mail_and_publishes_counts(
    prefect_server: PrefectServer, smtp_server: SmtpSink, tmp_path: Path
) -> None:
    server = prefect_server
    tick = server.deployment("nurture_tick", "nurture-tick")
    assert tick["work_pool_name"] == "nurture"
    assert tick["global_concurrency_limit"]["limit"] == 1
    assert tick["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert [s["schedule"].get("interval") for s in tick["schedules"]] == [900.0]
    assert tick["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    sync = server.deployment("crm_sync", "crm-sync")
    assert [s["schedule"].get("cron") for s in sync["schedules"]] == ["7 * * * *"]
    report = server.deployment("campaign_report", "campaign-report")
    assert [s["schedule"].get("cron") for s in report["schedules"]] == ["0 8 * * mon"]
    inbox = server.deployment("inbox_poll", "inbox-poll")
    assert [s["schedule"].get("interval") for s in inbox["schedules"]] == [300.0]
    assert inbox["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

    db_path = tmp_path / "nurture.db"
    engine = make_engine(f"sqlite:///{db_path}")
    upgrade(engine)
    with session_scope(engine) as session:
        session.execute(
            insert(Lead),
            [
                {
                    "email": e,
                    "first_name": n,
                    "source": "website",
                    "lifecycle_stage": "subscriber",
                    "attributes": {"type": t},
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for e, n, t in [
                    ("ada@acme.example", "Ada", "b2b"),
                    ("ben@globex.example", "Ben", "b2b"),
                    ("dee@shop.example", "Dee", "retail"),
                ]
            ],
        )
    _save_smtp_block(server, "e2e-smtp", smtp_server.url)
    env = _worker_env(server, f"sqlite:///{db_path}", _campaigns(tmp_path / "campaigns"))
    server.start_worker(WORKER, env, "solo")
    run_id = _trigger(server, TICK, env, now=NOW.isoformat(), smtp_block="e2e-smtp")
    [run] = server.wait_for_runs([run_id], timeout=180)
    assert run["state_type"] == "COMPLETED", server.worker_logs()[-4000:]

    smtp_server.wait_for(2)
    assert sorted(smtp_server.recipients()) == ["ada@acme.example", "ben@globex.example"]
    assert _delivery_counts(engine) == {"ada@acme.example": 1, "ben@globex.example": 1}
    art = server.artifacts(run_id)
    steps = {r["step"]: r for r in art[TICK_TABLE] if r["campaign"] == "e2e-welcome"}
    assert steps["welcome"]["queued"] == 2
    assert (steps[ALL_STEPS]["enrolled"], steps[ALL_STEPS]["queued"]) == (2, 2)
    assert "| sent | 2 |" in art[TICK_HEALTH]
    assert server.wait_for_log(run_id, "sent 2 of 2 due"), server.logs(run_id)
    engine.dispose()


def test_two_workers_tick_concurrently_on_postgres_without_duplicates(
    prefect_server: PrefectServer, smtp_server: SmtpSink, pg_engine: Engine, tmp_path: Path
) -> None:
    server = prefect_server
    leads = 2000
    emails = _add_b2b_leads(pg_engine, leads)
    _save_smtp_block(server, "e2e-smtp-pg", smtp_server.url)
    db_url = pg_engine.url.render_as_string(hide_password=False)
    env = _worker_env(server, db_url, _campaigns(tmp_path / "campaigns"))
    params = {"now": NOW.isoformat(), "smtp_block": "e2e-smtp-pg", "batch_size": 100}
    ids = [_trigger(server, PARALLEL_TICK, env, **params) for _ in range(2)]
    # Both runs wait in the queue; each worker (--limit 1) takes one as soon as it starts.
    for name in ("pg-a", "pg-b"):
        server.start_worker(WORKER, env, name)
    runs = server.wait_for_runs(ids, timeout=300)
    assert [r["state_type"] for r in runs] == ["COMPLETED"] * 2, server.worker_logs()[-4000:]

    # The two runs really overlapped in time.
    starts = sorted(r["start_time"] for r in runs)
    ends = sorted(r["end_time"] for r in runs)
    assert starts[1] < ends[0], (starts, ends)

    smtp_server.wait_for(leads, timeout=30)
    per_recipient = Counter(smtp_server.recipients())
    assert len(per_recipient) == leads and set(per_recipient.values()) == {1}
    assert set(per_recipient) == set(emails)
    counts = _delivery_counts(pg_engine)
    assert len(counts) == leads and set(counts.values()) == {1}
    # Each run's table counts its own share; together they cover every lead exactly once.
    shares = []
    for run_id in ids:
        table = server.artifacts(run_id)[TICK_TABLE]
        shares.append(next(r["queued"] for r in table if r["step"] == ALL_STEPS))
    assert sum(shares) == leads, shares
