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
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import (
    Engine,
)

from nurture.config import Throttle
from nurture.message.compose import Rendered, compose
from nurture.message.mime import address_domain, envelope_address, split_address
from nurture.message.rendering import TemplateStore
from nurture.outbox.claim import Budget, claim_and_load, queued_due_count, skip_blocked
from nurture.outbox.record import Recorder, SendReport, failed_row
from nurture.outbox.recovery import WallClock, recover_in_flight, sending_as, wall_clock
from nurture.outbox.smtp_transport import Outgoing, SmtpSender
from nurture.steps import DIRECT, Steps


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
    # Compose from skeletons (nurture.message.skeleton); False renders every message in full.
    skeletons: bool = True
    # Messages each SMTP connection marks `sending` at a time: the crash window per
    # connection (one committed transaction per group).
    wire_group: int = 8


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

    The connections record as they go (see :class:`Recorder`); whatever they could not
    record, and the messages that failed to render, are recorded here at the end.
    """
    report = SendReport(claimed=len(rows))
    emails = {row.id: row.email for row in rows}
    recorder = Recorder(engine, now, emails, {row.id: row.attempts for row in rows}, max_attempts)
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
            unrendered.append(failed_row(delivery_id, error or "render failed", now))
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


# -- the send loop -----------------------------------------------------------------------


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
    steps: Steps = DIRECT,
) -> SendReport:
    """Send everything due, chunk by chunk, until the outbox (or the tick's budget) is empty.

    The one send loop, for the CLI and the flow alike. First a dead claimant's rows are
    recovered (its ``claimed`` rows go back to the queue, its ``sending`` rows become
    ``unknown``) and suppressed or exited rows are skipped. Then each chunk is claimed,
    rendered and sent through ``steps.send``. The loop stops early when the server refuses
    a whole chunk (the rest waits in the queue for the next tick). While it runs,
    ``worker`` counts as alive for crash recovery in this process.
    """
    with sending_as(worker):
        total = SendReport()
        total.recovered_unknown = steps.stage(
            "recover", recover_in_flight, engine, worker=worker, clock=clock
        )
        total.skipped = steps.stage("skip", skip_blocked, engine, now)
        total.due = queued_due_count(engine, now)
        throttle = throttle or Throttle()
        if pacer is None and throttle.per_second is not None:
            pacer = Pacer(throttle.per_second)
        if pacer is not None:
            chunk = min(chunk, max(1, math.ceil(pacer.per_second)))  # pace in small steps
        _send_chunks(
            engine,
            now,
            mailer,
            total,
            _Loop(worker, chunk, max_attempts, clock, Budget.for_tick(throttle), pacer),
            progress,
            steps,
        )
        return total


@dataclass
class _Loop:
    """The send loop's settings for one tick."""

    worker: str
    chunk: int
    max_attempts: int
    clock: WallClock
    budget: Budget
    pacer: Pacer | None


def _send_chunks(
    engine: Engine,
    now: datetime,
    mailer: Mailer,
    total: SendReport,
    loop: _Loop,
    progress: Callable[[SendReport], None] | None,
    steps: Steps,
) -> None:
    """Claim, render and send chunk after chunk (see :func:`send_due`)."""
    while True:
        ids, rows = claim_and_load(engine, now, loop.worker, loop.chunk, loop.clock(), loop.budget)
        if not ids:
            return
        rendered = [compose(mailer, row, now) for row in rows]
        report = steps.send(
            partial(_deliver, engine, now, mailer, rows, rendered, loop.max_attempts)
        )
        total.add(report)
        if progress is not None:
            progress(total)
        if loop.pacer is not None:
            loop.pacer.after(report.claimed)
        if report.sent == 0 and report.retry == report.claimed:
            return  # the server refuses everything: leave the rest queued for the next tick


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
    try:
        bare = split_address(from_addr)[1]
    except ValueError:
        bare = from_addr.strip()  # the transport or the server names the problem
    return Mailer(
        store=TemplateStore(Path(templates_dir or settings.templates)),
        sender=sender,
        from_address=from_addr,
        envelope_from=_envelope_from(bare),
        secret=settings.secret_keys()[0],
        tracking_url=settings.tracking_url,
        unsubscribe_mailto=f"unsubscribe@{address_domain(from_addr) or 'localhost'}",
        skeletons=settings.skeletons,
    )
