"""Double opt-in, the tick's side: each pending signup gets one confirmation email.

:func:`send_confirmations` sends each pending opt-in (written at the edge by
:mod:`nurture.engagement.capture`) exactly one confirmation email with a signed link;
:func:`expire_opt_ins` purges or keeps (never mailed) the leads still unconfirmed after
``unconfirmed.after``. :func:`opt_in_stage` is both, as one stage of the tick.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, delete, select, update

from nurture.engagement.capture import confirm_token
from nurture.message.mime import build_message, format_address, split_address
from nurture.message.rendering import RenderedEmail
from nurture.outbox.delivery import Mailer
from nurture.outbox.smtp_transport import Outcome, Outgoing
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


@dataclass
class ConfirmationReport:
    """What one pass of :func:`send_confirmations` did."""

    sent: int = 0
    retry: int = 0
    failed: int = 0
    purged: int = 0
    errors: list[str] = field(default_factory=list)


def send_confirmations(
    engine: Engine, now: datetime, mailer: Mailer, *, limit: int = 500
) -> ConfirmationReport:
    """Send each pending double opt-in its one confirmation email.

    A row is marked sent (``confirmation_sent_at``) in its own transaction before the SMTP
    transaction, so no crash or retry can send it twice. A temporary SMTP failure clears
    the mark for the next tick; a permanent one keeps it (the address does not take mail).
    """
    report = ConfirmationReport()
    with session_scope(engine) as session:
        pending = session.execute(
            select(OptIn.lead_id, Lead.email, Lead.first_name)
            .join(Lead, Lead.id == OptIn.lead_id)
            .where(
                OptIn.confirmation_sent_at.is_(None),
                OptIn.confirmed_at.is_(None),
                ~select(Suppression.id).where(Suppression.email == Lead.email).exists(),
            )
            .order_by(OptIn.requested_at)
            .limit(limit)
        ).all()
        if not pending:
            return report
        claimed = set(
            session.scalars(
                update(OptIn)
                .where(
                    OptIn.lead_id.in_([p.lead_id for p in pending]),
                    OptIn.confirmation_sent_at.is_(None),
                )
                .values(confirmation_sent_at=now)
                .returning(OptIn.lead_id)
                .execution_options(synchronize_session=False)
            )
        )
    _, from_addr = split_address(mailer.from_address)
    domain = from_addr.rsplit("@", 1)[1]
    messages = []
    for p in pending:
        if p.lead_id not in claimed:
            continue
        token = confirm_token(p.lead_id, mailer.secret, now)
        url = f"{mailer.tracking_url.rstrip('/')}/confirm/{token}"
        hello = f"Hi {p.first_name}," if p.first_name else "Hello,"
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
            to_addr=format_address(None, p.email),
            message_id=f"<opt-in.{p.lead_id}.{int(now.timestamp())}@{domain}>",
            unsubscribe_url=url,
            date=now,
        )
        messages.append(Outgoing(p.lead_id, mailer.envelope_from, p.email, data))
    results = mailer.sender.send_batch(messages)
    retry = []
    for res in results:
        if res.outcome == Outcome.sent:
            report.sent += 1
        elif res.outcome == Outcome.retry_later:  # nothing went out: the next tick tries
            report.retry += 1
            retry.append(res.key)
        else:
            report.failed += 1
            report.errors.append(f"lead {res.key}: {res.detail}")
    if retry:
        with session_scope(engine) as session:
            session.execute(
                update(OptIn)
                .where(OptIn.lead_id.in_(retry))
                .values(confirmation_sent_at=None)
                .execution_options(synchronize_session=False)
            )
    return report


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
    engine: Engine, spec: ConsentSpec, mailer: Mailer, now: datetime
) -> ConfirmationReport:
    """The tick's double opt-in stage: send pending confirmations, purge expired signups."""
    report = send_confirmations(engine, now, mailer)
    report.purged = expire_opt_ins(engine, spec, now)
    return report
