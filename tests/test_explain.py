"""``explain_lead`` and ``nurture leads explain``: the items add up to the stored scores."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import Engine, select

from nurture.cli import cli
from nurture.config import get_settings
from nurture.engagement.scoring import score_all
from nurture.reporting.explain import LeadNotFound, explain_lead
from nurture.spec.schema import ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Account, Event, Lead
from tests.helpers import add_leads

SPEC = {
    "points": {"opened": 2, "clicked": 5, "replied": 15, "bounced": -10, "demo_request": 25},
    "half_life": "14d",
    "fit": [
        {"name": "b2b", "when": {"field": "attributes.type", "op": "eq", "value": "b2b"},
         "points": 20},
        {"name": "big", "when": {"field": "attributes.employees", "op": "gte", "value": 50},
         "points": 17.5},
        {"name": "free mail", "when": {"field": "email", "op": "contains", "value": "@gmail."},
         "points": -10},
    ],
    "grades": {"A": 35, "B": 20, "C": 10, "D": 5},
    "account": {"method": "weighted", "weights": [1.0, 0.5, 0.25]},
}  # fmt: skip


def _seed(engine: Engine, now: datetime) -> list[int]:
    """Four contacts at one account plus a free-mail loner, with random events."""
    with session_scope(engine) as session:
        acme = Account(name="Acme", domain="acme.test", created_at=now, updated_at=now)
        session.add(acme)
        session.flush()
        acme_id = acme.id
    ids = add_leads(
        engine,
        now,
        {"email": "ceo@acme.test", "attributes": {"type": "b2b", "employees": 300}},
        {"email": "ops@acme.test", "attributes": {"type": "b2b", "employees": 300}},
        {"email": "intern@acme.test", "attributes": {"type": "b2c"}},
        {"email": "quiet@acme.test", "attributes": {}},
        {"email": "someone@gmail.com", "attributes": {"type": "b2b"}},
    )
    rng = random.Random(4)
    types = ["opened", "clicked", "replied", "bounced", "demo_request", "custom_thing"]
    with session_scope(engine) as session:
        for lead_id in ids[:4]:
            session.get_one(Lead, lead_id).account_id = acme_id
        for lead_id in ids[:3] + ids[4:]:
            for _ in range(rng.randint(3, 30)):
                when = now - timedelta(seconds=rng.randint(-86400, 120 * 86400))
                session.add(
                    Event(lead_id=lead_id, type=rng.choice(types), occurred_at=when, payload={})
                )
    return ids


def test_explanation_adds_up_to_the_stored_scores(engine: Engine, now: datetime) -> None:
    spec = ScoringSpec.model_validate(SPEC)
    _seed(engine, now)
    score_all(engine, spec, now)
    with session_scope(engine) as session:
        stored = {
            e: (b, f, g)
            for e, b, f, g in session.execute(
                select(Lead.email, Lead.behaviour_score, Lead.fit_score, Lead.grade)
            )
        }
        account_score = session.scalars(select(Account.score)).one()
    for email, (behaviour, fit, grade) in stored.items():
        ex = explain_lead(engine, email, spec, now)
        assert ex.behaviour == pytest.approx(behaviour, abs=1e-6), email
        assert ex.fit == pytest.approx(fit, abs=1e-6), email
        assert ex.grade == grade
        for item in ex.events:
            assert item.occurred_at <= now
            assert item.decayed == pytest.approx(item.points * item.decay)
            assert 0.0 < item.decay <= 1.0
        assert all(i.type != "custom_thing" for i in ex.events)
    ceo = explain_lead(engine, "CEO@acme.test", spec, now)  # case-insensitive fallback
    assert [r.name for r in ceo.fit_rules] == ["b2b", "big"]
    assert ceo.grade == "A"
    assert len(ceo.events) > 0
    assert ceo.account_score == pytest.approx(account_score, abs=1e-6)
    assert [c.weight for c in ceo.account_contacts] == [1.0, 0.5, 0.25]
    assert len({c.email for c in ceo.account_contacts}) == 3
    gmail = explain_lead(engine, "someone@gmail.com", spec, now)
    assert {r.name: r.points for r in gmail.fit_rules} == {"b2b": 20.0, "free mail": -10.0}
    assert gmail.account_id is None and gmail.account_score is None
    assert explain_lead(engine, "quiet@acme.test", spec, now).events == []


def test_unknown_lead(engine: Engine, now: datetime) -> None:
    with pytest.raises(LeadNotFound):
        explain_lead(engine, "nobody@x.test", ScoringSpec(), now)


@pytest.fixture
def cli_env(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """Point the CLI's settings at the test database."""
    monkeypatch.setenv(
        "NURTURE_DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False)
    )
    get_settings.cache_clear()
    yield sqlite_engine
    get_settings.cache_clear()


def test_cli_explain_json_and_table(cli_env: Engine, now: datetime, tmp_path: Path) -> None:
    spec = ScoringSpec.model_validate(SPEC)
    _seed(cli_env, now)
    score_all(cli_env, spec, now)
    path = tmp_path / "scoring.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    runner = CliRunner()
    args = ["leads", "explain", "ops@acme.test", "--scoring", str(path), "--now", now.isoformat()]
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    with session_scope(cli_env) as session:
        lead = session.scalars(select(Lead).where(Lead.email == "ops@acme.test")).one()
    assert data["behaviour"] == pytest.approx(lead.behaviour_score, abs=1e-6)
    assert sum(e["decayed"] for e in data["events"]) == pytest.approx(lead.behaviour_score)
    assert data["fit"] == pytest.approx(lead.fit_score)
    assert data["grade"] == lead.grade
    table = runner.invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert "b2b" in table.output and "account" in table.output and "grade: A" in table.output
    missing = runner.invoke(cli, ["leads", "explain", "nobody@x.test", "--scoring", str(path)])
    assert missing.exit_code == 1
    assert "nobody@x.test" in missing.output
