"""``nurture crm push|pull|status`` against the fake HubSpot, configured from the environment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from nurture.cli.crm import crm
from nurture.config import get_settings
from tests.fakes.harness import counts, seed_promotions
from tests.fakes.hubspot import FakeHubSpot


@pytest.fixture
def env(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHubSpot]:
    with FakeHubSpot() as fake:
        assert fake.server is not None
        monkeypatch.setenv(
            "NURTURE_DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False)
        )
        monkeypatch.setenv("NURTURE_HUBSPOT_TOKEN", "hs-token")
        monkeypatch.setenv("NURTURE_HUBSPOT_BASE_URL", fake.server.url)
        monkeypatch.setenv("NURTURE_HUBSPOT_PIPELINE", "default")
        monkeypatch.setenv("NURTURE_HUBSPOT_DEAL_STAGE", "qualifiedtobuy")
        get_settings.cache_clear()
        yield fake
        get_settings.cache_clear()


def test_status_dry_run_push_and_pull(
    env: FakeHubSpot, sqlite_engine: Engine, now: datetime
) -> None:
    seed_promotions(sqlite_engine, now, 5, "hubspot")
    runner = CliRunner()
    at = ["--now", now.isoformat()]

    res = runner.invoke(crm, ["status", "--json", *at])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0] | {"parked_reasons": []} == {
        "connector": "hubspot", "queued": 5, "due": 5, "done": 0, "parked": 0, "links": 0,
        "last_pull": None, "parked_reasons": [],
    }  # fmt: skip

    res = runner.invoke(crm, ["push", "--dry-run", "--json", "--connector", "hubspot", *at])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)["push"]["hubspot"]
    assert [p["match"] for p in plan] == ["email"] * 5
    assert env.total_calls == 0 and counts(sqlite_engine, "hubspot")["status"] == {"queued": 5}

    res = runner.invoke(crm, ["push", "--json", *at])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["pushed"] == 5
    assert len(env.objects["contacts"]) == 5 and len(env.objects["deals"]) == 5

    deal = next(iter(env.objects["deals"]))
    env.set_property("deals", deal, dealstage="closedwon")
    res = runner.invoke(crm, ["pull", "--dry-run", "--json", *at])
    assert res.exit_code == 0, res.output
    assert [m["to"] for m in json.loads(res.output)[0]["moves"]] == ["customer"]
    assert counts(sqlite_engine, "hubspot")["stages"] == {"mql": 5}
    res = runner.invoke(crm, ["pull", *at])
    assert res.exit_code == 0 and "moved 1" in res.output
    assert counts(sqlite_engine, "hubspot")["stages"] == {"mql": 4, "customer": 1}

    res = runner.invoke(crm, ["status", *at])
    assert res.exit_code == 0 and "hubspot" in res.output


def test_unknown_connector_and_missing_credentials(
    env: FakeHubSpot, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    res = runner.invoke(crm, ["push", "--connector", "nope"])
    assert res.exit_code == 1 and "unknown connector 'nope'" in res.output
    monkeypatch.delenv("NURTURE_HUBSPOT_TOKEN")
    res = runner.invoke(crm, ["push", "--connector", "hubspot"])
    assert res.exit_code == 1 and "NURTURE_HUBSPOT_TOKEN" in res.output


def test_parked_lists_and_retry_requeues(
    env: FakeHubSpot, sqlite_engine: Engine, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_promotions(sqlite_engine, now, 3, "hubspot")
    monkeypatch.setenv("NURTURE_CRM_PARK_AFTER", "0")  # park at the first retryable failure
    get_settings.cache_clear()
    runner = CliRunner()
    at = ["--now", now.isoformat()]
    env.faults.outage = True
    res = runner.invoke(crm, ["push", "--json", *at])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["parked"] == 3

    res = runner.invoke(crm, ["parked", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 3 and {r["connector"] for r in rows} == {"hubspot"}
    assert all(r["reason"].startswith("still failing after 0 min: ") for r in rows)
    assert all(r["parked_at"] == now.isoformat() for r in rows)
    res = runner.invoke(crm, ["parked"])
    assert res.exit_code == 0 and "3 parked promotions" in res.output

    env.faults.outage = False
    res = runner.invoke(crm, ["retry", "--connector", "hubspot", "--json", *at])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"requeued": 3}
    res = runner.invoke(crm, ["parked", "--json"])
    assert json.loads(res.output) == []
    res = runner.invoke(crm, ["push", "--json", *at])
    assert json.loads(res.output)["pushed"] == 3
    assert counts(sqlite_engine, "hubspot")["status"] == {"done": 3}
