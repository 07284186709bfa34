"""The outbox: claim queued deliveries in batches, render, send over SMTP, record the outcome.

Exactly once, and only the wire in doubt (DESIGN.md rule 1). A chunk of rows moves
queued -> claimed in one committed transaction: reserved, no byte sent, safe to give back.
Each SMTP connection then takes a small group of the chunk (``Mailer.wire_group``) and, in
one committed transaction *before* the first byte of the group goes to the server, records
the outcomes of its previous group and moves the new one claimed -> sending. A row becomes
sent only after the server accepted it. Crash recovery gives a dead sender's ``claimed`` rows
back to the queue and marks only its ``sending`` rows ``unknown``, reported and never resent:
at most ``connections x wire_group`` messages (32 with the defaults) are ever in doubt.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import (
    BigInteger,
    Engine,
    String,
    TextClause,
    and_,
    bindparam,
    exists,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from nurture.engagement.events import EventIn, record_events, suppress
from nurture.message.compose import Rendered, compose
from nurture.message.mime import envelope_address
from nurture.message.render_workers import RenderWorkerError, RenderWorkers
from nurture.message.rendering import TemplateStore
from nurture.outbox.smtp_transport import Outcome, Outgoing, SendResult, SmtpSender
from nurture.store.db import db_retrying, session_scope
from nurture.store.models import (
    Account,
    Campaign,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Lead,
    Suppression,
    UTCDateTime,
)
from nurture.store.sql import affected, at, bulk_update, id_in, is_postgres, unindexed

WallClock = Callable[[], datetime]


def wall_clock() -> datetime:
    """The real time, used only for claim leases (never for business time)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Mailer:
    """What sending needs besides the database: templates, transport and addressing."""

    store: TemplateStore
    sender: SmtpSender
    from_address: str
    envelope_from: str
    secret: str
    tracking_url: str
    track: bool = True
    unsubscribe_mailto: str | None = None
    # Above 0, send_due renders in this many worker processes while it sends the previous
    # chunk: rendering is CPU-bound Python and would otherwise cap the tick.
    render_workers: int = 0
    # Messages each SMTP connection marks `sending` at a time: the crash window per
    # connection (one committed transaction per group).
    wire_group: int = 8


COUNTS = ("claimed", "sent", "failed", "retry", "skipped", "unknown", "recovered_unknown")


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


# Claimants (worker ids) of this process that are inside send_due right now.
_ACTIVE: set[str] = set()
# The states in which a row belongs to its claimant.
_IN_HAND = (DeliveryStatus.claimed.value, DeliveryStatus.sending.value)
# A claimed row given back to the queue (no byte of it was sent): its claim and the
# attempt the claim counted are undone. Used by crash recovery and by a clean stop.
_GIVEN_BACK: dict[str, Any] = {
    "status": DeliveryStatus.queued.value,
    "claimed_by": None,
    "claimed_at": None,
    "attempts": Delivery.attempts - 1,
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_in_flight(
    engine: Engine,
    *,
    worker: str,
    lease: timedelta = timedelta(minutes=15),
    clock: WallClock = wall_clock,
) -> int:
    """Recover the rows of claimants that died: ``claimed`` rows (no byte sent) go back to
    the queue; ``sending`` rows (bytes may have reached the server) become ``unknown``,
    reported and never resent.

    A claimant on this host is dead when its pid is gone, or, for this very process, when no
    tick of it is sending under that name any more; on another host, when its lease
    (wall-clock claim time + ``lease``) has expired.

    Returns:
        How many rows became ``unknown``.
    """
    host = socket.gethostname()
    wall = clock()
    with session_scope(engine) as session:
        rows = session.execute(
            select(Delivery.claimed_by, Delivery.claimed_at)
            .where(Delivery.status.in_(_IN_HAND))
            .distinct()
        ).all()
        dead: set[str] = set()
        for claimant, claimed_at in rows:
            if not claimant or claimant == worker:
                continue
            c_host, _, rest = claimant.partition(":")
            pid = rest.split(":", 1)[0]
            if c_host == host and pid.isdigit():
                if int(pid) == os.getpid():
                    if claimant in _ACTIVE:
                        continue  # a tick of this process is sending them right now
                elif _pid_alive(int(pid)):
                    continue
            elif claimed_at is not None and claimed_at + lease > wall:
                continue
            dead.add(claimant)
        if not dead:
            return 0
        session.execute(
            update(Delivery)
            .where(
                Delivery.status == DeliveryStatus.claimed.value,
                Delivery.claimed_by.in_(dead),
            )
            .values(**_GIVEN_BACK, updated_at=wall)
        )
        result = session.execute(
            update(Delivery)
            .where(
                Delivery.status == DeliveryStatus.sending.value,
                Delivery.claimed_by.in_(dead),
            )
            .values(
                status=DeliveryStatus.unknown.value,
                error="in flight when its sender died; not resent",
                updated_at=wall,
            )
        )
        return affected(result)


def skip_blocked(engine: Engine, now: datetime) -> int:
    """Skip queued deliveries to suppressed addresses or exited enrollments (suppression wins)."""
    with session_scope(engine) as session:
        suppressed = exists(
            select(Suppression.id)
            .join(Lead, Lead.email == Suppression.email)
            .where(Lead.id == Delivery.lead_id)
        )
        exited = exists(
            select(Enrollment.id).where(
                Enrollment.id == Delivery.enrollment_id,
                Enrollment.status == EnrollmentStatus.exited.value,
            )
        )
        result = session.execute(
            update(Delivery)
            .where(Delivery.status == DeliveryStatus.queued.value, suppressed | exited)
            .values(
                status=DeliveryStatus.skipped.value, error="suppressed or exited", updated_at=now
            )
        )
        return affected(result)


@dataclass(frozen=True)
class Throttle:
    """Sending caps as rates. A tick turns them into budgets over its interval, and what
    exceeds a budget stays queued, in due order, for the next tick."""

    per_second: float | None = None
    per_domain_per_second: float | None = None
    tick_seconds: float = 900.0

    def budget(self) -> Budget:
        """A fresh budget for one tick."""

        def cap(rate: float | None) -> int | None:
            return None if rate is None else max(1, int(rate * self.tick_seconds))

        return Budget(total=cap(self.per_second), per_domain=cap(self.per_domain_per_second))


@dataclass
class Budget:
    """How much one tick may still send, overall and per recipient domain."""

    total: int | None = None
    per_domain: int | None = None
    used_total: int = 0
    used: dict[str, int] = field(default_factory=dict)

    def room(self, limit: int) -> int:
        """How many more messages may be claimed now, at most ``limit``."""
        return limit if self.total is None else max(0, min(limit, self.total - self.used_total))

    def saturated(self) -> list[str]:
        """Domains whose budget is spent."""
        if self.per_domain is None:
            return []
        return [d for d, n in self.used.items() if n >= self.per_domain]

    def pick(self, candidates: list[tuple[int, str]], limit: int) -> list[int]:
        """Take candidates in due order while the budgets allow, and charge them."""
        picked: list[int] = []
        room = self.room(limit)
        for delivery_id, domain in candidates:
            if len(picked) >= room:
                break
            if self.per_domain is not None and self.used.get(domain, 0) >= self.per_domain:
                continue
            picked.append(delivery_id)
            self.used[domain] = self.used.get(domain, 0) + 1
            self.used_total += 1
        return picked


def _claim(
    session: Session, now: datetime, worker: str, limit: int, wall: datetime, budget: Budget
) -> list[int]:
    room = budget.room(limit)
    if room == 0:
        return []
    candidates = (
        select(Delivery.id, Delivery.domain)
        .where(Delivery.status == DeliveryStatus.queued.value, Delivery.due_at <= at(now))
        .order_by(Delivery.due_at, Delivery.id)
        # With a per-domain cap, look further ahead so one busy domain cannot starve the rest.
        .limit(room if budget.per_domain is None else room * 4)
    )
    full = budget.saturated()
    if full:
        candidates = candidates.where(Delivery.domain.not_in(full))
    if is_postgres(session.get_bind()):  # type: ignore[arg-type]
        candidates = candidates.with_for_update(skip_locked=True)
    ids = budget.pick([(i, d) for i, d in session.execute(candidates).all()], limit)
    if not ids:
        return []
    # The status guard makes the claim safe on SQLite too, whose writers are serialised.
    # It must not pick the access path: the ids go through the primary key (see unindexed).
    claimed = session.scalars(
        update(Delivery)
        .where(
            id_in(session, Delivery.id, ids),
            unindexed(Delivery.status) == DeliveryStatus.queued.value,
        )
        .values(
            status=DeliveryStatus.claimed.value,
            claimed_by=worker,
            claimed_at=wall,
            attempts=Delivery.attempts + 1,
            updated_at=wall,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)  # nothing of it is loaded here
    )
    return list(claimed)


def _claim_and_load(
    engine: Engine, now: datetime, worker: str, limit: int, wall: datetime, budget: Budget
) -> tuple[list[int], list[Any]]:
    """Claim a chunk and read what rendering needs, riding out a locked or restarting
    database. Nothing was sent yet, so a retry is always safe."""
    for attempt in db_retrying():
        with attempt:
            with session_scope(engine) as session:
                ids = _claim(session, now, worker, limit, wall, budget)
            if not ids:
                return [], []
            with session_scope(engine) as session:
                return ids, _load(session, ids)
    raise AssertionError("db_retrying re-raises its last error")


def _load(session: Session, ids: list[int]) -> list[Any]:
    return list(
        session.execute(
            select(
                Delivery.id,
                Delivery.lead_id,
                Delivery.step_id,
                Delivery.template,
                Delivery.variant,
                Delivery.message_id,
                Delivery.attempts,
                Campaign.name.label("campaign"),
                # The campaign's own `from:`, when it has one (the spec as stored JSON).
                Campaign.spec["from"].as_string().label("campaign_from"),
                Lead.email,
                Lead.first_name,
                Lead.last_name,
                Lead.attributes,
                Lead.source,
                Lead.country,
                Lead.lifecycle_stage,
                Account.name.label("company"),
            )
            .join(Lead, Lead.id == Delivery.lead_id)
            .join(Campaign, Campaign.id == Delivery.campaign_id)
            .outerjoin(Account, Account.id == Lead.account_id)
            .where(id_in(session, Delivery.id, ids))
            .order_by(Delivery.id)
        ).all()
    )


def send_batch(
    engine: Engine,
    now: datetime,
    mailer: Mailer,
    *,
    worker: str,
    limit: int = 200,
    max_attempts: int = 5,
    clock: WallClock = wall_clock,
    budget: Budget | None = None,
    workers: RenderWorkers | None = None,
) -> SendReport:
    """Claim up to ``limit`` due deliveries, send them, and record every outcome.

    With ``workers`` the batch is rendered in those processes, split between them; if one
    of them dies, the batch goes back to the queue (no byte of it was sent) and the error
    is raised.
    """
    ids, rows = _claim_and_load(engine, now, worker, limit, clock(), budget or Budget())
    if not ids:
        return SendReport()
    if workers is None or len(rows) < 2:
        rendered = [compose(mailer, row, now) for row in rows]
    else:
        try:
            rendered = [item for f in workers.submit(rows, now) for item in f.result()]
        except RenderWorkerError:
            _release(engine, ids, worker, now)
            raise
    return _deliver(engine, now, mailer, rows, rendered, max_attempts)


def _envelope_from(bare: str) -> str:
    """MAIL FROM for the configured sender, domain as A-labels when it can be written so."""
    try:
        return envelope_address(bare)
    except ValueError:
        return bare  # the transport or the server names the problem with the address


def _deliver(
    engine: Engine,
    now: datetime,
    mailer: Mailer,
    rows: list[Any],
    rendered: list[Rendered],
    max_attempts: int,
) -> SendReport:
    """Send the rendered messages of claimed ``rows`` and record every outcome.

    The connections record as they go (see :class:`_Recorder`); whatever they could not
    record, and the messages that failed to render, are recorded here at the end.
    """
    report = SendReport(claimed=len(rows))
    emails = {row.id: row.email for row in rows}
    recorder = _Recorder(engine, now, emails, {row.id: row.attempts for row in rows}, max_attempts)
    outgoing: list[Outgoing] = []
    unrendered: list[dict[str, Any]] = []
    for delivery_id, data, error in rendered:
        if data is not None:
            try:
                # The lead keeps the address as typed; the envelope needs A-labels (IDNA).
                recipient = envelope_address(emails[delivery_id])
            except ValueError as exc:
                data, error = None, f"cannot address the envelope: {exc}"
        if data is None:
            unrendered.append(_failed(delivery_id, error or "render failed", now))
            report.failed += 1
            continue
        outgoing.append(
            Outgoing(
                key=delivery_id,
                sender=mailer.envelope_from,
                recipient=recipient,
                data=data,
            )
        )
    results = (
        mailer.sender.send_batch(outgoing, on_group=recorder, group_size=mailer.wire_group)
        if outgoing
        else []
    )
    recorder.finish(results, unrendered)
    report.add(recorder.report)
    return report


@dataclass
class _Plan:
    """The writes for a set of send results, and their counts."""

    sent: list[int] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    bounced: list[SendResult] = field(default_factory=list)
    report: SendReport = field(default_factory=SendReport)


class _Recorder:
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
                plan.updates.append(_failed(res.key, f"SMTP{code}: {res.detail}", now))
                report.failed += 1
                if res.hard_bounce:
                    plan.bounced.append(res)
            elif tries >= self.max_attempts:
                reason = f"gave up after {tries} attempts: {res.code} {res.detail}"
                plan.updates.append(_failed(res.key, reason, now))
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


def _failed(delivery_id: int, error: str, now: datetime) -> dict[str, Any]:
    return {
        "id": delivery_id,
        "status": DeliveryStatus.failed.value,
        "error": error[:2000],
        "updated_at": now,
    }


# -- rendering in a process pool, overlapped with sending -------------------------------


@dataclass
class _Prepared:
    """A claimed chunk whose messages are being rendered; nothing of it was sent yet."""

    ids: list[int]
    rows: list[Any]
    futures: list[Future[list[Rendered]]]

    def rendered(self) -> list[Rendered]:
        out: list[Rendered] = []
        for fut in self.futures:
            out.extend(fut.result())
        return out


def _release(engine: Engine, ids: list[int], worker: str, now: datetime) -> None:
    """Give back claimed rows that never reached the SMTP server: no byte was sent."""
    with session_scope(engine) as session:
        session.execute(
            update(Delivery)
            .where(
                id_in(session, Delivery.id, ids),
                unindexed(Delivery.status) == DeliveryStatus.claimed.value,
                Delivery.claimed_by == worker,
            )
            .values(**_GIVEN_BACK, updated_at=now)
            .execution_options(synchronize_session=False)
        )


def _send_pipelined(
    engine: Engine,
    now: datetime,
    mailer: Mailer,
    pool: RenderWorkers,
    total: SendReport,
    *,
    worker: str,
    chunk: int,
    max_attempts: int,
    clock: WallClock,
    budget: Budget,
    progress: Callable[[SendReport], None] | None,
) -> None:
    """Send chunk k while the pool renders chunk k+1.

    Chunk k+1 is only ``claimed`` while it renders: a crash gives it back to the queue,
    and a clean stop gives it back at once. Its rows become ``sending`` group by group, as
    the connections transmit them (see :func:`_deliver`).
    """

    def prepare() -> _Prepared | None:
        ids, rows = _claim_and_load(engine, now, worker, chunk, clock(), budget)
        if not ids:
            return None
        return _Prepared(ids, rows, pool.submit(rows, now))

    current = prepare()
    upcoming: _Prepared | None = None
    try:
        while current is not None:
            try:
                rendered = current.rendered()
            except RenderWorkerError:
                upcoming, current = current, None  # nothing of it was sent: give it back
                raise
            upcoming = prepare()
            report = _deliver(engine, now, mailer, current.rows, rendered, max_attempts)
            total.add(report)
            if progress is not None:
                progress(total)
            if report.sent == 0 and report.retry == report.claimed:
                break  # the server refuses everything: leave the rest queued for the next tick
            current, upcoming = upcoming, None
    finally:
        if upcoming is not None:
            for fut in upcoming.futures:
                fut.cancel()
            _release(engine, upcoming.ids, worker, now)


class Pacer:
    """Keeps real sending at or under ``per_second`` by sleeping between chunks."""

    def __init__(
        self,
        per_second: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.per_second = per_second
        self.monotonic = monotonic
        self.sleep = sleep
        self.started = monotonic()
        self.count = 0

    def after(self, sent: int) -> None:
        """Account for ``sent`` more messages; sleep if we are ahead of the rate."""
        self.count += sent
        ahead = self.count / self.per_second - (self.monotonic() - self.started)
        if ahead > 0:
            self.sleep(ahead)


def send_due(
    engine: Engine, now: datetime, mailer: Mailer, *, worker: str, **options: Any
) -> SendReport:
    """Send everything due, chunk by chunk, until the outbox (or the tick's budget) is empty.

    Options are those of :func:`_send_due`. While it runs, ``worker`` counts as alive for
    crash recovery in this process.
    """
    _ACTIVE.add(worker)
    try:
        return _send_due(engine, now, mailer, worker=worker, **options)
    finally:
        _ACTIVE.discard(worker)


def _send_due(
    engine: Engine,
    now: datetime,
    mailer: Mailer,
    *,
    worker: str,
    chunk: int = 200,
    max_attempts: int = 5,
    clock: WallClock = wall_clock,
    progress: Callable[[SendReport], None] | None = None,
    throttle: Throttle | None = None,
    pacer: Pacer | None = None,
) -> SendReport:
    """Send everything due, chunk by chunk, until the outbox (or the tick's budget) is empty."""
    total = SendReport()
    total.recovered_unknown = recover_in_flight(engine, worker=worker, clock=clock)
    total.skipped = skip_blocked(engine, now)
    throttle = throttle or Throttle()
    budget = throttle.budget()
    if pacer is None and throttle.per_second is not None:
        pacer = Pacer(throttle.per_second)
    if pacer is not None:
        chunk = min(chunk, max(1, math.ceil(pacer.per_second)))  # pace in small steps
    elif mailer.render_workers > 0 and queued_due_count(engine, now) > chunk:
        # Starting processes costs about 0.3 s of CPU each: only worth it past one chunk.
        pool = RenderWorkers(mailer, mailer.render_workers)
        try:
            _send_pipelined(
                engine,
                now,
                mailer,
                pool,
                total,
                worker=worker,
                chunk=chunk,
                max_attempts=max_attempts,
                clock=clock,
                budget=budget,
                progress=progress,
            )
        finally:
            pool.close()
        return total
    while True:
        report = send_batch(
            engine,
            now,
            mailer,
            worker=worker,
            limit=chunk,
            max_attempts=max_attempts,
            clock=clock,
            budget=budget,
        )
        if not report.claimed:
            break
        total.add(report)
        if pacer is not None:
            pacer.after(report.claimed)
        if progress is not None:
            progress(total)
        if report.sent == 0 and report.retry == report.claimed:
            break  # the server refuses everything: leave the rest queued for the next tick
    return total


def queued_due_count(engine: Engine, now: datetime) -> int:
    """How many deliveries are queued and due."""
    from sqlalchemy import func

    with session_scope(engine) as session:
        return int(
            session.scalar(
                select(func.count(Delivery.id)).where(
                    and_(Delivery.status == DeliveryStatus.queued.value, Delivery.due_at <= at(now))
                )
            )
            or 0
        )


def mailer_from_settings(
    templates_dir: Any = None,
    sender: SmtpSender | None = None,
    *,
    smtp_url: SecretStr | str | None = None,
    from_address: str | None = None,
) -> Mailer:
    """A :class:`Mailer` configured from ``NURTURE_*`` settings.

    Args:
        templates_dir: The templates folder (default: settings).
        sender: A ready SMTP sender; when given, ``smtp_url`` is ignored.
        smtp_url: The SMTP server (a Prefect block's secret, say) instead of
            ``NURTURE_SMTP_URL``.
        from_address: The From header instead of ``NURTURE_FROM``.

    Raises:
        ConfigError: The signing key is unset or the public development key outside
            development (see :meth:`nurture.config.Settings.secret_keys`).
    """

    from nurture.config import get_settings
    from nurture.outbox.smtp_transport import SmtpConfig

    settings = get_settings()
    if sender is None:
        sender = SmtpSender(
            SmtpConfig.from_url(smtp_url if smtp_url is not None else settings.smtp_url),
            connections=settings.smtp_connections,
        )
    from_addr = from_address or settings.from_address
    bare = from_addr.rsplit("<", 1)[-1].rstrip(">").strip()
    return Mailer(
        store=TemplateStore(Path(templates_dir or settings.templates)),
        sender=sender,
        from_address=from_addr,
        envelope_from=_envelope_from(bare),
        secret=settings.secret_keys()[0],
        tracking_url=settings.tracking_url,
        unsubscribe_mailto=f"unsubscribe@{bare.rsplit('@', 1)[-1]}",
        render_workers=settings.render_processes(),
    )
