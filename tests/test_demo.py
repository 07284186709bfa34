"""A short ``nurture demo``: leads sign up between ticks and get their first touch within
minutes, and the simulated sales team takes promoted leads to sql, opportunity, customer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from nurture.config import get_settings
from nurture.flows.demo_cli import demo


def test_short_demo_first_touch_inside_the_window_and_the_funnel_reaches_customers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo points these at its own database, sink and secret. Set then deleted, so
    # monkeypatch puts back what was there before (or nothing) and later tests don't
    # inherit the demo's (delenv alone records nothing for an absent variable).
    for key in (
        "NURTURE_DATABASE_URL",
        "NURTURE_SMTP_URL",
        "NURTURE_TRACKING_URL",
        "NURTURE_SECRET_KEY",
        "NURTURE_ALERT_WEBHOOKS",
    ):
        monkeypatch.setenv(key, os.environ.get(key, ""))
        monkeypatch.delenv(key)
    monkeypatch.setenv("NURTURE_ENV", "development")
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(
            demo,
            ["--days", "14", "--leads", "700", "--dir", str(tmp_path / "demo"), "--json"],
        )
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    totals = out["totals"]
    # Cohorts signed up between ticks, and the first-touch passes sent their first steps.
    assert totals["first_touch_sent"] > 0
    window = out["speed_in_window"]
    assert window is not None and window["captured"] > 20
    assert 0 < window["median_minutes"] < 15
    # Overall, leads captured outside the window wait for it: the overall median is longer.
    assert out["speed_to_lead"]["median_minutes"] > window["median_minutes"]
    reached = {s: sum(f[s] for f in out["funnel"]) for s in ("sql", "opportunity", "customer")}
    assert all(n > 0 for n in reached.values()), reached
    assert out["backtest"]["auc"] is not None and out["alerts"] > 0
