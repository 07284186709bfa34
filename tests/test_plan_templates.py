"""Template bodies are part of a campaign version: stored with it, a body edit bumps the
version at sync, ``nurture plan`` shows the edit as a diff, and ``nurture replay`` says
when the replayed version's templates differ from the working copy or are unknown."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from alembic import command
from click.testing import CliRunner, Result
from sqlalchemy import Engine, inspect, select, update

from nurture.cli import cli
from nurture.config import get_settings
from nurture.planning.plan import build_plan, plan_markdown
from nurture.spec.programme import Programme
from nurture.spec.schema import PipelineSpec, ScoringSpec
from nurture.store.db import alembic_config, session_scope
from nurture.store.models import Campaign, CampaignVersion
from nurture.tick import prepare_campaigns
from tests.helpers import TEMPLATES, campaign

SPEC = """
name: bodies
audience: {field: source, op: eq, value: website}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: breakup, wait: 2d, template: b2b/breakup}
"""
BREAKUP = "b2b/breakup.html.j2"


def _templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATES, root)
    return root


def _sync(engine: Engine, root: Path, now: datetime) -> None:
    prog = Programme([campaign(SPEC)], ScoringSpec(), PipelineSpec(), root)
    prepare_campaigns(engine, prog, now)


def _versions(engine: Engine) -> list[tuple[int, dict[str, str] | None, bool]]:
    with session_scope(engine) as session:
        return [
            (v.version, v.templates, v.retired_at is not None)
            for v in session.scalars(select(CampaignVersion).order_by(CampaignVersion.version))
        ]


def _edit_body(root: Path) -> None:
    path = root / BREAKUP
    text = path.read_text()
    assert "{% block body %}" in text
    path.write_text(
        text.replace("{% block body %}", "{% block body %}\n<p>One last note from us.</p>", 1)
    )


def test_sync_stores_sources_and_a_body_edit_bumps_the_version(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    root = _templates(tmp_path)
    _sync(engine, root, now)
    ((version, sources, retired),) = _versions(engine)
    assert version == 1 and not retired and sources is not None
    # The templates sent and what they extend, include or import.
    assert {"b2b/welcome.html.j2", BREAKUP, "layouts/base.html.j2"} <= set(sources)
    assert "b2b/case_study_roi.html.j2" not in sources
    assert sources[BREAKUP] == (root / BREAKUP).read_text()
    _sync(engine, root, now + timedelta(hours=1))  # nothing changed: no new version
    assert [v for v, _, _ in _versions(engine)] == [1]
    _edit_body(root)
    _sync(engine, root, now + timedelta(hours=2))
    (v1, s1, r1), (v2, s2, r2) = _versions(engine)
    assert (v1, r1, v2, r2) == (1, True, 2, False)
    assert s1 is not None and s2 is not None
    assert "One last note" in s2[BREAKUP] and "One last note" not in s1[BREAKUP]
    with session_scope(engine) as session:
        assert session.scalar(select(Campaign.version)) == 2
    # A layout edit changes every campaign's mail, so it bumps too.
    base = root / "layouts" / "base.html.j2"
    base.write_text(base.read_text() + "\n{# footer tweak #}\n")
    _sync(engine, root, now + timedelta(hours=3))
    assert [v for v, _, _ in _versions(engine)] == [1, 2, 3]


def test_plan_lists_an_edited_template_with_its_diff_and_nothing_when_unchanged(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    root = _templates(tmp_path)
    _sync(engine, root, now)
    spec = campaign(SPEC)
    same = build_plan(engine, [(None, spec)], now, templates_dir=root)
    assert same.campaigns == [] and same.unchanged == ["bodies"]
    _edit_body(root)
    plan = build_plan(engine, [(None, spec)], now, templates_dir=root)
    (cp,) = plan.campaigns
    assert cp.status == "changed"
    assert [str(c) for c in cp.changes] == [f"~ template {BREAKUP}: +1 -0 lines"]
    assert list(cp.template_diffs) == [BREAKUP]
    assert "+<p>One last note from us.</p>" in cp.template_diffs[BREAKUP]
    md = plan_markdown(plan)
    assert f"<details><summary>template {BREAKUP}</summary>" in md
    assert "```diff\n--- a/b2b/breakup.html.j2\n+++ b/b2b/breakup.html.j2\n" in md
    assert json.dumps(plan.as_json())  # the diff is in the JSON too
    assert "One last note" in plan.as_json()["campaigns"][0]["template_diffs"][BREAKUP]
    # Planning wrote nothing.
    assert [v for v, _, _ in _versions(engine)] == [1]
    # Without the templates folder (as before), a body edit is invisible.
    assert build_plan(engine, [(None, spec)], now).campaigns == []


def test_a_long_template_diff_is_capped(engine: Engine, tmp_path: Path, now: datetime) -> None:
    root = _templates(tmp_path)
    _sync(engine, root, now)
    path = root / BREAKUP
    path.write_text(path.read_text() + "".join(f"{{# line {i} #}}\n" for i in range(200)))
    (cp,) = build_plan(engine, [(None, campaign(SPEC))], now, templates_dir=root).campaigns
    diff = cp.template_diffs[BREAKUP]
    assert len(diff) == 41 and diff[-1].startswith("... (") and "more diff lines" in diff[-1]
    assert str(cp.changes[0]).endswith("+200 -0 lines")


def test_a_version_stored_before_sources_were_kept(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    root = _templates(tmp_path)
    _sync(engine, root, now)
    with session_scope(engine) as session:  # as the 0009 migration leaves older versions
        session.execute(update(CampaignVersion).values(templates=None))
    _edit_body(root)
    spec = campaign(SPEC)
    plan = build_plan(engine, [(None, spec)], now, templates_dir=root, include_unchanged=True)
    (cp,) = plan.campaigns
    assert not cp.changes and cp.template_diffs == {}
    assert any("predates kept template sources" in n for n in cp.notes), cp.notes
    # The next sync records today's sources without inventing a version.
    _sync(engine, root, now + timedelta(hours=1))
    ((version, sources, _),) = _versions(engine)
    assert version == 1 and sources is not None and "One last note" in sources[BREAKUP]


def _run(args: list[str], env: dict[str, str]) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def test_replay_says_when_templates_differ_or_are_unknown(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    root = _templates(tmp_path)
    _sync(engine, root, now)
    env = {
        "NURTURE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "NURTURE_CAMPAIGNS": str(tmp_path),
        "NURTURE_TEMPLATES": str(root),
    }
    args = ["replay", "bodies", "--since", "1d", "--every", "12h", "--until"]
    at = (now + timedelta(days=1)).isoformat()
    same = _run([*args, at, "--json"], env)
    assert same.exit_code == 0, same.output
    assert json.loads(same.output)["templates"] == {"status": "same", "differ": []}
    _edit_body(root)
    differ = _run([*args, at], env)
    assert differ.exit_code == 0, differ.output
    assert "other sources than the working copy" in differ.output and BREAKUP in differ.output
    with session_scope(engine) as session:
        session.execute(update(CampaignVersion).values(templates=None))
    gone = _run([*args, at, "--json"], env)
    assert json.loads(gone.output)["templates"]["status"] == "unavailable"
    human = _run([*args, at], env)
    assert "stored before template sources were kept" in human.output


def test_migration_0009_up_and_down(engine: Engine, tmp_path: Path, now: datetime) -> None:
    root = _templates(tmp_path)
    _sync(engine, root, now)
    cfg = alembic_config(engine)

    def columns() -> set[str]:
        return {c["name"] for c in inspect(engine).get_columns("campaign_versions")}

    assert "templates" in columns()
    command.downgrade(cfg, "0008")
    assert "templates" not in columns()
    with engine.connect() as conn:  # the version rows survive the downgrade
        assert conn.exec_driver_sql("SELECT count(*) FROM campaign_versions").scalar() == 1
    command.upgrade(cfg, "head")
    assert "templates" in columns()
    ((version, sources, _),) = _versions(engine)
    assert version == 1 and sources is None  # older versions: unknown, not invented
