"""The bad-input corpus (tests/data/bad/) through every entry point.

Every input gets a clear error that says where, there is no crash (no traceback), and nothing
is partially corrupted: good rows load, bad ones are listed, the database stays consistent.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from nurture.cli import cli
from nurture.config import get_settings
from nurture.store.db import get_engine, session_scope
from nurture.store.models import Event, Lead
from tests.helpers import TEMPLATES

BAD = Path(__file__).parent / "data" / "bad"


def _run(args: list[str], env: dict[str, str]) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, args, env=env, catch_exceptions=True)
    finally:
        get_settings.cache_clear()


def _no_crash(result: Result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output


# file -> (exit code, what the message or the rejects file must say, leads loaded)
CSV_CASES: dict[str, tuple[int, list[str], int]] = {
    "ok_reference.csv": (0, [], 1),
    "bom_semicolon.csv": (0, [], 2),
    "latin1_bytes.csv": (0, ["2,first_name,not valid UTF-8"], 1),
    "mixed_delimiters.csv": (0, ['2,,"expected 2 cells as in the header, found 1"'], 1),
    "quoted_newline.csv": (0, ["4,email,invalid email 'bad-email'"], 2),
    "missing_email_header.csv": (1, ["missing_email_header.csv", "no email column",
                                     "'first_name'"], 0),
    "duplicate_headers.csv": (1, ["duplicate_headers.csv", "'email' and 'email'"], 0),
    "formula_injection.csv": (0, ["3,email,invalid email", "'@SUM(A1)", "'-2+3"], 1),
    "invalid_and_international_emails.csv": (0, ["2,email,", "3,email,", "4,email,",
                                                 "7,email,missing email"], 2),
    "duplicate_rows.csv": (0, [], 1),
    "nul_byte.csv": (0, ["2,first_name,contains a NUL character"], 0),
    "empty_file.csv": (1, ["empty_file.csv is empty"], 0),
    "utf16.csv": (1, ["utf16.csv is UTF-16"], 0),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CSV_CASES))
def test_csv_corpus(name: str, tmp_path: Path) -> None:
    code, expected, loaded = CSV_CASES[name]
    db = f"sqlite:///{tmp_path}/n.db"
    rejects = tmp_path / "rejects.csv"
    result = _run(
        ["leads", "import", str(BAD / "csv" / name), "--rejects", str(rejects)],
        {"NURTURE_DATABASE_URL": db},
    )
    _no_crash(result)
    assert result.exit_code == code, result.output
    said = result.output + (rejects.read_text("utf-8", "replace") if rejects.exists() else "")
    for text in expected:
        assert text in said, f"{name}: expected {text!r} in:\n{said}"
    if code == 1:
        assert len(result.output.strip().splitlines()) == 1, "one line that names the problem"
    with session_scope(get_engine(db)) as session:
        assert session.scalar(select(func.count(Lead.id))) == loaded
    if rejects.exists():
        rows = list(csv.reader(rejects.open(encoding="utf-8", errors="replace")))
        assert rows[0][:3] == ["line", "field", "reason"]
        assert all(r[0].isdigit() and r[2] for r in rows[1:]), "every reject has line and reason"
        # Nothing a spreadsheet would run: formula-looking cells are neutralised.
        for row in rows[1:]:
            assert not any(cell[:1] in ("=", "+", "-", "@") for cell in row[3:] if cell)


def test_a_one_megabyte_field_is_rejected_and_the_rest_loads(tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    path.write_text(
        "email,notes\nbig@example.com," + "x" * 1_048_576 + "\nsmall@example.com,fine\n"
    )
    db = f"sqlite:///{tmp_path}/n.db"
    result = _run(["leads", "import", str(path), "--json"], {"NURTURE_DATABASE_URL": db})
    _no_crash(result)
    assert result.exit_code == 0
    assert '"rejected": 1' in result.output and '"inserted": 1' in result.output


# spec -> the located message `nurture campaigns validate` must print
SPEC_CASES = {
    "wrong_types.yaml": "wrong_types.yaml:3: steps: Input should be a valid list",
    "unknown_keys.yaml": "unknown_keys.yaml:4: steps.0.delay: unknown key",
    "goto_cycle.yaml": "goto cycle with no wait",
    "unreachable.yaml": "unreachable.yaml:7: steps.1: step 'orphan' is unreachable",
    "unknown_operator.yaml": "unknown_operator.yaml:2: audience.op:",
    "broken_yaml.yaml": "broken_yaml.yaml:2: (top level): invalid YAML",
}


@pytest.mark.parametrize("name", sorted(SPEC_CASES))
def test_spec_corpus(name: str) -> None:
    result = _run(
        ["campaigns", "validate", str(BAD / "specs" / name), "--templates", str(TEMPLATES)], {}
    )
    _no_crash(result)
    assert result.exit_code == 1
    assert SPEC_CASES[name] in result.output


TEMPLATE_CASES = {
    "syntax_error": "syntax_error.html.j2:3",
    "sandbox_escape": "sandbox_escape.html.j2:3",
    "undefined_variable": "undefined_variable.html.j2:3",
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_CASES))
def test_template_corpus(name: str, tmp_path: Path) -> None:
    root = tmp_path / "emails"
    shutil.copytree(TEMPLATES, root)
    (root / "bad").mkdir()
    shutil.copy(BAD / "templates" / f"{name}.html.j2", root / "bad" / f"{name}.html.j2")
    result = _run(["templates", "lint", f"bad/{name}"], {"NURTURE_TEMPLATES": str(root)})
    _no_crash(result)
    assert result.exit_code == 1
    assert TEMPLATE_CASES[name] in result.output
    assert "error" in result.output


def test_event_corpus_reports_every_bad_line_and_loads_nothing_wrong(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/n.db"
    result = _run(
        ["events", "import", str(BAD / "events" / "malformed.jsonl"), "--json"],
        {"NURTURE_DATABASE_URL": db},
    )
    _no_crash(result)
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert [(b["line"], b["field"]) for b in report["bad"]] == [
        (1, "line"), (2, "occurred_at"), (3, "type"), (4, "event"), (5, "payload.a"),
    ]  # fmt: skip
    assert all(b["reason"] for b in report["bad"])
    with session_scope(get_engine(db)) as session:
        assert session.scalar(select(func.count(Event.id))) == 0
