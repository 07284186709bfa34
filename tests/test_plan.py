"""``nurture plan``: the diff, the audience, and a forecast that equals what the ticks send."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select

from nurture.cli import cli
from nurture.config import get_settings
from nurture.journey.sequences import sync_campaigns
from nurture.planning.plan import DAY, build_plan, plan_markdown
from nurture.store.db import session_scope
from nurture.store.models import Campaign, Delivery, Enrollment
from nurture.store.suppression import suppress
from nurture.tick import tick
from tests.helpers import TEMPLATES, add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

V1 = """
name: onboarding
audience:
  all:
    - {field: source, op: eq, value: website}
send_window: {days: [mon, tue, wed, thu, fri], start: "09:00", end: "17:00"}
steps:
  - {id: welcome, template: b2b/welcome}
  - id: case-study
    wait: 2d
    variants:
      - {name: roi, template: b2b/case_study_roi, weight: 50}
      - {name: story, template: b2b/case_study_story, weight: 50}
  - id: demo-offer
    wait: 3d
    branch:
      - when: {field: attributes.type, op: eq, value: b2b}
        template: b2b/demo_offer
      - otherwise: {goto: breakup}
  - {id: breakup, wait: 1d, template: b2b/breakup}
exit_when:
  any:
    - {event: replied, this_campaign: true}
    - {field: lifecycle_stage, op: eq, value: customer}
"""

# The change under review: a dated broadcast after the case study, and a shorter wait.
V2 = V1.replace(
    "  - id: demo-offer\n    wait: 3d\n",
    '  - {id: webinar, template: b2b/welcome, send_at: "2026-03-09 10:00"}\n'
    "  - id: demo-offer\n    wait: 2d\n",
)

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", None]


def _leads(engine: Engine, now: datetime, prefix: str, n: int) -> None:
    add_leads(
        engine,
        now,
        *(
            {
                "email": f"{prefix}{i}@x{i % 3}.example",
                "source": "website" if i % 7 else "social",  # every 7th is outside
                "timezone": ZONES[i % len(ZONES)],
                "country": "JP" if i % 5 == 4 else None,  # no zone: the country's
                "lifecycle_stage": "customer" if i % 11 == 10 else "subscriber",
                "attributes": {"type": "b2b" if i % 2 else "b2c"},
            }
            for i in range(n)
        ),
    )


def test_the_forecast_equals_what_the_ticks_send(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    _leads(engine, now, "early", 14)
    m = mailer(smtp_server.url, connections=1)
    try:
        # Version 1 runs for a day: leads are mid-way through it when the change comes.
        tick(engine, now, programme(campaign(V1)), m, worker="t")
        start = now + DAY
        _leads(engine, now, "late", 16)
        with session_scope(engine) as session:
            suppress(session, ["late1@x1.example"], "unsubscribed", "test", now)
        v2 = campaign(V2)
        days = 10
        plan = build_plan(engine, [(None, v2)], start, days=days)
        (cp,) = plan.campaigns
        assert cp.status == "changed" and cp.version == 1
        # Nothing was written by planning.
        with session_scope(engine) as session:
            assert session.scalar(select(Campaign.version)) == 1
        # Hourly ticks (the clock injected) over the same days, counting what each queues.
        prog = programme(v2)
        sent: dict[str, list[int]] = defaultdict(lambda: [0] * days)
        for hour in range(days * 24):
            at = start + timedelta(hours=hour)
            result = tick(engine, at, prog, m, worker="t")
            assert result.send.failed == 0
            for step, n in result.campaigns["onboarding"].by_step.items():
                sent[step][hour // 24] += n
    finally:
        m.sender.close()
    with session_scope(engine) as session:
        statuses = set(session.scalars(select(Delivery.status)))
    assert statuses == {"sent"}
    forecast = {k: v for k, v in cp.forecast.items() if any(v)}
    assert forecast == dict(sent)
    # A forecast that could fail: several steps, several days, the anchor and the branch.
    assert {"welcome", "case-study", "webinar", "demo-offer", "breakup"} <= set(forecast)
    assert sum(1 for d in range(days) if any(v[d] for v in forecast.values())) >= 4
    assert cp.audience.would_enter > 0 and cp.audience.enrolled > 0
    assert cp.audience.would_exit > 0  # customers and the suppressed lead


def _env(engine: Engine, folder: Path) -> dict[str, str]:
    return {
        "NURTURE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "NURTURE_CAMPAIGNS": str(folder),
        "NURTURE_TEMPLATES": str(TEMPLATES),
    }


def _run(args: list[str], env: dict[str, str]) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def test_plan_shows_diff_audience_stranded_and_writes_nothing(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    _leads(engine, now, "a", 21)
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [campaign(V1)], now)
    from nurture.journey.sequences import advance_due, enroll

    with session_scope(engine) as session:
        assert enroll(session, ref, now) > 0
    advance_due(engine, ref, now)  # those inside their window now wait on case-study
    with session_scope(engine) as session:
        active = dict(
            session.execute(
                select(Enrollment.step_id, func.count())
                .where(Enrollment.status == "active")
                .group_by(Enrollment.step_id)
            ).all()
        )
        enrolled = session.scalar(select(func.count(Enrollment.id)))
    assert set(active) == {"welcome", "case-study"}  # Tokyo and New York wait for 09:00
    folder = tmp_path / "campaigns"
    folder.mkdir()
    changed = yaml.safe_load(V2)
    changed["steps"] = [s for s in changed["steps"] if s["id"] != "case-study"]
    changed["steps"].append({"id": "extra", "wait": "1d", "template": "b2b/breakup"})
    (folder / "onboarding.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    (folder / "fresh.yaml").write_text(
        V1.replace("name: onboarding", "name: fresh").replace("value: website}", "value: social}")
    )
    env = _env(engine, folder)
    out = _run(["plan", "--json", "--now", now.isoformat(), "--days", "7"], env)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    by_name = {c["name"]: c for c in data["campaigns"]}
    onboarding, fresh = by_name["onboarding"], by_name["fresh"]
    kinds = {(c["kind"], c["name"]) for c in onboarding["changes"]}
    assert {("removed", "case-study"), ("added", "webinar"), ("added", "extra")} <= kinds
    demo = next(c for c in onboarding["changes"] if c["name"] == "demo-offer")
    assert "wait 3d -> 2d" in demo["detail"]
    assert onboarding["audience"]["stranded"] == {"case-study": active["case-study"]}
    assert onboarding["audience"]["enrolled"] == sum(active.values())
    assert fresh["status"] == "new" and fresh["audience"]["would_enter"] == 3  # every 7th
    assert fresh["forecast"]["by_step"]["welcome"][0] == 3
    # Planning wrote nothing: no version, no campaign, no enrollment.
    with session_scope(engine) as session:
        assert session.scalar(select(func.count(Campaign.id))) == 1
        assert session.scalar(select(func.count(Enrollment.id))) == enrolled
    md = _run(["plan", "--markdown", "--now", now.isoformat()], env)
    assert md.exit_code == 0
    assert "### onboarding (changed, stored v1)" in md.output
    assert "**stranded** on removed steps: case-study:" in md.output
    assert "```diff\n" in md.output and "- step case-study" in md.output
    human = _run(["plan", "--now", now.isoformat()], env)
    assert human.exit_code == 0 and "stranded" in human.output


def test_plan_unchanged_says_so(engine: Engine, tmp_path: Path, now: datetime) -> None:
    with session_scope(engine) as session:
        sync_campaigns(session, [campaign(V1)], now)
    plan = build_plan(engine, [(None, campaign(V1))], now)
    assert plan.campaigns == [] and plan.unchanged == ["onboarding"]
    assert "No changes" in plan_markdown(plan)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("wait: 2d", "wait: 2 days"), "onboarding.yaml:9: steps.1.wait"),
        (lambda t: t.replace("b2b/breakup", "b2b/gone"), "onboarding.yaml:19: steps.3.template"),
    ],
)
def test_plan_spec_errors_exit_1_with_file_and_line(
    engine: Engine, tmp_path: Path, edit: object, expected: str
) -> None:
    folder = tmp_path / "campaigns"
    folder.mkdir()
    assert callable(edit)
    (folder / "onboarding.yaml").write_text(edit(V1.lstrip()))
    out = _run(["plan"], _env(engine, folder))
    assert out.exit_code == 1
    assert expected in out.output, out.output


def test_plan_template_errors_exit_1_with_file_and_line(engine: Engine, tmp_path: Path) -> None:
    import shutil

    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    (templates / "b2b" / "breakup.html.j2").write_text(
        '{% extends "layouts/base.html.j2" %}\n{% block body %}\n{{ oops( }}\n{% endblock %}\n'
    )
    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "onboarding.yaml").write_text(V1)
    env = _env(engine, folder) | {"NURTURE_TEMPLATES": str(templates)}
    out = _run(["plan", "--json"], env)
    assert out.exit_code == 1
    errs = json.loads(out.output)["errors"]
    assert len(errs) == 1, errs
    (err,) = errs
    assert err["file"].endswith("breakup.html.j2") and err["line"] == 3


def test_diff_names_variant_weights_and_schedule() -> None:
    from nurture.planning.plan import diff_specs

    old = campaign(V1).model_dump(mode="json", by_alias=True)
    new = campaign(
        V1.replace(
            "weight: 50}\n      - {name: story", "weight: 80}\n      - {name: story"
        ).replace("steps:\n", 'stop_at: "2026-12-24 18:00"\nsteps:\n')
    )
    changes = [str(c) for c in diff_specs(old, new)]
    assert "~ step case-study: variant roi weight 50.0 -> 80.0" in changes
    assert any(c.startswith("~ schedule stop_at: null -> ") for c in changes), changes
    assert str(diff_specs(None, new)[0]) == "+ step welcome: templates b2b/welcome"
