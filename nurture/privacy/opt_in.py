"""Double opt-in, the tick's side: each pending signup gets one confirmation email.

:func:`send_confirmations` sends each pending opt-in (written at the edge by
:mod:`nurture.engagement.capture`) exactly one confirmation email with a signed link, with
the outbox's crash guarantees;
:func:`expire_opt_ins` purges or keeps (never mailed) the leads still unconfirmed after
``unconfirmed.after``. :func:`opt_in_stage` is both, as one stage of the tick.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from nurture.engagement.capture import confirm_token
from nurture.message.mime import build_message, format_address, split_address
from nurture.message.rendering import RenderedEmail
from nurture.outbox.delivery import Mailer
from nurture.outbox.recovery import WallClock, dead_claimants, sending_as, wall_clock
from nurture.outbox.smtp_transport import Outcome, Outgoing, SendResult
from nurture.spec.consent import ConsentSpec
from nurture.store.db import session_scope
from nurture.store.models import (
    Consent,
    Event,
    Lead,
    OptIn,
    ScoreSnapshot,
    StageTransition,
    Suppression,
)
from nurture.store.sql import affected

# The confirmation email's states (``OptIn.confirmation_state``); NULL means due.
CLAIMED, SENDING, SENT, FAILED, UNKNOWN = "claimed", "sending", "sent", "failed", "unknown"


@dataclass
class ConfirmationReport:
    """What one pass of :func:`send_confirmations` did."""

    sent: int = 0
    retry: int = 0
    failed: int = 0
    unknown: int = 0  # on the wire when an earlier sender died: never resent
    purged: int = 0
    errors: list[str] = field(default_factory=list)


def send_confirmations(
    engine: Engine,
    now: datetime,
    mailer: Mailer,
    *,
    worker: str,
    limit: int = 500,
    lease: timedelta = timedelta(minutes=15),
    clock: WallClock = wall_clock,
) -> ConfirmationReport:
    """Send each pending double opt-in its one confirmation email, exactly once.

    The confirmation has the outbox's guarantees: rows are claimed (``claimed``), marked
    ``sending`` just before their bytes go on the wire, and recorded as their results come
    back. A sender that dies gives its ``claimed`` rows back to the next tick; only its
    ``sending`` rows (maybe delivered) become ``unknown`` and are never resent. A temporary
    SMTP failure leaves the row due for the next tick; a permanent one marks it ``failed``.
    """
    report = ConfirmationReport(unknown=_recover(engine, worker, lease, clock()))
    _, from_addr = split_address(mailer.from_address)
    domain = from_addr.rsplit("@", 1)[1]

    def on_group(done: list[SendResult], upcoming: list[int]) -> None:
        with session_scope(engine) as session:
            _record(session, done, now)
            if upcoming:
                session.execute(
                    update(OptIn)
                    .where(OptIn.lead_id.in_(upcoming), OptIn.claimed_by == worker)
                    .values(confirmation_state=SENDING)
                    .execution_options(synchronize_session=False)
                )

    # From the claim on, this worker counts as alive for the recovery of other ticks.
    with sending_as(worker):
        pending = _claim(engine, worker, limit, clock())
        messages = [_message(mailer, *row, now, domain) for row in pending]
        results = mailer.sender.send_batch(
            messages, on_group=on_group, group_size=mailer.wire_group
        )
        with session_scope(engine) as session:
            _record(session, results, now)
    for res in results:
        if res.outcome == Outcome.sent:
            report.sent += 1
        elif res.outcome == Outcome.retry_later:
            report.retry += 1
        else:
            report.failed += 1
            report.errors.append(f"lead {res.key}: {res.detail}")
    return report


def _recover(engine: Engine, worker: str, lease: timedelta, wall: datetime) -> int:
    """Give a dead sender's ``claimed`` rows back; its ``sending`` rows become ``unknown``."""
    with session_scope(engine) as session:
        claims = session.execute(
            select(OptIn.claimed_by, OptIn.claimed_at)
            .where(OptIn.confirmation_state.in_((CLAIMED, SENDING)))
            .distinct()
        ).all()
        dead = dead_claimants(claims, worker=worker, lease=lease, wall=wall)
        if not dead:
            return 0
        session.execute(
            update(OptIn)
            .where(OptIn.confirmation_state == CLAIMED, OptIn.claimed_by.in_(dead))
            .values(confirmation_state=None, claimed_by=None, claimed_at=None)
            .execution_options(synchronize_session=False)
        )
        return affected(
            session.execute(
                update(OptIn)
                .where(OptIn.confirmation_state == SENDING, OptIn.claimed_by.in_(dead))
                .values(confirmation_state=UNKNOWN)
                .execution_options(synchronize_session=False)
            )
        )


def _claim(
    engine: Engine, worker: str, limit: int, wall: datetime
) -> list[tuple[int, str, str | None]]:
    """Claim up to ``limit`` due confirmations for ``worker``: (lead id, email, first name)."""
    with session_scope(engine) as session:
        due = session.execute(
            select(OptIn.lead_id, Lead.email, Lead.first_name)
            .join(Lead, Lead.id == OptIn.lead_id)
            .where(
                OptIn.confirmation_state.is_(None),
                OptIn.confirmed_at.is_(None),
                ~select(Suppression.id).where(Suppression.email == Lead.email).exists(),
            )
            .order_by(OptIn.requested_at)
            .limit(limit)
        ).all()
        if not due:
            return []
        claimed = set(
            session.scalars(
                update(OptIn)
                .where(
                    OptIn.lead_id.in_([row.lead_id for row in due]),
                    OptIn.confirmation_state.is_(None),
                )
                .values(confirmation_state=CLAIMED, claimed_by=worker, claimed_at=wall)
                .returning(OptIn.lead_id)
                .execution_options(synchronize_session=False)
            )
        )
    return [(row.lead_id, row.email, row.first_name) for row in due if row.lead_id in claimed]


def _message(
    mailer: Mailer, lead_id: int, email: str, first_name: str | None, now: datetime, domain: str
) -> Outgoing:
    """The confirmation email with its signed link."""
    token = confirm_token(lead_id, mailer.secret, now)
    url = f"{mailer.tracking_url.rstrip('/')}/confirm/{token}"
    hello = f"Hi {first_name}," if first_name else "Hello,"
    text = (
        f"{hello}\n\nplease confirm that you want to hear from us:\n\n{url}\n\n"
        "If you did not sign up, ignore this email: you will get nothing more from us.\n"
    )
    body = (
        f"<p>{html.escape(hello)}</p><p>Please confirm that you want to hear from us:</p>"
        f'<p><a href="{html.escape(url)}">Yes, confirm my subscription</a></p>'
        "<p>If you did not sign up, ignore this email: you will get nothing more from us.</p>"
    )
    data = build_message(
        RenderedEmail("Please confirm your subscription", body, text),
        from_addr=mailer.from_address,
        to_addr=format_address(None, email),
        message_id=f"<opt-in.{lead_id}.{int(now.timestamp())}@{domain}>",
        unsubscribe_url=url,
        date=now,
    )
    return Outgoing(lead_id, mailer.envelope_from, email, data)


def _record(session: Session, results: list[SendResult], now: datetime) -> None:
    """Record SMTP results: sent, failed (permanent), or due again (nothing went out)."""
    by_state: dict[str | None, list[int]] = {}
    for res in results:
        state = {Outcome.sent: SENT, Outcome.retry_later: None}.get(res.outcome, FAILED)
        by_state.setdefault(state, []).append(res.key)
    for state, ids in by_state.items():
        values: dict[str, Any] = {"confirmation_state": state}
        if state is None:
            values.update(claimed_by=None, claimed_at=None)
        else:
            values["confirmation_sent_at"] = now
        session.execute(
            update(OptIn)
            .where(OptIn.lead_id.in_(ids), OptIn.confirmation_state.in_((CLAIMED, SENDING)))
            .values(**values)
            .execution_options(synchronize_session=False)
        )


def expire_opt_ins(engine: Engine, spec: ConsentSpec, now: datetime) -> int:
    """Purge the leads still unconfirmed after ``unconfirmed.after`` (``action: purge``).

    With ``keep`` they stay, never mailed. Purged leads had nothing but the signup: the
    lead, its events and the opt-in go, and no suppression is kept (they may sign up again).
    Only leads the opt-in holds (created by the signup) are purged.
    """
    if spec.unconfirmed.action != "purge":
        return 0
    cutoff = now - spec.unconfirmed.after
    with session_scope(engine) as session:
        ids = list(
            session.scalars(
                select(OptIn.lead_id).where(
                    OptIn.confirmed_at.is_(None),
                    OptIn.holds.is_(True),
                    OptIn.requested_at < cutoff,
                )
            )
        )
        if not ids:
            return 0
        session.execute(delete(OptIn).where(OptIn.lead_id.in_(ids)))
        session.execute(delete(Event).where(Event.lead_id.in_(ids)))
        for model in (Consent, ScoreSnapshot, StageTransition):
            session.execute(delete(model).where(model.lead_id.in_(ids)))
        session.execute(delete(Lead).where(Lead.id.in_(ids)))
    return len(ids)


def opt_in_stage(
    engine: Engine, spec: ConsentSpec, mailer: Mailer, now: datetime, *, worker: str
) -> ConfirmationReport:
    """The tick's double opt-in stage: send pending confirmations, purge expired signups."""
    report = send_confirmations(engine, now, mailer, worker=worker)
    report.purged = expire_opt_ins(engine, spec, now)
    return report
