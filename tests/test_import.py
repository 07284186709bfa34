"""Lead import: CSV and JSON Lines into SQLite and PostgreSQL, rejects, dedupe, the CLI."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.resolver
import dns.rrset
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from nurture.cli import cli
from nurture.intake.leads import (
    COUNTRIES,
    ImportResult,
    LeadFileError,
    import_leads,
    upsert_lead_rows,
)
from nurture.store.db import make_engine, upgrade
from nurture.store.models import Account, Lead

DATA = Path(__file__).parent / "data" / "import"


@pytest.fixture
def sample(tmp_path: Path) -> Any:
    """Copy a sample file into tmp_path, so its rejects file lands there too."""

    def copy(name: str) -> Path:
        return Path(shutil.copy(DATA / name, tmp_path / name))

    return copy


def leads_by_email(engine: Engine) -> dict[str, Lead]:
    with Session(engine) as session:
        return {lead.email: lead for lead in session.scalars(select(Lead))}


def lead_count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Lead)) or 0


def read_rejects(path: Path | None) -> list[dict[str, str]]:
    assert path is not None
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_balanced(result: ImportResult) -> None:
    counted = result.inserted + result.updated + result.duplicates + result.rejected
    assert result.read == counted, result


# --------------------------------------------------------------------------- CSV


def test_good_file_loads_every_field(engine: Engine, sample: Any, now: datetime) -> None:
    path = sample("good.csv")
    result = import_leads(engine, path, now=now, source="social")
    assert result.as_dict() == {
        "read": 5,
        "inserted": 5,
        "updated": 0,
        "duplicates": 0,
        "rejected": 0,
        "rejects_path": None,
    }
    assert not (path.parent / "good.rejects.csv").exists()
    leads = leads_by_email(engine)
    # Local part keeps nothing of its case, the domain is normalised too.
    assert set(leads) == {
        "ada@analytical.example.com",
        "grace.hopper@navy.example.org",
        "alan@gmail.com",
        "edsger@gmail.com",
        "barbara@analytical.example.com",
    }
    ada = leads["ada@analytical.example.com"]
    assert (ada.first_name, ada.last_name, ada.owner) == ("Ada", "Lovelace", "alice")
    assert (ada.timezone, ada.country, ada.source) == ("Europe/London", "GB", "website")
    assert ada.lifecycle_stage == "lead"
    assert ada.attributes == {"job_title": "CTO", "industry": "Computing"}
    assert ada.created_at == now and ada.updated_at == now
    # No source column value: --source applies; no stage: the default.
    alan = leads["alan@gmail.com"]
    assert alan.source == "social" and alan.lifecycle_stage == "subscriber"
    assert alan.timezone == "Europe/London"  # canonical spelling from a lower-case cell
    # Empty cells are not written as empty strings.
    edsger = leads["edsger@gmail.com"]
    assert edsger.timezone is None and edsger.attributes == {}
    assert leads["grace.hopper@navy.example.org"].attributes == {"job_title": "Rear Admiral"}

    with Session(engine) as session:
        accounts = {a.id: a for a in session.scalars(select(Account))}
    by_lead = {email: accounts[lead.account_id] for email, lead in leads.items() if lead.account_id}
    # Company domains key the account; free-mail addresses match by name.
    assert by_lead["ada@analytical.example.com"] is by_lead["barbara@analytical.example.com"]
    assert by_lead["ada@analytical.example.com"].domain == "analytical.example.com"
    assert by_lead["alan@gmail.com"] is by_lead["edsger@gmail.com"]
    assert by_lead["alan@gmail.com"].domain is None
    assert by_lead["alan@gmail.com"].name == "Bletchley"
    assert len(accounts) == 3


def test_same_file_twice_updates_and_never_duplicates(
    engine: Engine, sample: Any, now: datetime
) -> None:
    path = sample("good.csv")
    first = import_leads(engine, path, now=now)
    later = now + timedelta(hours=1)
    second = import_leads(engine, path, now=later)
    assert first.inserted == 5
    assert (second.inserted, second.updated, second.duplicates) == (0, 5, 0)
    assert lead_count(engine) == 5
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Account)) == 3
    lead = leads_by_email(engine)["ada@analytical.example.com"]
    assert lead.created_at == now and lead.updated_at == later


def test_update_keeps_stored_values_for_empty_cells(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    first = tmp_path / "first.csv"
    first.write_text(
        "email,first_name,source,lifecycle_stage,plan\na@x.example.com,Ann,website,mql,pro\n"
    )
    second = tmp_path / "second.csv"
    second.write_text("email,first_name,last_name,region\nA@x.example.com,,Smith,EU\n")
    import_leads(engine, first, now=now)
    result = import_leads(engine, second, now=now, source="partner")
    assert (result.inserted, result.updated) == (0, 1)
    lead = leads_by_email(engine)["a@x.example.com"]
    assert (lead.first_name, lead.last_name) == ("Ann", "Smith")
    # --source is a default for new leads only; the stage is kept; attributes merge.
    assert (lead.source, lead.lifecycle_stage) == ("website", "mql")
    assert lead.attributes == {"plan": "pro", "region": "EU"}


def test_bad_rows_are_rejected_with_line_and_reason(
    engine: Engine, sample: Any, now: datetime
) -> None:
    path = sample("bad_rows.csv")
    result = import_leads(engine, path, now=now)
    assert_balanced(result)
    assert set(leads_by_email(engine)) == {
        "ok1@example.com",
        "ok2@example.com",
        "ok3@example.com",
        "ok4@example.com",
    }
    assert (result.read, result.inserted, result.rejected) == (12, 4, 8)
    assert result.rejects_path == path.parent / "bad_rows.rejects.csv"
    rejects = read_rejects(result.rejects_path)
    got = {(r["line"], r["field"]): r["reason"] for r in rejects}
    assert set(got) == {
        ("3", "email"),
        ("4", "email"),
        ("6", "country"),
        ("7", "tz"),
        ("8", "source"),
        ("9", ""),
        ("10", ""),
        ("12", "country"),
    }
    assert "An email address must have an @-sign" in got["3", "email"]
    assert got["4", "email"] == "missing email"
    assert "ISO-3166" in got["6", "country"]
    assert "Mars/Olympus" in got["7", "tz"]
    assert "billboard" in got["8", "source"] and "website" in got["8", "source"]
    assert got["9", ""] == "expected 7 cells as in the header, found 8"
    assert got["10", ""] == "expected 7 cells as in the header, found 2"
    # The original cells follow, under the original header.
    row = next(r for r in rejects if r["line"] == "3")
    assert (row["email"], row["first_name"], row["country"]) == ("not-an-email", "Bad", "FR")


def test_rejects_neutralise_spreadsheet_formulas(
    engine: Engine, sample: Any, now: datetime
) -> None:
    result = import_leads(engine, sample("bad_rows.csv"), now=now)
    rejects = read_rejects(result.rejects_path)
    row = next(r for r in rejects if r["line"] == "12")
    assert row["first_name"] == "'=cmd|' /C calc'!A0"
    assert row["last_name"] == "'+SUM(1)"
    assert row["notes"] == "'@import"
    for cell in (c for r in rejects for c in r.values()):
        assert not cell or cell[0] not in "=+-@\t\r", cell
    # A good row keeps its value: neutralising only applies to the rejects file.
    lead = leads_by_email(engine)["ok3@example.com"]
    assert lead.attributes == {"notes": '=HYPERLINK("http://evil")'}


def test_bom_and_semicolon(engine: Engine, sample: Any, now: datetime) -> None:
    result = import_leads(engine, sample("bom_semicolon.csv"), now=now)
    assert (result.inserted, result.rejected) == (2, 0)
    leads = leads_by_email(engine)
    marie = leads["marie@curie.example.com"]
    assert (marie.first_name, marie.last_name, marie.timezone) == ("Marie", "Curie", "Europe/Paris")
    assert marie.account_id is not None
    assert marie.account_id == leads["pierre@curie.example.com"].account_id
    assert marie.attributes == {}


def test_quoted_newlines_keep_line_numbers(engine: Engine, sample: Any, now: datetime) -> None:
    result = import_leads(engine, sample("quoted_newline.csv"), now=now)
    assert (result.inserted, result.rejected) == (2, 2)
    assert leads_by_email(engine)["one@example.com"].attributes == {
        "address": "1 Main Street\nSpringfield\nUSA"
    }
    lines = [r["line"] for r in read_rejects(result.rejects_path)]
    assert lines == ["5", "8"]


def test_duplicates_in_one_file_merge(engine: Engine, sample: Any, now: datetime) -> None:
    result = import_leads(engine, sample("duplicates.csv"), now=now)
    assert (result.read, result.inserted, result.duplicates) == (4, 2, 2)
    assert lead_count(engine) == 2
    dup = leads_by_email(engine)["dup@example.com"]
    # The later row wins per non-empty field; empty cells never erase.
    assert (dup.first_name, dup.last_name) == ("Duplicated", "Licate")
    assert dup.attributes == {"city": "Paris"}


def test_duplicates_across_batches(engine: Engine, tmp_path: Path, now: datetime) -> None:
    path = tmp_path / "many.csv"
    lines = ["email,first_name,seq"]
    lines += [f"user{i}@example.com,First{i},{i}" for i in range(25)]
    lines += [f"USER{i}@example.com,Again{i}," for i in range(0, 25, 5)]
    path.write_text("\n".join(lines) + "\n")
    result = import_leads(engine, path, now=now, batch_size=7)
    assert (result.read, result.inserted, result.updated, result.duplicates) == (30, 25, 0, 5)
    leads = leads_by_email(engine)
    assert len(leads) == 25
    assert leads["user5@example.com"].first_name == "Again5"
    assert leads["user5@example.com"].attributes == {"seq": "5"}
    again = import_leads(engine, path, now=now, batch_size=7)
    assert (again.inserted, again.updated, again.duplicates) == (0, 25, 5)


def test_nul_bytes_and_undecodable_bytes_reject_only_their_row(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    path = tmp_path / "dirty.csv"
    path.write_bytes(
        b"email,first_name\n"
        b"good@example.com,Good\n"
        b"nul@example.com,Nu\x00l\n"
        b"latin@example.com,Fran\xe7ois\n"
        b"utf8@example.com,Fran\xc3\xa7oise\n"
    )
    result = import_leads(engine, path, now=now)
    assert (result.inserted, result.rejected) == (2, 2)
    assert leads_by_email(engine)["utf8@example.com"].first_name == "Françoise"
    assert result.rejects_path is not None
    raw = result.rejects_path.read_bytes()
    assert b"Fran\xe7ois" in raw  # the original bytes, unchanged: nothing is lost
    rejects = raw.decode("utf-8", errors="replace").splitlines()
    assert rejects[1].startswith("3,first_name,contains a NUL character")
    assert rejects[2].startswith("4,first_name,not valid UTF-8")


def test_values_over_a_sane_length_are_rejected(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    path = tmp_path / "long.csv"
    long_local = "a" * 250  # the whole address is over 254
    path.write_text(
        "email,first_name,bio\n"
        f"long-name@example.com,{'x' * 300},\n"
        f"{long_local}@example.com,Long,\n"
        f"long-bio@example.com,Bio,{'b' * 20_000}\n"
        f"{'e' * 400}@example.com,Huge,\n"
        "fine@example.com,Fine,short\n"
    )
    result = import_leads(engine, path, now=now)
    assert (result.inserted, result.rejected) == (1, 4)
    reasons = {r["line"]: (r["field"], r["reason"]) for r in read_rejects(result.rejects_path)}
    assert reasons["2"] == ("first_name", "longer than 255 characters")
    assert reasons["3"][0] == "email" and "too long" in reasons["3"][1]
    assert reasons["4"] == ("bio", "longer than 10000 characters")
    assert reasons["5"] == ("email", "longer than 320 characters")


def test_custom_rejects_path(engine: Engine, sample: Any, tmp_path: Path, now: datetime) -> None:
    target = tmp_path / "out" / "my-rejects.csv"
    target.parent.mkdir()
    result = import_leads(engine, sample("bad_rows.csv"), now=now, rejects_path=target)
    assert result.rejects_path == target
    assert len(read_rejects(target)) == 8


# --------------------------------------------------------------------------- JSON Lines


def test_json_lines(engine: Engine, sample: Any, now: datetime) -> None:
    path = sample("leads.jsonl")
    result = import_leads(engine, path, now=now)
    assert_balanced(result)
    assert (result.read, result.inserted, result.duplicates, result.rejected) == (7, 2, 1, 4)
    leads = leads_by_email(engine)
    kay = leads["kay@example.com"]
    assert (kay.first_name, kay.last_name, kay.country) == ("Kay", "Kay", "US")
    assert kay.attributes == {"score": 12, "tags": ["smalltalk"]}
    assert kay.account_id is not None
    assert leads["ken@example.com"].source == "franchise"
    rejects = read_rejects(result.rejects_path)
    assert [r["line"] for r in rejects] == ["4", "5", "6", "8"]
    assert rejects[1]["reason"].startswith("invalid JSON")
    assert rejects[1]["record"] == "this is not json"
    assert rejects[2]["reason"] == "expected a JSON object, found list"
    assert "NaN is not valid JSON" in rejects[3]["reason"]


def test_json_lines_sniffed_without_extension(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    path = tmp_path / "export.data"
    path.write_text('{"email": "sniff@example.com"}\n')
    assert import_leads(engine, path, now=now).inserted == 1


# --------------------------------------------------------------------------- whole file


def test_missing_email_column_names_the_columns(
    sqlite_engine: Engine, sample: Any, now: datetime
) -> None:
    with pytest.raises(LeadFileError) as info:
        import_leads(sqlite_engine, sample("no_email.csv"), now=now)
    message = str(info.value)
    assert "no email column" in message
    assert "'name', 'phone', 'company'" in message
    assert "\n" not in message


def test_missing_file_and_utf16_fail_in_one_line(
    sqlite_engine: Engine, tmp_path: Path, now: datetime
) -> None:
    with pytest.raises(LeadFileError, match=r"cannot read .*nope\.csv: No such file"):
        import_leads(sqlite_engine, tmp_path / "nope.csv", now=now)
    utf16 = tmp_path / "excel.csv"
    utf16.write_text("email\nx@example.com\n", encoding="utf-16")
    with pytest.raises(LeadFileError, match="UTF-16"):
        import_leads(sqlite_engine, utf16, now=now)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LeadFileError, match="empty"):
        import_leads(sqlite_engine, empty, now=now)


TRICKY_EMAILS = [
    "Ada@Example.COM",
    "x@bücher.example",
    "user@xn--bcher-kva.example",
    '"quoted local"@example.com',
    "Postmaster@EXAMPLE.com",
    "ü@例え.テスト.com",
    "a@b",
    "a@-x.com",
    "a@localhost",
    "a@[127.0.0.1]",
    "a..b@example.com",
    "a@example.invalid",
    "x" * 250 + "@example.com",
]


@pytest.mark.parametrize("email", TRICKY_EMAILS)
def test_domain_cache_gives_email_validator_results(email: str) -> None:
    from email_validator import EmailNotValidError, validate_email

    from nurture.intake.leads import _validate

    assert _validate is not validate_email  # the cached variant is in use

    def outcome(func: Any) -> object:
        try:
            got = func(email, check_deliverability=False)
        except EmailNotValidError as exc:
            return (type(exc), str(exc))
        return (got.normalized, got.ascii_email, got.domain, got.ascii_domain, got.smtputf8)

    expected = outcome(validate_email)
    assert outcome(_validate) == expected
    assert outcome(_validate) == expected  # and again, from the cache


def test_country_codes_are_iso_3166() -> None:
    assert len(COUNTRIES) == 249
    assert {"FR", "GB", "US", "SS", "XK"} & COUNTRIES == {"FR", "GB", "US", "SS"}


def test_upsert_lead_rows_for_generated_leads(engine: Engine, now: datetime) -> None:
    rows = [
        {"email": "gen1@example.com", "first_name": "Gen", "source": "website"},
        {"email": "gen2@example.com", "company": "Generated Inc", "attributes": {"type": "b2b"}},
        {"email": "gen1@example.com", "last_name": "One"},
    ]
    with Session(engine) as session, session.begin():
        counts = upsert_lead_rows(session, rows, now)
    assert (counts.inserted, counts.updated, counts.merged) == (2, 0, 1)
    leads = leads_by_email(engine)
    assert (leads["gen1@example.com"].first_name, leads["gen1@example.com"].last_name) == (
        "Gen",
        "One",
    )
    assert leads["gen2@example.com"].attributes == {"type": "b2b"}
    assert leads["gen2@example.com"].account_id is not None
    with Session(engine) as session, session.begin():
        again = upsert_lead_rows(session, rows[:2], now)
    assert (again.inserted, again.updated) == (0, 2)


# --------------------------------------------------------------------------- deliverability


class FakeDns:
    """A real DNS server on 127.0.0.1 that knows the MX of one domain."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text().rstrip(".")
            self.queries.append(name)
            reply = dns.message.make_response(query)
            if name == self.domain and question.rdtype == dns.rdatatype.MX:
                reply.answer.append(
                    dns.rrset.from_text(question.name, 300, "IN", "MX", f"10 mx.{name}.")
                )
            else:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), addr)

    def resolver(self) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 2
        return resolver


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    server = FakeDns("deliverable.example.net")
    server.thread.start()
    yield server
    server.sock.close()


def test_check_deliverability_uses_dns_once_per_domain(
    sqlite_engine: Engine, tmp_path: Path, now: datetime, fake_dns: FakeDns
) -> None:
    path = tmp_path / "dns.csv"
    path.write_text(
        "email\na@deliverable.example.net\nb@deliverable.example.net\nc@nowhere.example.net\n"
    )
    result = import_leads(
        sqlite_engine, path, now=now, check_deliverability=True, dns_resolver=fake_dns.resolver()
    )
    assert (result.inserted, result.rejected) == (2, 1)
    reason = read_rejects(result.rejects_path)[0]["reason"]
    assert "nowhere.example.net" in reason and "does not exist" in reason
    assert fake_dns.queries.count("deliverable.example.net") == 1
    # Without the flag, no DNS at all.
    before = len(fake_dns.queries)
    path.write_text("email\nz@nowhere.example.net\n")
    assert import_leads(sqlite_engine, path, now=now, dns_resolver=fake_dns.resolver()).inserted
    assert len(fake_dns.queries) == before


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    from nurture.config import get_settings

    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("NURTURE_DATABASE_URL", url)
    get_settings.cache_clear()
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()
    get_settings.cache_clear()


def test_cli_json_output(cli_db: Engine, sample: Any) -> None:
    path = sample("bad_rows.csv")
    runner = CliRunner()
    result = runner.invoke(cli, ["leads", "import", str(path), "--json", "--source", "website"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload == {
        "read": 12,
        "inserted": 4,
        "updated": 0,
        "duplicates": 0,
        "rejected": 8,
        "rejects_path": str(path.parent / "bad_rows.rejects.csv"),
    }
    assert leads_by_email(cli_db)["ok2@example.com"].source == "website"
    again = runner.invoke(cli, ["leads", "import", str(sample("good.csv")), "--json"])
    assert json.loads(again.stdout)["rejects_path"] is None


def test_cli_human_output_and_errors(cli_db: Engine, sample: Any, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["leads", "import", str(sample("good.csv"))])
    assert ok.exit_code == 0, ok.output
    assert "inserted" in ok.stdout and "5" in ok.stdout
    missing = runner.invoke(cli, ["leads", "import", str(sample("no_email.csv"))])
    assert missing.exit_code != 0
    assert missing.stderr.count("\n") == 1, missing.stderr  # one line, however long
    assert "no email column" in missing.stderr and "'phone'" in missing.stderr
    gone = runner.invoke(cli, ["leads", "import", str(tmp_path / "gone.csv"), "--json"])
    assert gone.exit_code != 0
    assert "cannot read" in gone.stderr and gone.stdout == ""
