"""The Prefect flows in process, under one prefect_test_harness for the session.

Each test runs a real flow against real SQLite and a real SMTP server, then reads what the
run published (artifacts) back from the Prefect API.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Engine, select

from nurture.errors import NurtureError
from nurture.flows.artifacts import ALL_STEPS, FUNNEL, TICK_HEALTH, TICK_PROGRESS, TICK_TABLE
from nurture.flows.blocks import NurtureSmtp
from nurture.flows.runtime import mailer_for, programme_for
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Lead
from tests.helpers import TEMPLATES, add_leads
from tests.servers import SmtpSink

CAMPAIGN = """
name: b2b-flow-test
audience:
  all:
    - {field: attributes.type, op: eq, value: b2b}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: breakup, wait: 5d, template: b2b/breakup}
"""

NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)


@pytest.fixture
def campaigns_dir(tmp_path: Path) -> Path:
    """A campaigns folder with one two-step B2B campaign."""
    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "b2b-flow-test.yaml").write_text(CAMPAIGN)
    return folder


@pytest.fixture(autouse=True)
def _fresh_runtime() -> Iterator[None]:
    """Each test gets its own mailer (SMTP server) and programme (campaigns folder)."""
    mailer_for.cache_clear()
    programme_for.cache_clear()
    yield
    mailer_for.cache_clear()
    programme_for.cache_clear()


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        rows = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    out: dict[str, Any] = {}
    for row in rows:
        data = row.data
        if row.type == "table" and isinstance(data, str):
            data = json.loads(data)
        out[str(row.key)] = data
    return out


def _task_names(run_id: UUID) -> Counter[str]:
    """How many task runs of each name the flow run made (names without their suffix)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    return Counter(r.name.rsplit("-", 1)[0] for r in runs)


def _run_tick(engine: Engine, campaigns: Path, **params: Any) -> tuple[dict[str, Any], UUID]:
    from nurture.flows.tick import nurture_tick

    state = nurture_tick(
        now=NOW.isoformat(),
        database_url=engine.url.render_as_string(hide_password=False),
        campaigns_dir=str(campaigns),
        templates_dir=str(TEMPLATES),
        return_state=True,
        **params,
    )
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    return state.result(), flow_run_id


def _leads(engine: Engine) -> None:
    add_leads(
        engine,
        NOW,
        {"email": "ada@acme.example", "first_name": "Ada", "attributes": {"type": "b2b"}},
        {"email": "ben@globex.example", "first_name": "Ben", "attributes": {"type": "b2b"}},
        {"email": "cyd@initech.example", "first_name": "Cyd", "attributes": {"type": "b2b"}},
        {"email": "dee@shop.example", "first_name": "Dee", "attributes": {"type": "retail"}},
    )


def test_tick_flow_sends_welcome_through_the_smtp_block_and_publishes_counts(
    harness: None, sqlite_engine: Engine, smtp_server: SmtpSink, campaigns_dir: Path
) -> None:
    _leads(sqlite_engine)
    NurtureSmtp(url=smtp_server.url, from_address="Flow Test <hi@flows.example>").save(
        "flow-test-smtp", overwrite=True
    )
    details, run_id = _run_tick(
        sqlite_engine, campaigns_dir, smtp_block="flow-test-smtp", batch_size=2
    )

    # The three B2B leads got the welcome step, from the block's sender; the retail lead none.
    smtp_server.wait_for(3)
    assert sorted(smtp_server.recipients()) == [
        "ada@acme.example",
        "ben@globex.example",
        "cyd@initech.example",
    ]
    for rcpt, msg in smtp_server.messages:
        assert msg["From"] == "Flow Test <hi@flows.example>"
        name = rcpt.split("@")[0].capitalize()
        body = msg.get_body(preferencelist=("plain",))
        assert body is not None and name in body.get_content()
    with session_scope(sqlite_engine) as session:
        sent = sorted(
            session.execute(
                select(Lead.email, Delivery.step_id)
                .join(Lead, Lead.id == Delivery.lead_id)
                .where(Delivery.status == "sent")
            ).all()
        )
    assert sent == [
        ("ada@acme.example", "welcome"),
        ("ben@globex.example", "welcome"),
        ("cyd@initech.example", "welcome"),
    ]
    assert details["sent"] == 3 and details["enrolled"] == 3

    art = _artifacts(run_id)
    table = art[TICK_TABLE]
    assert {k: v for k, v in table[0].items() if v is not None} == {
        "campaign": "b2b-flow-test",
        "step": "welcome",
        "queued": 3,
    }
    total = next(r for r in table if r["step"] == ALL_STEPS)
    assert (total["enrolled"], total["queued"], total["exited"]) == (3, 3, 0)
    assert "| sent | 3 |" in art[TICK_HEALTH]
    assert "Nothing failed" in art[TICK_HEALTH]
    # Three due messages in batches of two: a long send, so a progress artifact, at 100 %.
    assert art[TICK_PROGRESS] == 100.0
    # The flow ran nurture.tick.tick's one stage order, each stage a task, and the one send
    # loop with one task per batch (two batches of at most two).
    assert _task_names(run_id) == {
        "sync": 1,
        "held": 1,
        "enroll": 1,
        "advance": 1,
        "recover": 1,
        "skip": 1,
        "send": 2,
        "double-opt-in": 1,
        "score": 1,
        "stages": 1,
        "queue-promotions": 1,
        "promote": 1,
        "crm-deletions": 1,
        "alerts": 1,
    }


def test_tick_flow_shows_rejections_in_the_health_artifact(
    harness: None, sqlite_engine: Engine, smtp_server: SmtpSink, campaigns_dir: Path
) -> None:
    _leads(sqlite_engine)
    smtp_server.rcpt_hook = lambda rcpt: "550 5.1.1 no such user" if "ben" in rcpt else None
    NurtureSmtp(url=smtp_server.url).save("flow-test-smtp", overwrite=True)
    details, run_id = _run_tick(sqlite_engine, campaigns_dir, smtp_block="flow-test-smtp")

    assert details["sent"] == 2 and details["failed"] == 1
    assert sorted(smtp_server.recipients()) == ["ada@acme.example", "cyd@initech.example"]
    health = _artifacts(run_id)[TICK_HEALTH]
    assert "Needs attention" in health
    assert "| failed | 1 |" in health
    assert "| rejected 550 | 1 |" in health
    # One batch only: no progress artifact for a short send.
    assert TICK_PROGRESS not in _artifacts(run_id)


def test_import_and_report_flows(
    harness: None,
    sqlite_engine: Engine,
    smtp_server: SmtpSink,
    campaigns_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nurture.flows.lead_import import import_leads
    from nurture.flows.report import campaign_report

    csv = tmp_path / "leads.csv"
    csv.write_text(
        "email,first_name,type\n"
        "ada@acme.example,Ada,b2b\n"
        "ben@globex.example,Ben,b2b\n"
        "not-an-email,Bad,b2b\n"
    )
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"email": "cyd@initech.example", "first_name": "Cyd", "type": "retail"}\n')
    db = sqlite_engine.url.render_as_string(hide_password=False)
    rows = import_leads(
        paths=[str(csv), str(jsonl)], source="website", now=NOW.isoformat(), database_url=db
    )
    assert [(r["read"], r["inserted"], r["rejected"]) for r in rows] == [(3, 2, 1), (1, 1, 0)]

    monkeypatch.setenv("NURTURE_SMTP_URL", smtp_server.url)
    from nurture.config import get_settings

    get_settings.cache_clear()
    try:
        details, _ = _run_tick(sqlite_engine, campaigns_dir)
    finally:
        get_settings.cache_clear()
    assert details["sent"] == 2

    state = campaign_report(now=NOW.isoformat(), database_url=db, return_state=True)
    text = state.result()
    assert "| b2b-flow-test | 2 | 2 |" in text
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    artifacts = _artifacts(run_id)
    assert artifacts[FUNNEL] == text
    assert "Stages" in artifacts["campaign-report"]
    assert "report-stages" in artifacts


def test_crm_sync_flow_pushes_the_queue_and_publishes_counts(
    harness: None, sqlite_engine: Engine, tmp_path: Path
) -> None:
    from nurture.flows.artifacts import CRM_SYNC
    from nurture.flows.crm_sync import crm_sync
    from nurture.store.models import Promotion

    folder = tmp_path / "crm-campaigns"
    folder.mkdir()
    (folder / "promote.yaml").write_text(
        CAMPAIGN
        + "promote:\n  when: {score: behaviour, op: gte, value: 99}\n"
        + "  to: {connector: local, stage: mql}\n"
    )
    ids = add_leads(
        sqlite_engine,
        NOW,
        {"email": "ada@acme.example", "attributes": {"type": "b2b"}},
        {"email": "ben@globex.example", "attributes": {"type": "b2b"}},
        {"email": "cy@initech.example", "attributes": {"type": "b2b"}},
    )
    with session_scope(sqlite_engine) as session:
        session.add_all(
            Promotion(
                lead_id=i, connector="local", stage="mql", created_at=NOW, next_attempt_at=NOW
            )
            for i in ids[:2]
        )
        # One parked earlier: the flow reports it in its counts until someone requeues it.
        session.add(
            Promotion(
                lead_id=ids[2], connector="local", stage="sql", created_at=NOW,
                next_attempt_at=NOW, status="parked", last_error="local: refused", parked_at=NOW,
            )
        )  # fmt: skip
    state = crm_sync(
        now=NOW.isoformat(),
        database_url=sqlite_engine.url.render_as_string(hide_password=False),
        campaigns_dir=str(folder),
        templates_dir=str(TEMPLATES),
        return_state=True,
    )
    out = state.result()
    assert [
        (r["connector"], r["pushed"], r["parked"], r["parked_total"]) for r in out["pushed"]
    ] == [("local", 2, 0, 1)]
    assert [(r["connector"], r["pulled"]) for r in out["pulled"]] == [("local", 0)]
    with session_scope(sqlite_engine) as session:
        stages = set(session.scalars(select(Lead.lifecycle_stage).where(Lead.id.in_(ids[:2]))))
        done = set(session.scalars(select(Promotion.status).where(Promotion.lead_id != ids[2])))
    assert stages == {"mql"} and done == {"done"}
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    assert "| local | 2 | 0 | 0 | 1 | 0 | 0 | 0 |" in _artifacts(run_id)[CRM_SYNC]


def test_plan_and_pause_flows(
    harness: None, sqlite_engine: Engine, smtp_server: SmtpSink, campaigns_dir: Path
) -> None:
    from nurture.flows.pause import PAUSE_ARTIFACT, pause_campaign
    from nurture.flows.plan import PLAN_ARTIFACT, campaign_plan
    from nurture.journey.pauses import paused_campaigns

    db = sqlite_engine.url.render_as_string(hide_password=False)
    _leads(sqlite_engine)
    state = campaign_plan(
        now=NOW.isoformat(),
        database_url=db,
        campaigns_dir=str(campaigns_dir),
        templates_dir=str(TEMPLATES),
        days=7,
        return_state=True,
    )
    text = state.result()
    assert "### b2b-flow-test (new)" in text and "would enter now: **3**" in text
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    assert _artifacts(run_id)[PLAN_ARTIFACT] == text
    with session_scope(sqlite_engine) as session:
        assert session.scalars(select(Delivery.id)).first() is None  # the plan wrote nothing
    rated = campaign_plan(
        now=NOW.isoformat(),
        database_url=db,
        campaigns_dir=str(campaigns_dir),
        templates_dir=str(TEMPLATES),
        days=7,
        rates="history",
        since_days=30,
    )
    assert "Rates observed over the last 30 days" in rated  # a new campaign: no history
    assert "forecast with no engagement and no exits" in rated
    with pytest.raises(NurtureError, match="rates must be one of none, history, not 'foo'"):
        campaign_plan(now=NOW.isoformat(), database_url=db, rates="foo")

    from nurture.journey.sequences import sync_campaigns
    from nurture.spec.programme import Programme

    with session_scope(sqlite_engine) as session:
        sync_campaigns(session, Programme.load(campaigns_dir, TEMPLATES).campaigns, NOW)
    out = pause_campaign(
        campaign="b2b-flow-test", reason="broken link", operator="ops", database_url=db
    )
    assert out["paused"] and out["reason"] == "broken link" and out["paused_by"] == "ops"
    with session_scope(sqlite_engine) as session:
        assert set(paused_campaigns(session)) == {"b2b-flow-test"}
    state = pause_campaign(
        campaign="b2b-flow-test", action="resume", database_url=db, return_state=True
    )
    assert state.result()["resumed"] is True
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    assert "resumed" in _artifacts(run_id)[PAUSE_ARTIFACT]
    with session_scope(sqlite_engine) as session:
        assert paused_campaigns(session) == {}
