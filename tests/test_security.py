"""Security promises that cut across modules: header injection at send time, and secrets
that never show in reprs, logs or exceptions."""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select, update

from nurture.cli.common import shown
from nurture.config import Settings, get_settings
from nurture.db import session_scope
from nurture.models import Event, Lead, Suppression
from nurture.smtp_transport import SmtpConfig
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

HELLO = campaign("""
name: hello
audience: {field: source, op: eq, value: website}
steps:
  - {id: one, template: b2b/welcome}
""")


def test_cr_lf_in_lead_fields_never_becomes_a_header(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    evil = "Eve\r\nBcc: victim@example.com"
    add_leads(
        engine,
        now,
        {"email": "ok@example.com", "first_name": "Ok"},
        {"email": "evil@example.com", "first_name": evil, "last_name": evil},
    )
    m = mailer(smtp_server.url)
    tick(engine, now, programme(HELLO), m, worker="sec")
    m.sender.close()
    # Lead values only reach headers through the subject, which is flattened to one line;
    # the envelope goes to the lead's own address and nowhere else.
    assert sorted(smtp_server.recipients()) == ["evil@example.com", "ok@example.com"]
    for _, msg in smtp_server.messages:
        assert msg.get("Bcc") is None
        assert "\n" not in str(msg["Subject"]) and "\r" not in str(msg["Subject"])
        assert "victim" not in str(msg["To"])


def test_settings_and_smtp_config_never_show_secrets(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(
        smtp_url="smtp://mailer:hunter2-smtp@mail.example:587",  # type: ignore[arg-type]
        secret_key="hunter2-signing",  # type: ignore[arg-type]
        webhook_secret="hunter2-webhook",  # type: ignore[arg-type]
    )
    config = SmtpConfig.from_url(settings.smtp_url)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("nurture").info("settings %s %r %s", settings, settings, config)
    shown = " ".join([repr(settings), str(settings), repr(config), str(config), caplog.text])
    assert "hunter2" not in shown
    with pytest.raises(ValueError) as excinfo:
        SmtpConfig.from_url("smtp://mailer:hunter2-smtp@mail.example:notaport")
    assert "hunter2" not in str(excinfo.value)


# -- lead text through rich and matplotlib -------------------------------------------------

MARKUP = "[/]"  # a closing tag with nothing open: rich raises MarkupError on it
MATH = "$x^$"  # math text matplotlib cannot parse


def test_shown_escapes_markup_and_makes_controls_visible() -> None:
    from rich.console import Console

    value = "a[/]b[bold]c\x1b[31m\u202ed\ud800\\"
    text = shown(value)
    assert "\x1b" not in text and "\u202e" not in text and "\ud800" not in text
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(f"[bold]{text}[/]")  # would raise without the escape (the closing tag)
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert printed == "a[/]b[bold]c\\x1b[31m\\u202ed\\ud800\\\n"


@pytest.fixture
def cli_db(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The CLI's settings pointed at the test database."""
    monkeypatch.setenv("NURTURE_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    yield engine
    get_settings.cache_clear()


def test_events_import_error_table_prints_lead_text_and_never_fails_after_commit(
    cli_db: Engine, now: datetime, tmp_path: Path
) -> None:
    from nurture.cli.events import events as events_cli

    add_leads(cli_db, now, {"email": "a@example.com"})
    path = tmp_path / "events[b].jsonl"  # a file name is no markup either
    lines = [
        # No id: only a successful first run keeps a rerun from recording it again.
        {"type": "page_view", "email": "a@example.com", "occurred_at": "2026-03-01T09:00:00Z"},
        {"type": f"bad{MARKUP}\x1b[2J", "email": "a@example.com",
         "occurred_at": "2026-03-01T09:00:00Z"},
        {"type": "opened", "email": "a@example.com", "occurred_at": f"{MARKUP}{MATH}"},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(events_cli, ["import", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 inserted" in result.output and "2 bad" in result.output
    assert "events[b].jsonl" in result.output
    assert "skipped lines" in result.output
    assert f"bad{MARKUP}" in result.output and "\x1b" not in result.output
    with session_scope(cli_db) as s:
        assert s.scalar(select(func.count(Event.id))) == 1


def test_suppress_list_and_explain_print_markup_literally(cli_db: Engine, now: datetime) -> None:
    from nurture.cli import cli

    with session_scope(cli_db) as s:
        s.add(Suppression(email=f"x{MARKUP}@example.com", reason=MARKUP, source=MATH,
                          created_at=now))  # fmt: skip
    add_leads(cli_db, now, {"email": "dana@example.com", "first_name": MARKUP})
    result = CliRunner().invoke(cli, ["suppress", "list"])
    assert result.exit_code == 0, result.output
    assert f"x{MARKUP}@example.com" in result.output
    result = CliRunner().invoke(cli, ["leads", "explain", f"nobody{MARKUP}@example.com"])
    assert result.exit_code == 1 and f"nobody{MARKUP}@example.com" in result.output


def test_report_and_html_report_with_markup_and_math_in_stage_and_owner(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nurture.cli.report import report as report_command
    from tests.test_reports import T0, H, History, stage_history

    stage_history(sqlite_engine)
    more = History(sqlite_engine, ids=itertools.count(5000))
    odd = more.lead(T0 + 6 * H)
    more.move(odd, [(f"{MATH}{MARKUP}", T0 + 7 * H), ("mql", T0 + 8 * H)])
    more.save()
    with session_scope(sqlite_engine) as s:
        s.execute(update(Lead).values(owner=f"{MARKUP}{MATH}\x1b[31m"))
    monkeypatch.setenv("NURTURE_DATABASE_URL", str(sqlite_engine.url))
    get_settings.cache_clear()
    try:
        out = tmp_path / "report.html"
        result = CliRunner().invoke(report_command, ["--by", "owner", "--html", str(out)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert f"{MARKUP}{MATH}\\x1b[31m" in result.output  # the owner, literally
    assert f"{MATH}{MARKUP}" in result.output  # the stage
    html = out.read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == 2
    assert "$x^$[/]" in html and "\x1b" not in html


# -- international addresses through the real send path ------------------------------------


@pytest.mark.parametrize("smtputf8", [True, False], ids=["smtputf8", "no-smtputf8"])
def test_international_addresses_over_smtp(engine: Engine, now: datetime, smtputf8: bool) -> None:
    """A Unicode domain goes as A-labels everywhere; a Unicode local part needs SMTPUTF8."""
    from email import message_from_string, policy

    from nurture.models import Delivery

    server = SmtpSink(smtputf8=smtputf8).start()
    try:
        add_leads(
            engine,
            now,
            {"email": "ann@bücher.example", "first_name": "Ann"},
            {"email": "zoë@bücher.example", "first_name": "Zoë"},
        )
        m = mailer(server.url)
        report = tick(engine, now, programme(HELLO), m, worker="idn")
        m.sender.close()
    finally:
        server.stop()
    with session_scope(engine) as s:
        status = {
            email: (st, err)
            for email, st, err in s.execute(
                select(Lead.email, Delivery.status, Delivery.error).join(
                    Delivery, Delivery.lead_id == Lead.id
                )
            )
        }
    # The lead keeps the address as typed; only the wire gets the A-label.
    assert status["ann@bücher.example"] == ("sent", None)
    received = dict(zip(server.recipients(), server.raw, strict=True))
    assert "ann@xn--bcher-kva.example" in received
    head = received["ann@xn--bcher-kva.example"][1].partition(b"\r\n\r\n")[0]
    assert b"To: <ann@xn--bcher-kva.example>" in head and head.isascii()
    if smtputf8:
        assert status["zoë@bücher.example"] == ("sent", None)
        assert sorted(server.recipients()) == [
            "ann@xn--bcher-kva.example",
            "zoë@xn--bcher-kva.example",
        ]
        index = server.recipients().index("zoë@xn--bcher-kva.example")
        assert "SMTPUTF8" in server.mail_options[index]
        raw = server.raw[index][1]
        msg = message_from_string(raw.decode("utf-8"), policy=policy.SMTPUTF8)
        assert msg["To"].addresses[0].addr_spec == "zoë@xn--bcher-kva.example"
        assert report.send.sent == 2
    else:
        # Fatal (parked with its reason, never retried) and named, not silently dropped.
        st, err = status["zoë@bücher.example"]
        assert st == "failed" and "SMTPUTF8" in (err or "")
        assert server.recipients() == ["ann@xn--bcher-kva.example"]
        assert (report.send.sent, report.send.failed) == (1, 1)
