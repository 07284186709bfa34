"""Security promises that cut across modules: header injection at send time, and secrets
that never show in reprs, logs or exceptions."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select, update

from nurture.cli.common import shown
from nurture.config import Settings, get_settings
from nurture.message.rendering import TemplateStore
from nurture.outbox.smtp_transport import SmtpConfig
from nurture.store.db import session_scope
from nurture.store.models import Account, Event, Lead, Suppression
from nurture.tick import tick
from tests.helpers import TEMPLATES, add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

_STORE = TemplateStore(TEMPLATES)
_NAMES = _STORE.names()

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

    from nurture.store.models import Delivery

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


# -- fuzz: hostile lead fields through import, render, MIME and both reports --------------

# Characters no header may show, and a terminal or an HTML page must never receive raw.
_UNSAFE_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

_HOSTILE = st.sampled_from(
    [
        "[/]", "[bold]x[/bold]", "[link=https://evil.example]x[/link]", "$x^$", "$\\frac{$",
        "a\r\nBcc: victim@example.com", "\n", "\x00", "\x1b[2J\x1b[31m", "\x7f\x85\x9b",
        "\u202egnp.exe\u202c", "\u2066x\u2069", "\ud800", "\udfff",
        "https://evil.example/phish", "<script>alert(1)</script>", "<img src=x onerror=1>",
        "{{ 7*7 }}", "{% raw %}", "=?utf-8?b?QmNjOg==?=", '"', "\\", "Zoë Ünïcödé 漢字",
        "x" * 300,
    ]
)  # fmt: skip
_VALUE = st.one_of(
    _HOSTILE,
    st.lists(st.one_of(_HOSTILE, st.text(max_size=8)), min_size=1, max_size=3).map("".join),
    st.text(max_size=40),
)
_FUZZ_FIELDS = ("first_name", "last_name", "company", "owner", "lifecycle_stage")
_FUZZ_ATTRIBUTES = ("job_title", "industry", "city", "favourite_category")
_LOCAL = st.sampled_from(["dana", "zoë", "a.b+c", "x" * 64, "[/]", "a\x1bb", "\ud800", ""])
_LEAD = st.fixed_dictionaries(
    {
        "local": _LOCAL,
        **{name: _VALUE for name in _FUZZ_FIELDS},
        **{name: _VALUE for name in _FUZZ_ATTRIBUTES},
    }
)


def _write_csv(path: Path, leads: list[dict[str, str]]) -> None:
    columns = ["email", *_FUZZ_FIELDS, *_FUZZ_ATTRIBUTES]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for i, lead in enumerate(leads):
        writer.writerow([f"{lead['local']}{i}@csv.example.com", *(lead[c] for c in columns[1:])])
    # Lone surrogates become the bytes a broken exporter writes (not valid UTF-8).
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))


def _write_jsonl(path: Path, leads: list[dict[str, str]]) -> None:
    lines = []
    for i, lead in enumerate(leads):
        record = {k: v for k, v in lead.items() if k != "local"}
        record["email"] = f"{lead['local']}{i}@jsonl.bücher.example"
        lines.append(json.dumps(record))  # "\ud800" escapes: lone surrogates after decoding
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _wipe(engine: Engine) -> None:
    from nurture.store.models import Base

    with session_scope(engine) as s:
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(leads=st.lists(_LEAD, min_size=1, max_size=3), template=st.sampled_from(_NAMES))
def test_fuzz_hostile_lead_fields_end_to_end(
    cli_db: Engine, tmp_path: Path, now: datetime, leads: list[dict[str, str]], template: str
) -> None:
    from email import message_from_string
    from email import policy as email_policy

    from nurture.cli.report import report as report_command
    from nurture.intake.leads import import_leads
    from nurture.message.mime import build_message, format_address, message_id
    from nurture.message.rendering import lead_context
    from nurture.message.tokens import tracking_links
    from nurture.store.models import StageTransition

    _wipe(cli_db)
    # 1. Import, both formats, through the real import function: no crash, every record
    # either loaded or rejected with its line.
    for suffix, write in (("csv", _write_csv), ("jsonl", _write_jsonl)):
        path = tmp_path / f"leads.{suffix}"
        write(path, leads)
        result = import_leads(cli_db, path, now=now, rejects_path=tmp_path / f"rej.{suffix}")
        assert result.read == len(leads)
        assert result.inserted + result.updated + result.duplicates + result.rejected == len(leads)
    with session_scope(cli_db) as s:
        # The columns the send path loads (delivery._load): the company is the account's.
        query = select(Lead.__table__, Account.name.label("company")).outerjoin(
            Account, Account.id == Lead.account_id
        )
        rows = [dict(r._mapping) for r in s.execute(query)]
        s.add_all(
            StageTransition(lead_id=r["id"], from_stage=None, to_stage=r["lifecycle_stage"],
                            occurred_at=now, cause="import")
            for r in rows
        )  # fmt: skip
    for row in rows:
        for name in ("first_name", "last_name", "company", "owner", "lifecycle_stage"):
            assert not _UNSAFE_IN_HEADER.search(row[name] or ""), (name, row[name])

    # 2. Render and 3. MIME: the bytes parse back, and no header holds a control character.
    for row in rows:
        links = tracking_links("https://track.example.com", row["id"], row["id"], "k" * 32)
        context = lead_context(row, unsubscribe_url=links.unsubscribe_url, campaign="c", step="s")
        email = _STORE.render(template, context, link_rewriter=links.rewrite)
        assert not _UNSAFE_IN_HEADER.search(email.subject)
        name = " ".join(p for p in (row["first_name"], row["last_name"]) if p)
        data = build_message(
            email,
            from_addr="Lumen <hello@lumen.example.com>",
            to_addr=format_address(name or None, row["email"]),
            message_id=message_id(row["id"], "s", "lumen.example.com"),
            unsubscribe_url=links.unsubscribe_url,
            date=now,
        )
        msg = message_from_string(data.decode("utf-8"), policy=email_policy.SMTPUTF8)
        assert not msg.defects
        for header, value in msg.items():
            assert not _UNSAFE_IN_HEADER.search(str(value)), (header, value)
        assert msg["To"].addresses[0].addr_spec.endswith(("@csv.example.com", ".example"))
        assert "Bcc" not in msg and msg["Subject"] == email.subject

    # 4. The terminal report and 5. the HTML report: no crash, nothing raw.
    out = tmp_path / "report.html"
    res = CliRunner().invoke(report_command, ["--by", "owner", "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert not _RAW_CONTROL.search(res.output)
    html = out.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert not _RAW_CONTROL.search(html)
