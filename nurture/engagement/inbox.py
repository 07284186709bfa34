"""Reply and bounce detection from a mailbox over IMAP (stdlib ``imaplib``).

:func:`poll_inbox` reads the unseen messages of one mailbox in batches and turns them into
engagement events through :func:`nurture.engagement.events.record_events`:

* a **reply** is matched to the delivery it answers by ``In-Reply-To``, then ``References``
  (newest first): our Message-IDs look like ``<nurture.42.welcome@domain>`` and are stored in
  ``deliveries.message_id``. It becomes a ``replied`` event of that delivery's lead;
* a **DSN** (RFC 3464: ``multipart/report; report-type=delivery-status``) becomes one
  ``bounced`` event per failed recipient, with ``payload={"hard": True}`` for a permanent
  ``5.x.x`` status (which suppresses the address) and ``False`` for ``4.x.x``. The original
  Message-ID comes from the returned headers; the address from ``Final-Recipient``;
* **auto-replies** (``Auto-Submitted``, ``X-Autoreply``, ``Precedence: auto_reply``,
  out-of-office subjects) are not replies and record nothing.

Every event's ``external_id`` is the message's own Message-ID, so polling the same message
twice records it once. Messages are flagged ``\\Seen`` only after the batch's events are
committed: a crash in between re-reads them on the next poll, and nothing is lost.
A message that cannot be parsed stays unseen and is reported.
"""

from __future__ import annotations

import contextlib
import email.policy
import hashlib
import imaplib
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine, select
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from nurture.config import parse_server_url
from nurture.engagement.events import EventError, EventIn, check_email, record_events
from nurture.errors import NurtureError
from nurture.message.mime import parse_message_id
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Lead

__all__ = [
    "BATCH_SIZE",
    "Classified",
    "ImapConfig",
    "InboxError",
    "InboxReport",
    "classify",
    "connect",
    "poll_inbox",
]

BATCH_SIZE = 100
_SCHEMES: dict[str, tuple[bool, int]] = {"imap": (False, 143), "imaps": (True, 993)}
_MSGID = re.compile(r"<[^<>\s]+>")
_UID = re.compile(rb"UID (\d+)")
_AUTO_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response)|out of (the )?office|abwesenheit|"
    r"absence|autosvar|r[ée]ponse automatique|ooo\b|auto:)",
    re.IGNORECASE,
)
_PARSER = BytesParser(policy=email.policy.compat32)


class InboxError(NurtureError, RuntimeError):
    """The mailbox could not be read (bad login, missing folder, refused command)."""


@dataclass(frozen=True)
class ImapConfig:
    """Where the reply/bounce mailbox is. ``password`` is a ``SecretStr``, never logged."""

    host: str
    port: int = 143
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    mailbox: str = "INBOX"
    ssl: bool = False
    timeout: float = 30.0

    @classmethod
    def from_url(cls, url: str | SecretStr) -> ImapConfig:
        """Parse ``imap://user:pass@host:port/INBOX`` or ``imaps://...`` (``?timeout=S``).

        Raises:
            ValueError: unknown scheme, no host, bad port or timeout; the URL is shown with
                its password replaced by ``***``.
        """
        parsed = parse_server_url(url, "IMAP", _SCHEMES)
        return cls(
            host=parsed.host,
            port=parsed.port,
            username=parsed.username,
            password=parsed.password,
            mailbox=parsed.path or "INBOX",
            ssl=parsed.kind,
            timeout=parsed.timeout,
        )


def connect(config: ImapConfig, *, attempts: int = 3) -> imaplib.IMAP4:
    """Open and log in, retrying network errors with backoff; a refused login is fatal.

    Raises:
        InboxError: the server refused the login.
        OSError: the server stayed unreachable after ``attempts`` tries.
    """

    def once() -> imaplib.IMAP4:
        conn: imaplib.IMAP4
        if config.ssl:
            conn = imaplib.IMAP4_SSL(
                config.host,
                config.port,
                ssl_context=ssl.create_default_context(),
                timeout=config.timeout,
            )
        else:
            conn = imaplib.IMAP4(config.host, config.port, timeout=config.timeout)
        if config.username is not None:
            password = config.password.get_secret_value() if config.password else ""
            try:
                conn.login(config.username, password)
            except imaplib.IMAP4.abort:
                raise
            except imaplib.IMAP4.error as exc:
                _logout(conn)
                raise InboxError(f"IMAP login as {config.username!r} refused: {exc}") from None
        return conn

    retrying = Retrying(
        # Network trouble and dropped connections are worth another try; a refused
        # login (InboxError) is not.
        retry=retry_if_exception_type((OSError, imaplib.IMAP4.abort)),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(max=5.0),
        reraise=True,
    )
    return retrying(once)


def _logout(conn: imaplib.IMAP4) -> None:
    # Closing anyway: the server may already have hung up.
    with contextlib.suppress(OSError, imaplib.IMAP4.error):
        conn.logout()


# --- classification (pure, no I/O) ------------------------------------------------------------


@dataclass(frozen=True)
class Bounce:
    """One failed recipient of a DSN."""

    recipient: str | None
    status: str
    action: str
    diagnostic: str | None


@dataclass(frozen=True)
class Classified:
    """What one message is: ``reply``, ``bounce``, ``auto_reply`` or ``other``."""

    kind: str
    message_id: str
    occurred_at: datetime | None
    references: tuple[str, ...] = ()  # candidate Message-IDs of ours, best first
    sender: str | None = None
    bounces: tuple[Bounce, ...] = ()


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    return str(value).strip() if value is not None else ""


def _ours(ids: Iterable[str]) -> list[str]:
    out: list[str] = []
    for mid in ids:
        if parse_message_id(mid) is not None and mid not in out:
            out.append(mid)
    return out


def _is_auto_reply(msg: Message) -> bool:
    auto = _header(msg, "Auto-Submitted").lower()
    if auto and auto != "no":
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Auto-Response-Suppress"):
        return True
    if _header(msg, "Precedence").lower() in {"auto_reply", "bulk", "junk", "list"}:
        return True
    return bool(_AUTO_SUBJECT.match(_header(msg, "Subject")))


def _dsn_fields(msg: Message) -> tuple[list[Message], Message | None]:
    """The per-recipient blocks of the delivery-status part, and the returned headers."""
    blocks: list[Message] = []
    original: Message | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in {"message/delivery-status", "message/global-delivery-status"}:
            payload = part.get_payload()
            if isinstance(payload, list):
                # The first block holds the per-message fields (Reporting-MTA ...).
                blocks = [b for b in payload[1:] if isinstance(b, Message)]
            elif isinstance(payload, str):
                chunks = re.split(r"\r?\n\r?\n", payload.strip())
                blocks = [HeaderParser().parsestr(c) for c in chunks[1:]]
        elif ctype in {"text/rfc822-headers", "text/global-headers"} and original is None:
            text = part.get_payload(decode=True)
            if isinstance(text, bytes):
                original = HeaderParser().parsestr(text.decode("utf-8", "replace"))
        elif ctype in {"message/rfc822", "message/global"} and original is None:
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                original = inner[0]
    return blocks, original


def _typed_value(value: str) -> str:
    """``rfc822; a@b`` -> ``a@b``; ``smtp; 550 5.1.1 ...`` -> ``550 5.1.1 ...``."""
    return value.split(";", 1)[1].strip() if ";" in value else value.strip()


def classify(raw: bytes) -> Classified:
    """Tell a reply, a DSN bounce, an auto-reply and anything else apart (no I/O).

    The ``message_id`` is the message's own Message-ID, or a digest of its bytes when it has
    none, so the same message always maps to the same event id.
    """
    msg = _PARSER.parsebytes(raw)
    own = _MSGID.findall(_header(msg, "Message-ID"))
    message_id = own[0] if own else "<sha256." + hashlib.sha256(raw).hexdigest() + "@inbox>"
    occurred: datetime | None = None
    try:
        date = parsedate_to_datetime(_header(msg, "Date"))
        occurred = date if date.tzinfo is not None else date.replace(tzinfo=UTC)
    except (TypeError, ValueError, IndexError):
        occurred = None
    senders = getaddresses([_header(msg, "From")])
    sender = senders[0][1] if senders and "@" in senders[0][1] else None

    if (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type") or "").lower() == "delivery-status"
    ):
        blocks, original = _dsn_fields(msg)
        bounces = tuple(
            Bounce(
                recipient=_typed_value(
                    _header(b, "Final-Recipient") or _header(b, "Original-Recipient")
                )
                or None,
                status=_header(b, "Status"),
                action=_header(b, "Action").lower(),
                diagnostic=_typed_value(_header(b, "Diagnostic-Code")) or None,
            )
            for b in blocks
        )
        refs: list[str] = []
        if original is not None:
            refs = _MSGID.findall(_header(original, "Message-ID"))
        return Classified("bounce", message_id, occurred, tuple(_ours(refs)), sender, bounces)
    if _is_auto_reply(msg):
        return Classified("auto_reply", message_id, occurred, sender=sender)
    # In-Reply-To names the message answered; References lists the thread, oldest first.
    candidates = _MSGID.findall(_header(msg, "In-Reply-To"))
    candidates += reversed(_MSGID.findall(_header(msg, "References")))
    ours = _ours(candidates)
    kind = "reply" if ours else "other"
    return Classified(kind, message_id, occurred, tuple(ours), sender)


# --- polling ----------------------------------------------------------------------------------


@dataclass
class InboxReport:
    """What one poll did."""

    fetched: int = 0
    replies: int = 0
    bounces: int = 0
    hard_bounces: int = 0
    auto_replies: int = 0
    other: int = 0
    unmatched: int = 0  # replies/bounces that name no delivery or lead of ours
    inserted: int = 0
    duplicates: int = 0
    suppressed: int = 0
    marked_seen: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (uid, reason); left unseen

    def as_dict(self) -> dict[str, Any]:
        """Counts for JSON output."""
        data = {k: v for k, v in self.__dict__.items() if k != "failed"}
        data["failed"] = [{"uid": uid, "reason": reason} for uid, reason in self.failed]
        return data


def _check(typ: str, data: Any, what: str) -> Any:
    if typ != "OK":
        raise InboxError(f"IMAP {what} failed: {typ} {data!r}")
    return data


def _fetch(conn: imaplib.IMAP4, uids: Sequence[int]) -> dict[int, bytes]:
    """The full raw bytes of these messages, without setting \\Seen (BODY.PEEK)."""
    typ, data = conn.uid("FETCH", ",".join(map(str, uids)), "(UID BODY.PEEK[])")
    _check(typ, data, "FETCH")
    out: dict[int, bytes] = {}
    for item in data:
        if isinstance(item, tuple) and len(item) == 2:
            match = _UID.search(item[0])
            if match is not None and isinstance(item[1], bytes):
                out[int(match.group(1))] = item[1]
    return out


def _events_for(
    found: Classified, deliveries: dict[str, tuple[int, str]], now: datetime
) -> list[EventIn]:
    """The events one classified message records (none for auto-replies and others)."""
    # A Date in the future (a skewed clock) or none at all counts as received now.
    when = found.occurred_at if found.occurred_at and found.occurred_at <= now else now
    delivery = next((deliveries[r] for r in found.references if r in deliveries), None)
    if found.kind == "reply":
        if delivery is None:
            return []
        return [
            EventIn(
                type="replied",
                occurred_at=when,
                delivery_id=delivery[0],
                external_id=found.message_id[:255],
                payload={"source": "imap", "from": found.sender},
            )
        ]
    if found.kind != "bounce":
        return []
    failed = [b for b in found.bounces if b.action == "failed" or b.status.startswith("5")]
    events = []
    for index, bounce in enumerate(failed):
        recipient = bounce.recipient
        try:
            recipient = check_email(recipient) if recipient else None
        except EventError:
            recipient = None
        # The returned Message-ID ties the bounce to our delivery, unless the DSN names a
        # different recipient (a multi-recipient report): then the address decides.
        mine = delivery
        if mine is not None and recipient and recipient.lower() != mine[1].lower():
            mine = None
        if recipient is None and mine is None:
            continue
        # One DSN may report several recipients: each gets its own idempotent id.
        ext = found.message_id if len(failed) == 1 else f"{found.message_id}#{index}"
        events.append(
            EventIn(
                type="bounced",
                occurred_at=when,
                # The delivery ties the bounce to its lead; the recipient is the address
                # suppressed (it is the lead's, or no lead's yet).
                delivery_id=mine[0] if mine else None,
                email=recipient or (mine[1] if mine else None),
                external_id=ext[:255],
                payload={
                    "hard": bounce.status.startswith("5"),
                    "status": bounce.status,
                    "action": bounce.action,
                    "diagnostic": (bounce.diagnostic or "")[:500],
                    "source": "imap",
                },
            )
        )
    return events


def _lookup_deliveries(engine: Engine, ids: set[str]) -> dict[str, tuple[int, str]]:
    """Message-ID -> (delivery id, lead email) for the ids we sent, in one query."""
    if not ids:
        return {}
    with session_scope(engine) as session:
        rows = session.execute(
            select(Delivery.message_id, Delivery.id, Lead.email)
            .join(Lead, Lead.id == Delivery.lead_id)
            .where(Delivery.message_id.in_(sorted(ids)))
        )
        return {mid: (did, addr) for mid, did, addr in rows}


def poll_inbox(
    engine: Engine,
    source: ImapConfig | imaplib.IMAP4,
    now: datetime,
    *,
    mailbox: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> InboxReport:
    """Read the unseen messages of the mailbox and record replies and bounces.

    Args:
        engine: The database.
        source: Where to read: a config (we connect, log in and log out) or an open,
            logged-in ``imaplib`` connection (the caller closes it).
        now: The current instant: a message without a usable Date counts as received now.
        mailbox: The folder (default: the config's, else ``INBOX``).
        batch_size: Messages fetched, recorded and flagged per round trip.

    Raises:
        InboxError: the server refused a command or the login.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    own = isinstance(source, ImapConfig)
    conn = connect(source) if isinstance(source, ImapConfig) else source
    folder = mailbox or (source.mailbox if isinstance(source, ImapConfig) else "INBOX")
    report = InboxReport()
    try:
        _check(*conn.select(_quote(folder)), f"SELECT {folder}")
        typ, data = conn.uid("SEARCH", "UNSEEN")
        found = _check(typ, data, "SEARCH")
        uids = [int(u) for u in (found[0] or b"").split()]
        for start in range(0, len(uids), batch_size):
            _poll_batch(engine, conn, uids[start : start + batch_size], now, report)
    finally:
        if own:
            _logout(conn)
    return report


def _quote(folder: str) -> str:
    # imaplib sends the name as is; a folder with spaces must be a quoted string.
    if re.fullmatch(r"[A-Za-z0-9._/-]+", folder):
        return folder
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _poll_batch(
    engine: Engine, conn: imaplib.IMAP4, uids: Sequence[int], now: datetime, report: InboxReport
) -> None:
    raw = _fetch(conn, uids)
    report.fetched += len(raw)
    classified: dict[int, Classified] = {}
    for uid, data in raw.items():
        try:
            classified[uid] = classify(data)
        except Exception as exc:  # any parser failure leaves the message unseen
            report.failed.append((uid, f"unparseable message: {exc}"))
    deliveries = _lookup_deliveries(engine, {r for c in classified.values() for r in c.references})
    events: list[EventIn] = []
    done: list[int] = []
    for uid, found in classified.items():
        try:
            produced = _events_for(found, deliveries, now)
        except EventError as exc:
            report.failed.append((uid, f"{exc.field}: {exc.message}"))
            continue
        done.append(uid)
        if found.kind == "auto_reply":
            report.auto_replies += 1
        elif found.kind == "other":
            report.other += 1
        elif not produced:
            report.unmatched += 1
        elif found.kind == "reply":
            report.replies += 1
        else:
            report.bounces += len(produced)
            report.hard_bounces += sum(1 for e in produced if e.payload.get("hard"))
        events.extend(produced)
    if events:
        with session_scope(engine) as session:
            result = record_events(session, events, now=now)
        report.inserted += result.inserted
        report.duplicates += result.duplicates
        report.suppressed += result.suppressed
        report.unmatched += len(set(result.unknown_indices))
    # Only now, with the events committed, may the messages leave the unseen set.
    if done:
        uid_set = ",".join(map(str, sorted(done)))
        _check(*conn.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Seen)"), "STORE")
        report.marked_seen += len(done)
