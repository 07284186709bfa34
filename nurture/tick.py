"""One tick of the nurture loop at an instant ``now``: enroll, advance, send, score, promote.

Each stage is a function over the whole database in batches, so the Prefect flow can run
them as one task per batch and the CLI can run them directly. ``now`` is always injected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from nurture.config import Throttle
from nurture.crm import Connector, load_connector
from nurture.crm.alerts import AlertReport, Notifier, alerts_for
from nurture.crm.promotions import PARK_AFTER, PromotionReport, process_promotions
from nurture.engagement.scoring import score_all
from nurture.journey.pipeline import apply_stage_thresholds, queue_promotions
from nurture.journey.sequences import (
    AdvanceResult,
    CampaignRef,
    advance_due,
    enroll,
    sync_campaigns,
)
from nurture.message.mime import address_domain
from nurture.outbox.delivery import Mailer, Pacer, send_due
from nurture.outbox.record import SendReport
from nurture.spec.programme import Programme
from nurture.spec.schema import CampaignSpec
from nurture.store.db import session_scope


@dataclass
class CampaignTick:
    """What one tick did in one campaign."""

    enrolled: int = 0
    queued: int = 0
    exited: int = 0
    deferred: int = 0
    completed: int = 0
    queued_promotions: int = 0
    by_step: dict[str, int] = field(default_factory=dict)


@dataclass
class TickResult:
    """The counts of one tick, per campaign and in total."""

    now: datetime
    campaigns: dict[str, CampaignTick] = field(default_factory=dict)
    send: SendReport = field(default_factory=SendReport)
    promotions: PromotionReport = field(default_factory=PromotionReport)
    scored: int = 0
    stage_moves: dict[str, int] = field(default_factory=dict)
    alerts: AlertReport = field(default_factory=AlertReport)

    @property
    def enrolled(self) -> int:
        """Leads enrolled across campaigns."""
        return sum(c.enrolled for c in self.campaigns.values())

    def summary(self) -> dict[str, int]:
        """The headline counts printed by ``nurture tick --json``."""
        return {
            "enrolled": self.enrolled,
            "sent": self.send.sent,
            "failed": self.send.failed,
            "promoted": self.promotions.pushed,
        }

    def details(self) -> dict[str, Any]:
        """Everything, JSON-friendly."""
        return {
            **self.summary(),
            "now": self.now.isoformat(),
            "queued": sum(c.queued for c in self.campaigns.values()),
            "retry": self.send.retry,
            "skipped": self.send.skipped,
            "unknown": self.send.unknown + self.send.recovered_unknown,
            "parked": self.promotions.parked,
            "scored": self.scored,
            "campaigns": {k: asdict(v) for k, v in self.campaigns.items()},
        }


def prepare_campaigns(engine: Engine, programme: Programme, now: datetime) -> list[CampaignRef]:
    """Store the programme's campaigns (versioned) and return the active ones."""
    with session_scope(engine) as session:
        return sync_campaigns(session, programme.campaigns, now)


def enroll_campaign(engine: Engine, campaign: CampaignRef, now: datetime) -> int:
    """Enroll matching leads into one campaign."""
    with session_scope(engine) as session:
        return enroll(session, campaign, now)


def connectors_for(
    programme: Programme, overrides: Mapping[str, Connector] | None = None
) -> dict[str, Connector]:
    """One connector instance per connector named by a campaign's promotion rule."""
    names = {c.promote.to.connector for c in programme.campaigns if c.promote}
    out: dict[str, Connector] = dict(overrides or {})
    for name in sorted(names - set(out)):
        out[name] = load_connector(name)
    return out


def tick(
    engine: Engine,
    now: datetime,
    programme: Programme,
    mailer: Mailer,
    *,
    worker: str,
    connectors: Mapping[str, Connector] | None = None,
    batch_size: int = 500,
    progress: Callable[[SendReport], None] | None = None,
    throttle: Throttle | None = None,
    pacer: Pacer | None = None,
    park_after: timedelta = PARK_AFTER,
    notifier: Notifier | None = None,
) -> TickResult:
    """Run one whole tick directly (no Prefect): the CLI and tests use this.

    ``notifier`` delivers the sales alerts of ``pipeline.yaml``; without one they wait.
    """
    result = TickResult(now=now)
    refs = prepare_campaigns(engine, programme, now)
    for ref in refs:
        stats = result.campaigns[ref.name] = CampaignTick()
        stats.enrolled = enroll_campaign(engine, ref, now)
    for ref in refs:
        merge_advance(
            result.campaigns[ref.name],
            advance_due(
                engine, ref, now, batch_size=batch_size, mail_domain=mail_domain(mailer, ref.spec)
            ),
        )
    result.send = send_due(
        engine,
        now,
        mailer,
        worker=worker,
        chunk=batch_size,
        progress=progress,
        throttle=throttle,
        pacer=pacer,
    )
    result.scored = score_all(engine, programme.scoring, now)
    result.stage_moves = apply_stage_thresholds(engine, programme.scoring, programme.pipeline, now)
    for ref in refs:
        result.campaigns[ref.name].queued_promotions = queue_promotions(
            engine, ref, programme.pipeline, now
        )
    result.promotions = process_promotions(
        engine,
        connectors_for(programme, connectors),
        programme.pipeline,
        now,
        park_after=park_after,
    )
    result.alerts = alerts_for(engine, programme.pipeline, programme.scoring, notifier, now)
    return result


def merge_advance(stats: CampaignTick, adv: AdvanceResult) -> None:
    """Fold an :class:`AdvanceResult` into a campaign's tick counts."""
    stats.queued += adv.queued
    stats.exited += adv.exited
    stats.deferred += adv.deferred
    stats.completed += adv.completed
    for step, n in adv.by_step.items():
        stats.by_step[step] = stats.by_step.get(step, 0) + n


def mail_domain(mailer: Mailer, spec: CampaignSpec | None = None) -> str:
    """The domain of the From address a campaign sends as (its ``from:``, else the
    mailer's), used in its Message-IDs."""
    sender = (spec.from_address if spec is not None else None) or mailer.from_address
    return address_domain(sender) or "nurture.local"
