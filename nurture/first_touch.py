"""The first-touch pass: new leads get their first step within minutes, not at the next tick.

Run it every minute (the ``nurture-first-touch`` deployment, or ``nurture tick
--first-touch`` from cron). It enrolls the leads captured (or whose double opt-in was
confirmed) in the last ``lookback`` into every campaign they match, advances only the
enrollments made in that time (so it stays small however big the database), and sends
what is due. Older leads that start to match (a stage change, an attribute) are enrolled
by the regular tick. It is the
regular machinery, so its rules hold: one delivery row per (enrollment, step) under a
unique key, claims before sends, suppression and exit rules checked before every send,
and a lead captured outside its send window is deferred to the window's opening like
any other. A web form capture, a CRM intake or an import all show up as new lead rows,
so all benefit (a CRM record is captured when the CRM created it: one pulled more than
``lookback`` later waits for the tick).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine

from nurture.journey.sequences import advance_due
from nurture.outbox.delivery import Mailer, send_due
from nurture.outbox.record import SendReport
from nurture.spec.programme import Programme
from nurture.tick import (
    CampaignTick,
    enroll_campaign,
    mail_domain,
    merge_advance,
    prepare_campaigns,
)

__all__ = ["LOOKBACK", "FirstTouchResult", "first_touch"]

#: How far back the pass looks for new enrollments; the regular tick covers the rest.
LOOKBACK = timedelta(hours=1)


@dataclass
class FirstTouchResult:
    """What one first-touch pass did."""

    now: datetime
    campaigns: dict[str, CampaignTick] = field(default_factory=dict)
    send: SendReport = field(default_factory=SendReport)

    @property
    def enrolled(self) -> int:
        """Leads enrolled across campaigns."""
        return sum(c.enrolled for c in self.campaigns.values())


def first_touch(
    engine: Engine,
    now: datetime,
    programme: Programme,
    mailer: Mailer,
    *,
    worker: str,
    lookback: timedelta = LOOKBACK,
    batch_size: int = 500,
) -> FirstTouchResult:
    """Enroll, advance the new enrollments, and send what is due, at ``now``."""
    result = FirstTouchResult(now=now)
    refs = prepare_campaigns(engine, programme, now)
    since = now - lookback
    for ref in refs:
        stats = result.campaigns[ref.name] = CampaignTick()
        stats.enrolled = enroll_campaign(engine, ref, now, created_since=since)
    for ref in refs:
        merge_advance(
            result.campaigns[ref.name],
            advance_due(
                engine,
                ref,
                now,
                batch_size=batch_size,
                mail_domain=mail_domain(mailer, ref.spec),
                enrolled_since=since,
            ),
        )
    result.send = send_due(engine, now, mailer, worker=worker, chunk=batch_size)
    return result
