"""Recording send outcomes: each SMTP connection's groups move claimed -> sending before
the wire and to their outcome after it (see :class:`Recorder`), counted in a :class:`SendReport`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    String,
    TextClause,
    bindparam,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from nurture.engagement.events import EventIn, record_events
from nurture.outbox.smtp_transport import Outcome, SendResult
from nurture.store.db import db_retrying, session_scope
from nurture.store.models import (
    Delivery,
    DeliveryStatus,
    UTCDateTime,
)
from nurture.store.sql import bulk_update, id_in
from nurture.store.suppression import suppress


@dataclass
class SendReport:
    """Counts from one or more send batches."""

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    retry: int = 0
    skipped: int = 0
    unknown: int = 0  # accepted or not, nobody knows: reported, never resent
    recovered_unknown: int = 0
    due: int = 0  # queued and due when the send loop started
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, other: SendReport) -> None:
        """Accumulate another report into this one."""
        for name in (
            "claimed",
            "sent",
            "failed",
            "retry",
            "skipped",
            "unknown",
            "recovered_unknown",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, n in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + n


@dataclass
class _Plan:
    """The writes for a set of send results, and their counts."""

    sent: list[int] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    bounced: list[SendResult] = field(default_factory=list)
    report: SendReport = field(default_factory=SendReport)


class Recorder:
    """Records send outcomes group by group, from the SMTP connections' threads.

    Called by :meth:`SmtpSender.send_batch` before each group goes on the wire: one
    transaction records the connection's previous group and moves the next one
    claimed -> sending. The messages are out by then, so the write rides out a locked or
    restarting database (classified retries). Counts reach ``report`` only once their
    writes committed, so :meth:`finish` can record the rest without counting twice.
    """

    def __init__(
        self,
        engine: Engine,
        now: datetime,
        emails: dict[int, str],
        attempts: dict[int, int],
        max_attempts: int,
    ) -> None:
        self.engine = engine
        self.now = now
        self.emails = emails
        self.attempts = attempts
        self.max_attempts = max_attempts
        self.report = SendReport()
        self.recorded: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, done: list[SendResult], upcoming: list[int]) -> None:
        self._write(done, upcoming, [])

    def finish(self, results: list[SendResult], unrendered: list[dict[str, Any]]) -> None:
        """Record every result the connections did not, and the render failures."""
        with self.lock:
            rest = [r for r in results if r.key not in self.recorded]
        if rest or unrendered:
            self._write(rest, [], unrendered)

    def _write(
        self, done: list[SendResult], upcoming: list[int], extra: list[dict[str, Any]]
    ) -> None:
        plan = self._plan(done)
        if not (plan.updates or plan.bounced or extra):
            self._write_plain(plan, upcoming)
        else:
            self._write_all(plan, upcoming, extra)
        with self.lock:
            self.recorded.update(r.key for r in done)
            self.report.add(plan.report)

    def _write_plain(self, plan: _Plan, upcoming: list[int]) -> None:
        """The common case, once per group and connection: the previous group all sent,
        the next one going out. One prepared UPDATE on a Core connection: building the
        statement with the expression language cost about 1 ms per group."""
        if not plan.sent and not upcoming:
            return
        params = {
            "sent": _id_param(self.engine, plan.sent),
            "ids": _id_param(self.engine, plan.sent + upcoming),
            "now": self.now,
        }
        statement = _mark_statement(self.engine.dialect.name)
        for attempt in db_retrying():
            with attempt, self.engine.begin() as conn:
                conn.execute(statement, params)

    def _write_all(self, plan: _Plan, upcoming: list[int], extra: list[dict[str, Any]]) -> None:
        now = self.now
        for attempt in db_retrying():
            with attempt, session_scope(self.engine) as session:
                if plan.sent:
                    session.execute(
                        update(Delivery)
                        .where(id_in(session, Delivery.id, plan.sent))
                        .values(
                            status=DeliveryStatus.sent.value,
                            sent_at=now,
                            error=None,
                            updated_at=now,
                        )
                        .execution_options(synchronize_session=False)
                    )
                bulk_update(session, Delivery, plan.updates + extra)
                if plan.bounced:
                    self._suppress(session, plan.bounced)
                if upcoming:
                    session.execute(
                        update(Delivery)
                        .where(id_in(session, Delivery.id, upcoming))
                        .values(status=DeliveryStatus.sending.value, updated_at=now)
                        .execution_options(synchronize_session=False)
                    )

    def _suppress(self, session: Session, bounced: list[SendResult]) -> None:
        now = self.now
        suppress(
            session,
            [self.emails[b.key] for b in bounced],
            reason="bounce",
            source="smtp",
            now=now,
        )
        record_events(
            session,
            [
                EventIn(
                    type="bounced",
                    occurred_at=now,
                    delivery_id=b.key,
                    payload={"hard": True, "code": b.code, "detail": b.detail or ""},
                )
                for b in bounced
            ],
            now=now,
        )

    def _plan(self, results: list[SendResult]) -> _Plan:
        plan = _Plan()
        report, now = plan.report, self.now
        for res in results:
            if res.outcome == Outcome.sent:
                plan.sent.append(res.key)
                continue
            tries = self.attempts[res.key]
            if res.outcome == Outcome.unknown:
                plan.updates.append(
                    {"id": res.key, "status": DeliveryStatus.unknown.value,
                     "error": (res.detail or "")[:2000], "updated_at": now}
                )  # fmt: skip
                report.unknown += 1
            elif res.outcome == Outcome.rejected:
                code = f" {res.code}" if res.code is not None else ""
                plan.updates.append(failed_row(res.key, f"SMTP{code}: {res.detail}", now))
                report.failed += 1
                if res.hard_bounce:
                    plan.bounced.append(res)
            elif tries >= self.max_attempts:
                reason = f"gave up after {tries} attempts: {res.code} {res.detail}"
                plan.updates.append(failed_row(res.key, reason, now))
                report.failed += 1
            else:
                # Back off in business time: the row waits for a later tick, in due order.
                backoff = timedelta(minutes=min(2**tries, 60))
                plan.updates.append(
                    {
                        "id": res.key,
                        "status": DeliveryStatus.queued.value,
                        "due_at": now + backoff,
                        "error": f"retry: {res.code} {res.detail}",
                        "updated_at": now,
                    }
                )
                report.retry += 1
            key = f"{res.outcome.value} {res.code or ''}".strip()
            report.errors[key] = report.errors.get(key, 0) + 1
        report.sent = len(plan.sent)
        return plan


@lru_cache(maxsize=2)
def _mark_statement(dialect: str) -> TextClause:
    """``UPDATE`` rows :ids: those in :sent become ``sent`` at :now, the rest ``sending``."""
    if dialect == "postgresql":
        member = "id = ANY(:{})"
        ids_type: Any = ARRAY(BigInteger)
    else:
        member = "id IN (SELECT value FROM json_each(:{}))"
        ids_type = String()
    was_sent = member.format("sent")
    sql = (
        f"UPDATE deliveries SET "
        f"status = CASE WHEN {was_sent} THEN 'sent' ELSE 'sending' END, "
        f"sent_at = CASE WHEN {was_sent} THEN :now ELSE sent_at END, "
        f"error = CASE WHEN {was_sent} THEN NULL ELSE error END, "
        f"updated_at = :now WHERE {member.format('ids')}"
    )
    return text(sql).bindparams(
        bindparam("sent", type_=ids_type),
        bindparam("ids", type_=ids_type),
        bindparam("now", type_=UTCDateTime()),
    )


def _id_param(engine: Engine, ids: list[int]) -> Any:
    """Ids as the one parameter :func:`_mark_statement` takes: an array, or JSON text."""
    if engine.dialect.name == "postgresql":
        return [int(i) for i in ids]
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


def failed_row(delivery_id: int, error: str, now: datetime) -> dict[str, Any]:
    return {
        "id": delivery_id,
        "status": DeliveryStatus.failed.value,
        "error": error[:2000],
        "updated_at": now,
    }
