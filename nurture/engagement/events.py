"""Engagement events: the one path every event takes into the database.

The tracking service, the IMAP poller, ``nurture events import`` and the demo's simulator
all call :func:`record_events`. It works on a whole batch at once: one query resolves
deliveries to leads, one resolves emails, one checks lead ids, one bulk ``INSERT ... ON
CONFLICT DO NOTHING`` writes the events (idempotent by ``external_id``) and one more
writes suppressions. Events that cannot be tied to a lead are counted, never guessed.

Suppression always wins: ``unsubscribed``, ``complained`` and a hard ``bounced``
(``payload={"hard": True}``) put the address on the suppression list, even when the
address belongs to no lead yet (so a lead imported later is still never mailed), and
even when the event itself is a duplicate (so a re-sent webhook re-asserts it).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    String,
    Table,
    any_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from nurture.engagement.classify import (
    ClassifyConfig,
    Engagement,
    classify_delivery,
    merge_reasons,
    request_reasons_from_payload,
)
from nurture.errors import NurtureError
from nurture.spec.rules import ENGAGEMENT_TYPES, HUMAN
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Event, Lead
from nurture.store.sql import is_postgres
from nurture.store.suppression import suppress

__all__ = [
    "BATCH_SIZE",
    "KNOWN_TYPES",
    "BadLine",
    "EventError",
    "EventIn",
    "ImportReport",
    "RecordResult",
    "check_email",
    "import_jsonl",
    "parse_datetime",
    "parse_event",
    "parse_line",
    "reclassify_deliveries",
    "record_events",
]

KNOWN_TYPES = frozenset(
    {
        "sent",
        "opened",
        "clicked",
        "replied",
        "bounced",
        "complained",
        "unsubscribed",
        "page_view",
        "form_submit",
        "demo_request",
    }
)
# Custom types share the namespace; the pattern keeps them short, lowercase and safe
# to use as YAML keys in scoring rules.
TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
BATCH_SIZE = 1000
MAX_URL = 8192
MAX_EXTERNAL_ID = 255
MAX_EMAIL = 320
FIELDS = ("id", "type", "occurred_at", "email", "lead_id", "delivery_id", "url", "payload")


class EventError(NurtureError, ValueError):
    """An event is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_email(value: object, name: str = "email") -> str:
    """Return the stripped address, or raise :class:`EventError` if it is not one.

    Only a shape check: the address is used to look a lead up, never to send to.
    """
    if not isinstance(value, str):
        raise EventError(name, f"must be a string, got {value!r}")
    email = value.strip()
    if (
        not 3 <= len(email) <= MAX_EMAIL
        or "@" not in email
        or any(ch.isspace() or ord(ch) < 0x20 for ch in email)
    ):
        raise EventError(name, f"{value!r} is not an email address")
    _storable_text(name, email)
    return email


_MAX_ID = 2**63 - 1  # BIGINT
_MAX_DEPTH = 16
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def _positive_int(name: str, value: object) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_ID
    ):
        raise EventError(name, f"must be a positive 64-bit integer, got {value!r}")


def _storable_text(name: str, value: str) -> None:
    # PostgreSQL refuses NUL in text and JSONB, and no driver can encode a lone surrogate
    # (JSON's "\ud800" decodes to one): refuse both here, with the field named.
    if "\x00" in value:
        raise EventError(name, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EventError(name, f"contains an unpaired surrogate at {exc.start}") from exc


def _check_json(name: str, value: object, depth: int = 0) -> None:
    """JSON data both databases store: no NUL, no surrogates, no NaN, bounded nesting."""
    if depth > _MAX_DEPTH:
        raise EventError(name, f"nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, str):
        _storable_text(name, value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EventError(name, f"object key {key!r} is not a string")
            _storable_text(name, key)
            _check_json(f"{name}.{key}", item, depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(f"{name}[{index}]", item, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise EventError(name, f"{value} is not a JSON number")
    elif value is not None and not isinstance(value, bool | int):
        raise EventError(name, f"{type(value).__name__} is not JSON data")


@dataclass(frozen=True)
class EventIn:
    """One engagement event to record. Give at least one of lead_id, email or delivery_id.

    Raises:
        EventError: on construction, when a field is invalid.
    """

    type: str
    occurred_at: datetime
    lead_id: int | None = None
    email: str | None = None
    delivery_id: int | None = None
    url: str | None = None
    external_id: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not TYPE_PATTERN.match(self.type):
            raise EventError(
                "type", f"{self.type!r} is not an event type (lowercase, [a-z][a-z0-9_]{{0,31}})"
            )
        if not isinstance(self.occurred_at, datetime):
            raise EventError("occurred_at", f"must be a datetime, got {self.occurred_at!r}")
        if self.occurred_at.tzinfo is None:
            raise EventError("occurred_at", "needs a timezone (e.g. 2026-03-03T10:00:00Z)")
        try:
            in_range = _EARLIEST <= self.occurred_at < _LATEST
        except OverflowError:  # an offset that pushes year 1 or 9999 out of range
            in_range = False
        if not in_range:
            raise EventError("occurred_at", f"{self.occurred_at.isoformat()} is out of range")
        _positive_int("lead_id", self.lead_id)
        _positive_int("delivery_id", self.delivery_id)
        if self.email is not None:
            check_email(self.email)
        if self.lead_id is None and self.email is None and self.delivery_id is None:
            raise EventError("email", "give email, lead_id or delivery_id")
        if self.url is not None:
            if not isinstance(self.url, str) or len(self.url) > MAX_URL:
                raise EventError("url", f"must be a string of at most {MAX_URL} characters")
            _storable_text("url", self.url)
        if self.external_id is not None:
            if (
                not isinstance(self.external_id, str)
                or not 1 <= len(self.external_id) <= MAX_EXTERNAL_ID
            ):
                raise EventError("id", f"must be a string of 1 to {MAX_EXTERNAL_ID} characters")
            _storable_text("id", self.external_id)
        if not isinstance(self.payload, Mapping):
            raise EventError("payload", "must be an object")
        _check_json("payload", self.payload)


@dataclass(frozen=True)
class RecordResult:
    """What :func:`record_events` did with a batch."""

    inserted: int = 0
    duplicates: int = 0
    unknown_lead: int = 0
    suppressed: int = 0
    # Positions (in the input sequence) of events that matched no lead.
    unknown_indices: tuple[int, ...] = ()

    def __add__(self, other: RecordResult) -> RecordResult:
        return RecordResult(
            self.inserted + other.inserted,
            self.duplicates + other.duplicates,
            self.unknown_lead + other.unknown_lead,
            self.suppressed + other.suppressed,
            self.unknown_indices + other.unknown_indices,
        )

    def as_dict(self) -> dict[str, Any]:
        """Counts for JSON output."""
        return {
            "inserted": self.inserted,
            "duplicates": self.duplicates,
            "unknown_lead": self.unknown_lead,
            "suppressed": self.suppressed,
        }


def parse_datetime(value: object, name: str = "occurred_at") -> datetime:
    """An aware datetime from an ISO 8601 string.

    Raises:
        EventError: not a string, not ISO 8601, or without a UTC offset.
    """
    if not isinstance(value, str):
        raise EventError(name, f"must be an ISO 8601 string, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise EventError(name, f"{value!r} is not an ISO 8601 date-time") from exc
    if parsed.tzinfo is None:
        raise EventError(name, f"{value!r} needs a UTC offset, e.g. 2026-03-03T10:00:00Z")
    return parsed


def parse_event(data: object) -> EventIn:
    """Build an :class:`EventIn` from a decoded JSON object (a JSON Lines line, an API item).

    Fields: ``type``, ``occurred_at`` (ISO 8601 with offset), one of ``email`` /
    ``lead_id`` / ``delivery_id``, and optional ``url``, ``id`` (stored as external_id, the
    idempotency key) and ``payload`` (an object).

    Raises:
        EventError: naming the first bad field.
    """
    if not isinstance(data, Mapping):
        raise EventError("event", f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise EventError(unknown[0], f"unknown field (expected some of: {', '.join(FIELDS)})")
    if "type" not in data:
        raise EventError("type", "required")
    if "occurred_at" not in data:
        raise EventError("occurred_at", "required")
    external_id: Any = data.get("id")
    if isinstance(external_id, int) and not isinstance(external_id, bool):
        external_id = str(external_id)
    return EventIn(
        type=data["type"],
        occurred_at=parse_datetime(data["occurred_at"]),
        lead_id=data.get("lead_id"),
        email=data.get("email"),
        delivery_id=data.get("delivery_id"),
        url=data.get("url"),
        external_id=external_id,
        payload=data.get("payload") or {},
    )


def _member(session: Session, column: Any, values: Iterable[Any], item_type: Any) -> Any:
    """``column IN (values)``; on PostgreSQL ``= ANY(array)``, one parameter, not thousands.

    psycopg re-parses any statement longer than 4 kB on every execution, so a
    thousand-item IN list costs more than the lookup itself.
    """
    if is_postgres(session):
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(item_type)))
    return column.in_(list(values))


# One INSERT from eleven arrays: one parameter per column instead of one per value.
_PG_INSERT_EVENTS = text(
    "INSERT INTO events (lead_id, delivery_id, type, occurred_at, url, external_id, payload, "
    "engagement, engagement_reason, counted_human, counted_any) "
    "SELECT * FROM unnest(CAST(:lead_id AS bigint[]), CAST(:delivery_id AS bigint[]), "
    "CAST(:type AS text[]), CAST(:occurred_at AS timestamp[]), CAST(:url AS text[]), "
    "CAST(:external_id AS text[]), CAST(:payload AS jsonb[]), CAST(:engagement AS text[]), "
    "CAST(:engagement_reason AS text[]), CAST(:counted_human AS boolean[]), "
    "CAST(:counted_any AS boolean[])) "
    "ON CONFLICT (external_id) DO NOTHING RETURNING id"
)


def _insert_events(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert event rows, skipping known external ids; return how many were inserted."""
    if is_postgres(session):
        params = {
            "lead_id": [r["lead_id"] for r in rows],
            "delivery_id": [r["delivery_id"] for r in rows],
            "type": [r["type"] for r in rows],
            # The column holds naive UTC (see models.UTCDateTime).
            "occurred_at": [r["occurred_at"].astimezone(UTC).replace(tzinfo=None) for r in rows],
            "url": [r["url"] for r in rows],
            "external_id": [r["external_id"] for r in rows],
            "payload": [json.dumps(r["payload"]) for r in rows],
            "engagement": [r["engagement"] for r in rows],
            "engagement_reason": [r["engagement_reason"] for r in rows],
            "counted_human": [r["counted_human"] for r in rows],
            "counted_any": [r["counted_any"] for r in rows],
        }
        return len(session.execute(_PG_INSERT_EVENTS, params).all())
    table = Event.__table__
    assert isinstance(table, Table)
    stmt = (
        sqlite.insert(table)
        .on_conflict_do_nothing(index_elements=["external_id"])
        .returning(table.c.id)
    )
    return len(session.execute(stmt, rows).all())


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _suppression_reason(event: EventIn) -> str | None:
    if event.type in ("unsubscribed", "complained"):
        return event.type
    if event.type == "bounced" and event.payload.get("hard") is True:
        return "bounced"
    return None


def record_events(
    session: Session,
    events: Sequence[EventIn],
    *,
    now: datetime,
    classify: ClassifyConfig | None = None,
) -> RecordResult:
    """Record a batch of events set-based, idempotently, with their suppression side effects.

    Opens and clicks are classified ``human`` or ``machine`` (:mod:`nurture.engagement.classify`):
    first by their own request (the payload's ``method``, ``prefetch``, ``user_agent``
    and ``ip``), then, for events tied to a delivery, together with every earlier open and
    click of that delivery (time since the send, honeypot bursts, link bursts). Earlier
    events a new one reveals as machine are re-classified, and the one open per delivery
    and one click per link that scoring counts are chosen again.

    Leads are resolved by ``delivery_id`` first (the delivery's lead), then ``lead_id``, then
    ``email``. A ``delivery_id`` that names no delivery is dropped from the row; an event
    with no resolvable lead is counted in ``unknown_lead`` and not stored. Events whose
    ``external_id`` already exists (or repeats within the batch) count as duplicates.

    Args:
        session: An open session; the caller owns the transaction.
        events: The events, validated by :class:`EventIn`.
        now: The current instant, used as the suppression time.
        classify: Thresholds of the per-delivery machine signals (defaults if None).
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    total = RecordResult()
    for offset in range(0, len(events), BATCH_SIZE):
        chunk = events[offset : offset + BATCH_SIZE]
        total += _record_chunk(session, chunk, offset, now)
        engaged = [e for e in chunk if e.delivery_id is not None and e.type in ENGAGEMENT_TYPES]
        flooded = _mark_floods(session, engaged, classify or ClassifyConfig())
        engaged = [e for e in engaged if e.delivery_id not in flooded]
        if engaged:
            times = [e.occurred_at for e in engaged]
            reclassify_deliveries(
                session,
                {e.delivery_id for e in engaged if e.delivery_id is not None},
                classify,
                window=(min(times), max(times)),
            )
    return total


def _mark_floods(session: Session, engaged: Sequence[EventIn], config: ClassifyConfig) -> set[int]:
    """Mark the events of deliveries hammered in this batch ``machine`` (``flood``).

    A person does not open or click one message ``flood_events`` times within
    ``flood_window``. Such a delivery's events of this batch become machine and are never
    counted, with one UPDATE, instead of re-reading its whole recent history per batch
    (which grew with every hit). Its earlier events and the event scoring counts stay.

    Returns:
        The flooded delivery ids.
    """
    by_delivery: dict[int, list[datetime]] = defaultdict(list)
    for e in engaged:
        if e.delivery_id is not None:
            by_delivery[e.delivery_id].append(e.occurred_at)
    flooded: set[int] = set()
    for delivery_id, times in by_delivery.items():
        if len(times) < config.flood_events or max(times) - min(times) > config.flood_window:
            continue
        flooded.add(delivery_id)
        session.execute(
            update(Event)
            .where(
                Event.delivery_id == delivery_id,
                Event.type.in_(ENGAGEMENT_TYPES),
                Event.occurred_at.between(min(times), max(times)),
                Event.counted_human.is_(False),
                Event.counted_any.is_(False),
            )
            .values(
                engagement="machine",
                engagement_reason=func.coalesce(Event.engagement_reason, "flood"),
            )
            .execution_options(synchronize_session=False)
        )
    return flooded


def reclassify_deliveries(
    session: Session,
    delivery_ids: Iterable[int],
    config: ClassifyConfig | None = None,
    *,
    window: tuple[datetime, datetime] | None = None,
) -> int:
    """Classify the opens and clicks of these deliveries again; return the rows changed.

    With ``window`` (the first and last time of the events just recorded), only the
    events within the widest signal window around it are read, so a delivery hit a
    million times costs no more per batch than one hit ten times: every per-delivery
    signal is local in time (the send time aside, which is one column), and reasons only
    ever grow, so stored reasons are kept and new ones added. Without ``window`` every
    open and click of the deliveries is read (after changing thresholds, say).

    Per group (one delivery's opens; its clicks on one link) the event scoring counts
    stays the earliest (human) one: the stored holder, unless an event read now is
    earlier or the holder turned out to be a machine's.
    """
    config = config or ClassifyConfig()
    ids = sorted(set(delivery_ids))
    changed: dict[int, dict[str, Any]] = {}
    for chunk in _chunks(ids, BATCH_SIZE):
        _reclassify_chunk(session, chunk, config, window, changed)
    if changed:
        # ORM bulk UPDATE by primary key: one executemany.
        session.execute(update(Event), list(changed.values()))
    return len(changed)


def _group(row: Any) -> tuple[int, str, str | None]:
    return (row.delivery_id, row.type, row.url if row.type == "clicked" else None)


def _reclassify_chunk(
    session: Session,
    chunk: Sequence[int],
    config: ClassifyConfig,
    window: tuple[datetime, datetime] | None,
    changed: dict[int, dict[str, Any]],
) -> None:
    sent = dict(
        session.execute(
            select(Delivery.id, Delivery.sent_at).where(
                _member(session, Delivery.id, chunk, BigInteger)
            )
        ).all()
    )
    columns = (
        Event.id,
        Event.delivery_id,
        Event.type,
        Event.occurred_at,
        Event.url,
        Event.engagement,
        Event.engagement_reason,
        Event.counted_human,
        Event.counted_any,
    )
    mine = (
        _member(session, Event.delivery_id, chunk, BigInteger),
        Event.type.in_(ENGAGEMENT_TYPES),
    )
    near = select(*columns, Event.payload).where(*mine)
    reach = max(config.honeypot_window, config.burst_window)
    if window is not None:
        near = near.where(Event.occurred_at.between(window[0] - reach, window[1] + reach))
    rows = session.execute(near).all()
    holders: Sequence[Any] = []
    if window is not None:
        # The events scoring counts now: at most two per group.
        holders = session.execute(
            select(*columns).where(
                *mine, or_(Event.counted_human.is_(True), Event.counted_any.is_(True))
            )
        ).all()

    by_delivery: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        by_delivery[row.delivery_id].append(row)
    read = {row.id for row in rows}
    verdict_of: dict[int, tuple[str, str | None]] = {}
    for delivery_id, group in by_delivery.items():
        items = [
            Engagement(
                r.id, r.type, r.occurred_at, r.url, tuple(request_reasons_from_payload(r.payload))
            )
            for r in group
        ]
        verdicts = classify_delivery(sent.get(delivery_id), items, config)
        for r in group:
            reasons = verdicts[r.id].reasons
            if window is not None and r.engagement_reason:
                # Reasons found from events outside the window stay.
                reasons = merge_reasons(reasons, r.engagement_reason.split(","))
            engagement = "machine" if reasons else HUMAN
            verdict_of[r.id] = (engagement, ",".join(reasons)[:255] or None)

    # Choose the counted event of every group the window touched.
    groups: dict[tuple[int, str, str | None], list[Any]] = defaultdict(list)
    for r in rows:
        groups[_group(r)].append(r)
    stored_human: dict[tuple[int, str, str | None], Any] = {}
    stored_any: dict[tuple[int, str, str | None], Any] = {}
    for h in holders:
        if h.id in read:  # just inserted, or in the window: a member of its group already
            continue
        if h.counted_human:
            stored_human[_group(h)] = h
        if h.counted_any:
            stored_any[_group(h)] = h
    flags: dict[int, list[bool]] = {r.id: [False, False] for r in rows}
    lost_holder: list[tuple[int, str, str | None]] = []

    def first(candidates: Iterable[Any]) -> Any:
        return min(candidates, key=lambda r: (r.occurred_at, r.id), default=None)

    for key, members in groups.items():
        best_any = first([*members, *([stored_any[key]] if key in stored_any else [])])
        flags.setdefault(best_any.id, [False, False])[1] = True
        humans = [r for r in members if verdict_of[r.id][0] == HUMAN]
        holder = stored_human.get(key)
        if holder is not None:
            humans.append(holder)  # outside the window: nothing read now can change it
        best_human = first(humans)
        if best_human is not None:
            flags.setdefault(best_human.id, [False, False])[0] = True
        elif any(r.counted_human for r in members):
            lost_holder.append(key)  # the counted person's event was a machine's
    for key, holder in [*stored_human.items(), *stored_any.items()]:
        if key in groups:
            flags.setdefault(holder.id, [False, False])
    if lost_holder and window is not None:
        _next_humans(session, lost_holder, window[1] + reach, flags)

    current = {r.id: r for r in (*rows, *holders)}
    for event_id, (human, counted_any) in flags.items():
        r = current.get(event_id)
        if r is None:  # found by _next_humans
            changed[event_id] = {"id": event_id, "counted_human": True}
            continue
        engagement, reason = verdict_of.get(event_id, (r.engagement, r.engagement_reason))
        new = (engagement, reason, human, counted_any)
        if new != (r.engagement, r.engagement_reason, r.counted_human, r.counted_any):
            changed[event_id] = {
                "id": event_id,
                "engagement": engagement,
                "engagement_reason": reason,
                "counted_human": human,
                "counted_any": counted_any,
            }


def _next_humans(
    session: Session,
    keys: list[tuple[int, str, str | None]],
    after: datetime,
    flags: dict[int, list[bool]],
) -> None:
    """The earliest human event after ``after`` (the end of what was read) of groups whose
    counted one fell. None is earlier: the fallen one was the earliest human event."""
    for delivery_id, etype, url in keys:  # rare: only after a burst unmasks the holder
        query = (
            select(Event.id)
            .where(
                Event.delivery_id == delivery_id,
                Event.type == etype,
                Event.engagement == HUMAN,
                Event.occurred_at > after,
            )
            .order_by(Event.occurred_at, Event.id)
            .limit(1)
        )
        if etype == "clicked":
            query = query.where(Event.url.is_not_distinct_from(url))
        found = session.scalar(query)
        if found is not None and found not in flags:
            flags[found] = [True, False]


def _record_chunk(
    session: Session, events: Sequence[EventIn], offset: int, now: datetime
) -> RecordResult:
    delivery_ids = {e.delivery_id for e in events if e.delivery_id is not None}
    delivery_lead: dict[int, int] = {}
    if delivery_ids:
        rows = session.execute(
            select(Delivery.id, Delivery.lead_id).where(
                _member(session, Delivery.id, delivery_ids, BigInteger)
            )
        )
        delivery_lead = {d: lead for d, lead in rows}

    # Emails as given and lowercased: the lead table holds normalised addresses, whose
    # local part may keep its case, so match exactly first and case-insensitively second.
    given = {e.email.strip() for e in events if e.email is not None}
    by_exact: dict[str, int] = {}
    by_lower: dict[str, int] = {}
    lead_email: dict[int, str] = {}
    if given:
        wanted = given | {e.lower() for e in given}
        for lead_id, email in session.execute(
            select(Lead.id, Lead.email).where(_member(session, Lead.email, wanted, String))
        ):
            by_exact[email] = lead_id
            by_lower.setdefault(email.lower(), lead_id)
            lead_email[lead_id] = email

    ids = {e.lead_id for e in events if e.lead_id is not None} | set(delivery_lead.values())
    ids -= lead_email.keys()
    if ids:
        for lead_id, email in session.execute(
            select(Lead.id, Lead.email).where(_member(session, Lead.id, ids, BigInteger))
        ):
            lead_email[lead_id] = email

    rows_out: list[dict[str, Any]] = []
    seen: set[str] = set()
    unknown: list[int] = []
    duplicates = 0
    to_suppress: dict[tuple[str, str], list[str]] = defaultdict(list)
    for index, event in enumerate(events):
        delivery = event.delivery_id if event.delivery_id in delivery_lead else None
        lead: int | None = None
        if delivery is not None:
            lead = delivery_lead[delivery]
        if lead is None and event.lead_id is not None and event.lead_id in lead_email:
            lead = event.lead_id
        if lead is None and event.email is not None:
            email = event.email.strip()
            lead = by_exact.get(email) or by_lower.get(email.lower())

        reason = _suppression_reason(event)
        if reason is not None:
            if lead is not None:
                address = lead_email[lead]
            elif event.email is not None:
                address = event.email.strip().lower()
            else:
                address = ""
            source = event.payload.get("source")
            key = (reason, source if isinstance(source, str) else f"event:{event.type}")
            if address:
                to_suppress[key].append(address)

        if lead is None:
            unknown.append(offset + index)
            continue
        if event.external_id is not None:
            if event.external_id in seen:
                duplicates += 1
                continue
            seen.add(event.external_id)
        engagement: str | None = None
        engagement_reason: str | None = None
        counted_human = counted_any = True
        if event.type in ENGAGEMENT_TYPES:
            # The request's own signals now; the delivery's set signals after the insert.
            reasons = request_reasons_from_payload(event.payload)
            engagement = "machine" if reasons else HUMAN
            engagement_reason = ",".join(merge_reasons(reasons))[:255] or None
            counted_human = engagement == HUMAN
            if delivery is not None:
                # Re-classifying the delivery picks the one counted event of each group
                # right after the insert; most opens and clicks are repeats, so starting
                # from "not counted" leaves those rows unwritten.
                counted_human = counted_any = False
        rows_out.append(
            {
                "lead_id": lead,
                "delivery_id": delivery,
                "type": event.type,
                "occurred_at": event.occurred_at,
                "url": event.url,
                "external_id": event.external_id,
                "payload": dict(event.payload),
                "engagement": engagement,
                "engagement_reason": engagement_reason,
                "counted_human": counted_human,
                "counted_any": counted_any,
            }
        )

    inserted = 0
    if rows_out:
        inserted = _insert_events(session, rows_out)
        duplicates += len(rows_out) - inserted

    suppressed = sum(
        suppress(session, emails, reason, source[:255], now)
        for (reason, source), emails in to_suppress.items()
    )
    return RecordResult(inserted, duplicates, len(unknown), suppressed, tuple(unknown))


@dataclass(frozen=True)
class BadLine:
    """A JSON Lines line that was skipped, with where and why."""

    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.reason}"


@dataclass
class ImportReport:
    """The outcome of :func:`import_jsonl`."""

    lines: int = 0
    inserted: int = 0
    duplicates: int = 0
    unknown_lead: int = 0
    suppressed: int = 0
    bad: list[BadLine] = field(default_factory=list)
    unknown_lines: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Everything, for ``--json``."""
        return {
            "lines": self.lines,
            "inserted": self.inserted,
            "duplicates": self.duplicates,
            "unknown_lead": self.unknown_lead,
            "suppressed": self.suppressed,
            "bad": [{"line": b.line, "field": b.field, "reason": b.reason} for b in self.bad],
            "unknown_lead_lines": self.unknown_lines,
        }


def parse_line(raw: bytes, number: int) -> EventIn | BadLine | None:
    """Parse one JSON Lines line: an event, a :class:`BadLine`, or ``None`` if blank."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadLine(number, "line", f"not UTF-8 (byte {exc.start})")
    if number == 1:
        line = line.removeprefix("\ufeff")
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError as exc:
        return BadLine(number, "line", f"not valid JSON: {exc}")
    except RecursionError:
        return BadLine(number, "line", "JSON nested too deeply")
    try:
        return parse_event(data)
    except EventError as exc:
        return BadLine(number, exc.field, exc.message)


def import_jsonl(
    engine: Engine,
    lines: Iterable[bytes],
    *,
    now: datetime,
    batch_size: int = BATCH_SIZE,
    on_batch: Callable[[ImportReport], None] | None = None,
) -> ImportReport:
    """Import JSON Lines events in batches, each batch in its own transaction.

    Bad lines are reported with their line number and skipped; the good ones load. An
    event's ``id`` becomes its external_id, so importing the same file again adds nothing
    (events without an ``id`` cannot be recognised and would be added again). A crash
    keeps the batches already committed, and a rerun completes the file.

    Args:
        engine: A migrated database engine.
        lines: The file's lines as bytes (an open binary file works).
        now: The current instant, for suppression times.
        batch_size: Events per transaction.
        on_batch: Called with the running report after each committed batch (progress).
    """
    report = ImportReport()
    pending: list[EventIn] = []
    pending_lines: list[int] = []

    def flush() -> None:
        with session_scope(engine) as session:
            result = record_events(session, pending, now=now)
        report.inserted += result.inserted
        report.duplicates += result.duplicates
        report.unknown_lead += result.unknown_lead
        report.suppressed += result.suppressed
        report.unknown_lines.extend(pending_lines[i] for i in result.unknown_indices)
        pending.clear()
        pending_lines.clear()
        if on_batch is not None:
            on_batch(report)

    for number, raw in enumerate(lines, start=1):
        report.lines = number
        parsed = parse_line(raw, number)
        if parsed is None:
            continue
        if isinstance(parsed, BadLine):
            report.bad.append(parsed)
            continue
        pending.append(parsed)
        pending_lines.append(number)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return report
