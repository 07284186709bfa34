"""Campaign specs: good files load, each bad file gets errors at the right file, line and key."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from sqlalchemy.dialects import postgresql, sqlite

from nurture.cli import cli
from nurture.config import get_settings
from nurture.journey.segments import RuleContext, compile_rule
from nurture.spec.schema import (
    CampaignSpec,
    SpecError,
    SpecErrors,
    Wait,
    check_campaigns,
    load_campaign,
    load_campaigns,
    load_scoring,
    template_exists,
)
from nurture.store.models import Enrollment

DATA = Path(__file__).parent / "data" / "specs"
GOOD = DATA / "good"
BAD = DATA / "bad"
TEMPLATES = [
    "basic/one", "basic/two", "basic/three",
    "b2b/welcome", "b2b/case_study_roi", "b2b/case_study_story", "b2b/demo_offer", "b2b/breakup",
    "retail/miss_you", "retail/offer", "retail/last_call",
]  # fmt: skip
EXPECT = re.compile(r"^# expect: (\d+) ([^:]*): (.+)$")


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A template folder of our own holding exactly the templates the samples may use."""
    root = tmp_path / "templates"
    for name in TEMPLATES:
        path = root / f"{name}.html.j2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("<p>Hello {{ lead.first_name }}</p>\n", encoding="utf-8")
    return root


def expectations(path: Path) -> list[tuple[int, str, str]]:
    """The ``# expect: LINE KEY: MESSAGE`` comments at the top of a bad sample."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = EXPECT.match(line)
        if match:
            out.append((int(match.group(1)), match.group(2), match.group(3)))
    return out


# --- loading ----------------------------------------------------------------------------------


def test_good_campaigns_load(templates: Path) -> None:
    specs = load_campaigns([GOOD], template_exists(templates))
    assert [s.name for s in specs] == ["b2b-inbound-welcome", "retail-winback"]  # no scoring
    b2b, retail = specs
    assert [s.id for s in b2b.steps] == ["welcome", "case-study", "demo-offer", "breakup"]
    assert b2b.step("case-study").wait_spec == Wait(delay=timedelta(days=2))
    assert b2b.step("breakup").wait_spec == Wait(weekday=0, at=time(9, 0))
    arms = b2b.step("demo-offer").branch or []
    assert arms[1].when is None and arms[1].goto == "breakup"  # the "otherwise" arm
    assert b2b.send_window is not None
    # An unquoted 17:30 is a base-60 int to YAML 1.1; it must still mean half past five.
    assert (b2b.send_window.start, b2b.send_window.end) == (time(9, 0), time(17, 30))
    assert b2b.templates() == {
        "b2b/welcome", "b2b/case_study_roi", "b2b/case_study_story", "b2b/demo_offer",
        "b2b/breakup",
    }  # fmt: skip
    assert retail.active is False
    assert b2b.digest() == load_campaign(GOOD / "b2b-welcome.yaml").digest()


def test_good_campaign_rules_compile_on_both_dialects(templates: Path) -> None:
    ctx = RuleContext(now=datetime(2026, 3, 3, tzinfo=UTC), campaign_id=1,
                      enrollment_id=Enrollment.id)  # fmt: skip
    for spec in load_campaigns([GOOD], template_exists(templates)):
        rules = [spec.audience, spec.exit_when, spec.promote.when if spec.promote else None]
        rules += [arm.when for step in spec.steps for arm in step.branch or []]
        for rule in filter(None, rules):
            expr = compile_rule(rule, ctx)
            for dialect in (sqlite.dialect(), postgresql.dialect()):
                assert "leads." in str(expr.compile(dialect=dialect))


BAD_FILES = sorted(BAD.glob("*.yaml"))


def test_every_bad_sample_states_what_it_expects() -> None:
    assert len(BAD_FILES) >= 15
    for path in BAD_FILES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_sample_errors_name_file_line_and_key(path: Path, templates: Path) -> None:
    good, errors = check_campaigns([path], template_exists(templates))
    assert good == []
    got = sorted((e.line, e.key, e.message) for e in errors)
    want = sorted(expectations(path))
    assert len(got) == len(want), "\n".join(map(str, errors))
    for (line, key, message), (want_line, want_key, want_message) in zip(got, want, strict=True):
        assert (line, key) == (want_line, want_key), "\n".join(map(str, errors))
        assert message.startswith(want_message), message
    assert all(e.file == str(path) for e in errors)


def test_error_text_is_file_line_key_message() -> None:
    with pytest.raises(SpecErrors) as caught:
        load_campaign(BAD / "bad_wait.yaml")
    assert str(caught.value) == (
        f"{BAD / 'bad_wait.yaml'}:8: steps.1.wait: "
        "expected a wait like 30m, 4h, 2d or 'next mon at 09:00', got '2x'"
    )
    assert str(SpecError("f.yaml", None, "", "cannot read")) == "f.yaml: (top level): cannot read"


def test_load_campaigns_reports_every_file_and_keeps_good_ones(templates: Path) -> None:
    paths = [GOOD, BAD / "bad_wait.yaml", BAD / "unknown_key.yaml"]
    good, errors = check_campaigns(paths, template_exists(templates))
    assert [s.name for _, s in good] == ["b2b-inbound-welcome", "retail-winback"]
    assert {Path(e.file).name for e in errors} == {"bad_wait.yaml", "unknown_key.yaml"}
    with pytest.raises(SpecErrors) as caught:
        load_campaigns(paths, template_exists(templates))
    assert len(caught.value.errors) == 2


def test_templates_are_only_checked_when_asked() -> None:
    assert load_campaign(BAD / "unknown_template.yaml").name == "unknown-template"


def test_duplicate_campaign_name_across_files(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text((GOOD / "retail-winback.yml").read_text(encoding="utf-8"), encoding="utf-8")
    second = tmp_path / "b.yaml"
    second.write_text("# a copy\n" + first.read_text(encoding="utf-8"), encoding="utf-8")
    good, errors = check_campaigns([tmp_path])
    assert [p.name for p, _ in good] == ["a.yaml"]
    assert [(Path(e.file).name, e.line, e.key) for e in errors] == [("b.yaml", 2, "name")]
    assert "also in" in errors[0].message and str(first) in errors[0].message


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad_bytes = tmp_path / "latin1.yaml"
    bad_bytes.write_bytes(b"name: caf\xe9\n")
    _, errors = check_campaigns([tmp_path / "missing.yaml", bad_bytes])
    assert [Path(e.file).name for e in errors] == ["missing.yaml", "latin1.yaml"]
    assert all("cannot read" in e.message for e in errors)


def test_graph_errors_still_raise_from_the_model() -> None:
    """Code that builds a spec from a dict (e.g. the stored copy) gets the same checks."""
    data = {
        "name": "x",
        "audience": {"field": "source", "value": "website"},
        "steps": [{"id": "a", "template": "t"}, {"id": "a", "template": "t"}],
    }
    with pytest.raises(ValidationError, match="duplicate step id 'a'"):
        CampaignSpec.model_validate(data)


def test_scoring_rules_cannot_use_campaign_events(tmp_path: Path) -> None:
    path = tmp_path / "scoring.yaml"
    path.write_text(
        "fit:\n"
        "  - when:\n"
        "      all:\n"
        "        - {field: country, value: US}\n"
        "        - {event: clicked, this_campaign: true}\n"
        "    points: 10\n",
        encoding="utf-8",
    )
    with pytest.raises(SpecErrors) as caught:
        load_scoring(path)
    (err,) = caught.value.errors
    assert (err.line, err.key) == (5, "fit.0.when.all.1.this_campaign")
    assert err.message == "this_campaign only works inside a campaign"


def test_scoring_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = tmp_path / "scoring.yaml"
    path.write_text("points:\n  opened: 1\n clicked: 2\n", encoding="utf-8")
    with pytest.raises(SpecErrors) as caught:
        load_scoring(path)
    (err,) = caught.value.errors
    assert (err.file, err.line) == (str(path), 3)
    assert err.message.startswith("invalid YAML")


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, templates: Path) -> Iterator[None]:
    """Point NURTURE_TEMPLATES / NURTURE_CAMPAIGNS at test folders, for the settings' cache."""
    monkeypatch.setenv("NURTURE_TEMPLATES", str(templates))
    monkeypatch.setenv("NURTURE_CAMPAIGNS", str(GOOD))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["campaigns", *args], catch_exceptions=False)
    return result.exit_code, result.stdout


def test_cli_validate_good_folder(env: None) -> None:
    code, out = run("validate", str(GOOD))
    assert code == 0, out
    lines = out.splitlines()
    assert lines == [
        f"OK {GOOD / 'b2b-welcome.yaml'}: b2b-inbound-welcome (4 steps)",
        f"OK {GOOD / 'retail-winback.yml'}: retail-winback (3 steps)",
    ]
    code, out = run("validate", "--json", str(GOOD / "retail-winback.yml"))
    assert code == 0
    assert json.loads(out) == {"ok": True, "campaigns": ["retail-winback"], "errors": []}


def test_cli_validate_bad_files_json(env: None) -> None:
    code, out = run("validate", "--json", str(GOOD), str(BAD / "goto_unknown.yaml"))
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert report["campaigns"] == ["b2b-inbound-welcome", "retail-winback"]
    assert report["errors"] == [
        {
            "file": str(BAD / "goto_unknown.yaml"),
            "line": 14,
            "key": "steps.1.branch.1.otherwise.goto",
            "message": "goto names unknown step 'farewell': expected one of welcome, fork",
        },
        {
            "file": str(BAD / "goto_unknown.yaml"),
            "line": 12,
            "key": "steps.1.branch.0.when.since_step",
            "message": "since_step names unknown step 'welcom': expected one of welcome, fork",
        },
    ]


def test_cli_validate_whole_bad_folder(env: None) -> None:
    code, out = run("validate", "--json", str(BAD))
    assert code == 1
    report = json.loads(out)
    assert report["campaigns"] == []
    assert {Path(e["file"]).name for e in report["errors"]} == {p.name for p in BAD_FILES}
    assert all(isinstance(e["line"], int) for e in report["errors"])
    # Human output: one "file:line: key: message" line per error.
    code, out = run("validate", str(BAD))
    assert code == 1
    assert len(out.splitlines()) == len(report["errors"])
    assert f"{BAD / 'unknown_key.yaml'}:8: steps.0.colour: unknown key" in out.splitlines()


def test_cli_validate_uses_the_templates_option(env: None, tmp_path: Path) -> None:
    empty = tmp_path / "no-templates"
    empty.mkdir()
    code, out = run("validate", "--json", "--templates", str(empty), str(GOOD))
    assert code == 1
    errors = json.loads(out)["errors"]
    assert len(errors) == 5 + 3  # every template of both campaigns
    assert errors[0]["key"] == "steps.0.template" and errors[0]["line"] == 14


def test_cli_validate_missing_template_folder(env: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["campaigns", "validate", "--templates", str(tmp_path / "nope"), str(GOOD)]
    )
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())  # rich wraps long lines at the terminal width
    assert f"template folder {tmp_path / 'nope'} does not exist" in message


def test_cli_validate_empty_folder(env: None, tmp_path: Path) -> None:
    code, out = run("validate", "--json", str(tmp_path))
    assert code == 1
    assert "no campaign files" in json.loads(out)["errors"][0]["message"]


def test_cli_list(env: None) -> None:
    code, out = run("list", "--json")
    assert code == 0
    rows = json.loads(out)["campaigns"]
    assert [(r["name"], r["steps"], r["active"]) for r in rows] == [
        ("b2b-inbound-welcome", 4, True),
        ("retail-winback", 3, False),
    ]
    code, out = run("list")
    assert code == 0
    assert "b2b-inbound-welcome" in out and "retail-winback" in out


def test_cli_list_reports_invalid_files(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_CAMPAIGNS", str(BAD))
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["campaigns", "list"])
    assert result.exit_code == 1
    assert "invalid file(s) skipped" in result.stderr
