"""Reply and bounce detection against a real Dovecot IMAP server on 127.0.0.1."""

from __future__ import annotations

import imaplib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import SecretStr
from sqlalchemy import Engine, select

from nurture.cli.inbox import inbox as inbox_cli
from nurture.config import get_settings
from nurture.engagement import inbox as inbox_module
from nurture.engagement.inbox import ImapConfig, InboxError, classify, poll_inbox
from nurture.spec.schema import ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Event, Lead, Suppression
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink, free_port

PASSWORD = "imap-secret"
USERS = [f"box{i}" for i in range(12)]

WELCOME = campaign("""
name: inbox-test
audience: {all: [{field: attributes.type, op: eq, value: b2b}]}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: case-study, wait: 2d, template: b2b/case_study_roi}
  - {id: breakup, wait: 5d, template: b2b/breakup}
exit_when: {event: replied, this_campaign: true}
""")


def _ensure_dovecot() -> str:
    """Debian's dovecot-imapd, installed when missing (as .ci/run does)."""
    found = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None
    )
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "dovecot-imapd"], check=True, env=env, timeout=600
    )
    return "/usr/sbin/dovecot"


@dataclass
class Dovecot:
    """A running Dovecot with a few passwd-file users, each with its own maildir."""

    host: str
    port: int
    users: Iterator[str]

    def config(self, user: str) -> ImapConfig:
        """Settings for one mailbox."""
        return ImapConfig(
            host=self.host,
            port=self.port,
            username=user,
            password=SecretStr(PASSWORD),
            timeout=10,
        )

    def url(self, user: str) -> str:
        """``imap://`` URL of one mailbox."""
        return f"imap://{user}:{PASSWORD}@{self.host}:{self.port}/INBOX"

    def client(self, user: str) -> imaplib.IMAP4:
        """A logged-in client for one mailbox, INBOX selected."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        conn.login(user, PASSWORD)
        conn.select("INBOX")
        return conn

    def append(self, user: str, raw: bytes) -> None:
        """Put one message into the user's INBOX (IMAP APPEND)."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        conn.login(user, PASSWORD)
        typ, data = conn.append("INBOX", None, None, raw)
        assert typ == "OK", data
        conn.logout()

    def unseen(self, user: str) -> list[int]:
        """UIDs of the unseen messages."""
        conn = self.client(user)
        typ, data = conn.uid("SEARCH", "UNSEEN")
        conn.logout()
        assert typ == "OK"
        return [int(u) for u in (data[0] or b"").split()]


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    """A real Dovecot IMAP server on 127.0.0.1 (plaintext auth on loopback)."""
    binary = _ensure_dovecot()
    # Dovecot refuses to access mail as root, so the maildirs belong to `nobody`, who
    # cannot enter pytest's private tmp tree: the server gets a folder of its own.
    root = Path(tempfile.mkdtemp(prefix="nurture-dovecot-"))
    root.chmod(0o755)
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir()
    shutil.chown(root / "mail", "nobody", "nogroup")
    (root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in USERS))
    port = free_port()
    conf = root / "dovecot.conf"
    conf.write_text(f"""
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%u
mail_uid = nobody
mail_gid = nogroup
first_valid_uid = 1
default_internal_user = root
default_internal_group = root
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
    proc = subprocess.Popen(
        [binary, "-F", "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # wait for the listener (real start-up I/O, not a clock)
            if proc.poll() is not None:
                log = (root / "dovecot.log").read_text() if (root / "dovecot.log").exists() else ""
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"dovecot exited {proc.returncode}: {out}\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Dovecot("127.0.0.1", port, iter(USERS))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def box(dovecot: Dovecot) -> str:
    """A mailbox no other test uses."""
    return next(dovecot.users)


_ids = itertools.count(1)


def reply(to_message_id: str, when: datetime, *, sender: str, extra: str = "") -> bytes:
    """A plain reply to one of our messages."""
    n = next(_ids)
    return (
        f"From: Ada <{sender}>\r\n"
        "To: hello@nurture.test\r\n"
        f"Subject: Re: Welcome\r\n"
        f"Date: {format_datetime(when)}\r\n"
        f"Message-ID: <reply-{n}@acme.example>\r\n"
        f"In-Reply-To: {to_message_id}\r\n"
        f"References: <older-{n}@elsewhere.example> {to_message_id}\r\n"
        f"{extra}"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Sounds interesting, tell me more.\r\n"
    ).encode()


def dsn(
    recipient: str, original_id: str, when: datetime, *, status: str = "5.1.1", action="failed"
) -> bytes:
    """An RFC 3464 delivery status notification for one recipient."""
    n = next(_ids)
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.acme.example>\r\n"
        "To: hello@nurture.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_datetime(when)}\r\n"
        f"Message-ID: <dsn-{n}@mx.acme.example>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n"
        "--B\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        f"Delivery to {recipient} failed.\r\n"
        "--B\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.acme.example\r\n"
        "\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} user unknown\r\n"
        "\r\n"
        "--B\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        "From: hello@nurture.test\r\n"
        f"To: {recipient}\r\n"
        f"Message-ID: {original_id}\r\n"
        "Subject: Welcome\r\n"
        "\r\n"
        "--B--\r\n"
    ).encode()


def _welcome(engine: Engine, smtp_server: SmtpSink, now: datetime, email: str) -> str:
    """Send the welcome step to one lead through a real tick; return its Message-ID."""
    add_leads(engine, now, {"email": email, "attributes": {"type": "b2b"}})
    m = mailer(smtp_server.url)
    try:
        result = tick(engine, now, _prog(), m, worker="test")
    finally:
        m.sender.close()
    assert result.send.sent == 1
    with session_scope(engine) as session:
        return session.scalars(select(Delivery.message_id)).one()


def _prog():  # type: ignore[no-untyped-def]
    return programme(WELCOME, scoring=ScoringSpec(points={"replied": 15}))


def _events(engine: Engine) -> list[tuple[str, str, dict]]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(Event.type, Event.external_id, Event.payload).order_by(Event.id)
        ).all()
    return [(t, x, p) for t, x, p in rows]


def test_reply_stops_the_sequence(
    engine: Engine, smtp_server: SmtpSink, dovecot: Dovecot, box: str, now: datetime
) -> None:
    msgid = _welcome(engine, smtp_server, now, "ada@acme.example")
    assert msgid.startswith("<nurture.")
    answer = reply(msgid, now + timedelta(hours=3), sender="ada@acme.example")
    dovecot.append(box, answer)
    # A reply to a message that is not ours, and an out-of-office about ours.
    dovecot.append(box, reply("<x@elsewhere.example>", now, sender="bob@acme.example"))
    dovecot.append(
        box,
        reply(msgid, now, sender="ada@acme.example", extra="Auto-Submitted: auto-replied\r\n"),
    )
    report = poll_inbox(engine, dovecot.config(box), now + timedelta(hours=4), batch_size=2)
    assert (report.fetched, report.replies, report.auto_replies, report.other) == (3, 1, 1, 1)
    assert report.inserted == 1 and report.marked_seen == 3 and report.failed == []
    events = _events(engine)
    assert [(t, x) for t, x, _ in events] == [("replied", classify(answer).message_id)]
    with session_scope(engine) as session:
        occurred = session.scalars(select(Event.occurred_at)).one()
    assert occurred == now + timedelta(hours=3)  # the reply's own Date
    assert dovecot.unseen(box) == []

    # Seen messages are not read again; a message un-flagged by hand is not recorded twice.
    assert poll_inbox(engine, dovecot.config(box), now + timedelta(hours=5)).fetched == 0
    conn = dovecot.client(box)
    conn.uid("STORE", "1", "-FLAGS", r"(\Seen)")
    again = poll_inbox(engine, conn, now + timedelta(hours=5))
    conn.logout()
    assert (again.fetched, again.inserted, again.duplicates) == (1, 0, 1)

    m = mailer(smtp_server.url)
    try:
        later = tick(engine, now + timedelta(days=3), _prog(), m, worker="test")
    finally:
        m.sender.close()
    assert later.send.sent == 0
    assert later.campaigns["inbox-test"].exited == 1
    assert smtp_server.count() == 1


def test_no_reply_keeps_the_sequence_going(
    engine: Engine, smtp_server: SmtpSink, dovecot: Dovecot, box: str, now: datetime
) -> None:
    """The control for the test above: without the reply the next step goes out."""
    _welcome(engine, smtp_server, now, "ada@acme.example")
    assert poll_inbox(engine, dovecot.config(box), now).fetched == 0
    m = mailer(smtp_server.url)
    try:
        later = tick(engine, now + timedelta(days=3), _prog(), m, worker="test")
    finally:
        m.sender.close()
    assert later.send.sent == 1


def test_dsn_bounce_suppresses_the_address(
    engine: Engine, smtp_server: SmtpSink, dovecot: Dovecot, box: str, now: datetime
) -> None:
    msgid = _welcome(engine, smtp_server, now, "gone@acme.example")
    dovecot.append(box, dsn("gone@acme.example", msgid, now + timedelta(minutes=5)))
    # A soft (4.x.x) failure of an address we never mailed, and a hard one of another.
    dovecot.append(box, dsn("full@other.example", "<a@b>", now, status="4.2.2"))
    dovecot.append(box, dsn("nobody@other.example", "<c@d>", now, status="5.1.1"))
    dovecot.append(box, dsn("later@other.example", "<e@f>", now, status="4.4.7", action="delayed"))
    report = poll_inbox(engine, dovecot.config(box), now + timedelta(hours=1))
    assert (report.fetched, report.bounces, report.hard_bounces) == (4, 3, 2)
    assert report.marked_seen == 4
    events = _events(engine)
    assert len(events) == 1  # only the bounce of our lead is an event of a lead
    etype, ext, payload = events[0]
    assert etype == "bounced" and ext.startswith("<dsn-")
    assert payload["hard"] is True and payload["status"] == "5.1.1"
    with session_scope(engine) as session:
        suppressed = set(session.scalars(select(Suppression.email)))
        lead = session.scalars(select(Lead.id)).one()
        bounced_lead = session.scalars(select(Event.lead_id)).one()
    assert suppressed == {"gone@acme.example", "nobody@other.example"}
    assert bounced_lead == lead


def test_nothing_is_lost_when_recording_fails(
    engine: Engine,
    smtp_server: SmtpSink,
    dovecot: Dovecot,
    box: str,
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msgid = _welcome(engine, smtp_server, now, "ada@acme.example")
    dovecot.append(box, reply(msgid, now, sender="ada@acme.example"))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(inbox_module, "record_events", broken)
    with pytest.raises(RuntimeError):
        poll_inbox(engine, dovecot.config(box), now)
    assert dovecot.unseen(box) == [1]  # not flagged: the next poll reads it again
    monkeypatch.undo()
    assert poll_inbox(engine, dovecot.config(box), now).replies == 1
    assert [t for t, _, _ in _events(engine)] == ["replied"]


def test_refused_login(dovecot: Dovecot) -> None:
    bad = ImapConfig(host=dovecot.host, port=dovecot.port, username="box0", password=SecretStr("x"))
    with pytest.raises(InboxError, match="refused"):
        poll_inbox(None, bad, datetime.now().astimezone())  # type: ignore[arg-type]


def test_cli_poll_json(
    sqlite_engine: Engine,
    smtp_server: SmtpSink,
    dovecot: Dovecot,
    box: str,
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msgid = _welcome(sqlite_engine, smtp_server, now, "ada@acme.example")
    dovecot.append(box, reply(msgid, now, sender="ada@acme.example"))
    monkeypatch.setenv(
        "NURTURE_DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False)
    )
    monkeypatch.setenv("NURTURE_IMAP_URL", dovecot.url(box))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(inbox_cli, ["poll", "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["replies"] == 1 and data["inserted"] == 1 and data["failed"] == []
        monkeypatch.setenv("NURTURE_IMAP_URL", dovecot.url(box).replace(PASSWORD, "wrong"))
        get_settings.cache_clear()
        refused = CliRunner().invoke(inbox_cli, ["poll"])
        assert refused.exit_code == 1
        assert "wrong" not in refused.output and "refused" in refused.output
    finally:
        get_settings.cache_clear()


def test_the_inbox_poll_flow_records_replies_and_the_tick_then_exits(
    harness: None,
    sqlite_engine: Engine,
    smtp_server: SmtpSink,
    dovecot: Dovecot,
    box: str,
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scheduled deployment's flow (prefect.yaml: inbox-poll, every 5 minutes)."""
    from nurture.flows.inbox import inbox_poll

    msgid = _welcome(sqlite_engine, smtp_server, now, "ada@acme.example")
    dovecot.append(box, reply(msgid, now + timedelta(minutes=20), sender="ada@acme.example"))
    dovecot.append(box, dsn("nobody@other.example", "<c@d>", now, status="5.1.1"))
    db_url = sqlite_engine.url.render_as_string(hide_password=False)
    monkeypatch.setenv("NURTURE_IMAP_URL", dovecot.url(box))
    get_settings.cache_clear()
    try:
        state = inbox_poll(
            now=(now + timedelta(minutes=25)).isoformat(), database_url=db_url, return_state=True
        )
    finally:
        get_settings.cache_clear()
    out = state.result()
    assert (out["fetched"], out["replies"], out["hard_bounces"], out["inserted"]) == (2, 1, 1, 1)
    assert dovecot.unseen(box) == []
    with session_scope(sqlite_engine) as session:
        suppressed = set(session.scalars(select(Suppression.email)))
    assert suppressed == {"nobody@other.example"}
    m = mailer(smtp_server.url)
    try:
        later = tick(sqlite_engine, now + timedelta(days=3), _prog(), m, worker="test")
    finally:
        m.sender.close()
    assert later.send.sent == 0 and later.campaigns["inbox-test"].exited == 1


def test_the_inbox_poll_flow_without_a_mailbox_warns_and_ends(
    harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nurture.flows.inbox import NOT_CONFIGURED, inbox_poll

    monkeypatch.delenv("NURTURE_IMAP_URL", raising=False)
    get_settings.cache_clear()
    try:
        state = inbox_poll(return_state=True)
    finally:
        get_settings.cache_clear()
    assert state.is_completed() and state.result() == {"skipped": NOT_CONFIGURED}


# --- pure parts -------------------------------------------------------------------------------


def test_classify_prefers_in_reply_to_and_ignores_foreign_ids(now: datetime) -> None:
    raw = (
        b"From: a@x.example\r\nMessage-ID: <r@x.example>\r\n"
        b"In-Reply-To: <nurture.7.case-study@nurture.test>\r\n"
        b"References: <nurture.3.welcome@nurture.test> <foreign@y.example>"
        b" <nurture.7.case-study@nurture.test>\r\n\r\nok\r\n"
    )
    found = classify(raw)
    assert found.kind == "reply"
    assert found.references == (
        "<nurture.7.case-study@nurture.test>",
        "<nurture.3.welcome@nurture.test>",
    )
    assert found.occurred_at is None and found.sender == "a@x.example"


@pytest.mark.parametrize(
    "header",
    [
        "Auto-Submitted: auto-replied",
        "X-Autoreply: yes",
        "Precedence: auto_reply",
        "Subject: Out of Office: back Monday",
        "Subject: Automatic reply: Welcome",
    ],
)
def test_auto_replies_are_not_replies(header: str) -> None:
    raw = (
        f"From: a@x.example\r\n{header}\r\n"
        "In-Reply-To: <nurture.7.welcome@nurture.test>\r\n\r\naway\r\n"
    ).encode()
    assert classify(raw).kind == "auto_reply"


def test_message_without_id_gets_a_stable_one() -> None:
    raw = b"From: a@x.example\r\nIn-Reply-To: <nurture.1.welcome@n.test>\r\n\r\nhi\r\n"
    assert classify(raw).message_id == classify(raw).message_id
    assert classify(raw).message_id != classify(raw + b"!").message_id


def test_config_from_url_keeps_the_password_secret() -> None:
    config = ImapConfig.from_url("imaps://me%40x.example:p%40ss@imap.x.example/Replies?timeout=5")
    assert (config.host, config.port, config.ssl, config.mailbox) == (
        "imap.x.example",
        993,
        True,
        "Replies",
    )
    assert config.username == "me@x.example"
    assert config.password is not None and config.password.get_secret_value() == "p@ss"
    assert "p@ss" not in repr(config)
    with pytest.raises(ValueError, match=r"\*\*\*") as info:
        ImapConfig.from_url("pop3://u:hunter2@h")
    assert "hunter2" not in str(info.value)
    assert ImapConfig.from_url("imap://h").port == 143


def test_classify_multi_recipient_dsn_with_returned_message() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example\r\nMessage-ID: <d@mx.example>\r\n"
        b'Content-Type: multipart/report; report-type="delivery-status"; boundary=Z\r\n\r\n'
        b"--Z\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
        b"--Z\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example\r\n\r\n"
        b"Final-Recipient: rfc822; a@x.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"Final-Recipient: rfc822; b@x.example\r\nAction: failed\r\nStatus: 4.2.2\r\n\r\n"
        b"--Z\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Message-ID: <nurture.9.welcome@nurture.test>\r\nSubject: hi\r\n\r\nbody\r\n"
        b"--Z--\r\n"
    )
    found = classify(raw)
    assert found.kind == "bounce"
    assert found.references == ("<nurture.9.welcome@nurture.test>",)
    assert [(b.recipient, b.status, b.action) for b in found.bounces] == [
        ("a@x.example", "5.1.1", "failed"),
        ("b@x.example", "4.2.2", "failed"),
    ]
