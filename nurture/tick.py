"""One tick of the nurture loop at an instant ``now``: enroll, advance, send, score, promote.

Each stage is a function over the whole database in batches. :func:`tick` holds the one
stage order; the CLI runs it directly and the Prefect flow runs the same function with
task-backed :class:`~nurture.steps.Steps`. ``now`` is always injected.
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
from nurture.journey.pauses import held_reasons
from nurture.journey.pipeline import apply_stage_thresholds, queue_promotions
from nurture.journey.sequences import (
    AdvanceResult,
    CampaignRef,
    advance_due,
    enroll,
    sync_campaigns,
)
from nurture.message.mime import address_domain
from nurture.message.sources import template_sources
from nurture.outbox.delivery import Mailer, Pacer, send_due
from nurture.outbox.record import SendReport
from nurture.privacy.erasure import DeletionReport, process_crm_deletions
from nurture.privacy.opt_in import ConfirmationReport, opt_in_stage
from nurture.spec.programme import Programme
from nurture.spec.schema import CampaignSpec
from nurture.steps import DIRECT, Steps
from nurture.store.consent import sync_topics
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
    crm_deletions: DeletionReport = field(default_factory=DeletionReport)
    confirmations: ConfirmationReport = field(default_factory=ConfirmationReport)
    scored: int = 0
    stage_moves: dict[str, int] = field(default_factory=dict)
    # Campaigns whose mail this tick held back, with why (paused, or past stop_at).
    held: dict[str, str] = field(default_factory=dict)
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
            "held": dict(self.held),
            "campaigns": {k: asdict(v) for k, v in self.campaigns.items()},
        }


def held_campaigns(engine: Engine, programme: Programme, now: datetime) -> dict[str, str]:
    """The programme's campaigns held at ``now`` (paused or stopped), with why."""
    with session_scope(engine) as session:
        return held_reasons(session, programme.campaigns, now)


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
    steps: Steps = DIRECT,
    notifier: Notifier | None = None,
) -> TickResult:
    """Run one tick at ``now``: the stage order, written once.

    1. store the programme's campaigns (versioned) once, and enroll matching leads;
    2. advance due enrollments and queue their deliveries (the outbox);
    3. send what is due (:func:`nurture.outbox.delivery.send_due`);
    4. score every lead and move leads across stage thresholds;
    5. queue newly qualified leads for promotion and push the promotion queue;
    6. send the sales alerts of ``pipeline.yaml`` through ``notifier`` (without one they
       wait in their outbox).

    The CLI runs it with the default ``steps`` (plain calls); the ``nurture_tick`` flow
    passes steps that make each stage a Prefect task (see :mod:`nurture.steps`).
    """
    result = TickResult(now=now)
    refs = steps.stage("sync", prepare_campaigns, engine, programme, now)
    result.held = steps.stage("held", held_campaigns, engine, programme, now)
    for name, n in steps.stage("enroll", _enroll_all, engine, refs, now).items():
        result.campaigns[name] = CampaignTick(enrolled=n)
    domains = {ref.name: mail_domain(mailer, ref.spec) for ref in refs}
    for name, adv in steps.stage(
        "advance", _advance_all, engine, refs, now, batch_size, domains
    ).items():
        merge_advance(result.campaigns[name], adv)
    result.send = send_due(
        engine,
        now,
        mailer,
        worker=worker,
        chunk=batch_size,
        progress=progress,
        throttle=throttle,
        pacer=pacer,
        steps=steps,
    )
    result.confirmations = steps.stage(
        "double-opt-in", opt_in_stage, engine, programme.consent, mailer, now, worker=worker
    )
    result.scored = steps.stage("score", score_all, engine, programme.scoring, now)
    result.stage_moves = steps.stage(
        "stages", apply_stage_thresholds, engine, programme.scoring, programme.pipeline, now
    )
    queued = steps.stage("queue-promotions", _queue_all, engine, refs, programme, now)
    for name, n in queued.items():
        result.campaigns[name].queued_promotions = n
    crms = connectors_for(programme, connectors)
    result.promotions = steps.stage(
        "promote", process_promotions, engine, crms, programme.pipeline, now, park_after=park_after
    )
    result.crm_deletions = steps.stage(
        "crm-deletions", process_crm_deletions, engine, crms, now, park_after=park_after
    )
    result.alerts = steps.stage(
        "alerts", alerts_for, engine, programme.pipeline, programme.scoring, notifier, now
    )
    return result


def prepare_campaigns(engine: Engine, programme: Programme, now: datetime) -> list[CampaignRef]:
    """Store the programme's campaigns (versioned, with their template sources) and return
    the active ones."""
    sources = {
        c.name: template_sources(programme.templates, c.templates()) for c in programme.campaigns
    }
    with session_scope(engine) as session:
        sync_topics(session, programme.consent)
        return sync_campaigns(session, programme.campaigns, now, sources)


def enroll_campaign(
    engine: Engine, campaign: CampaignRef, now: datetime, created_since: datetime | None = None
) -> int:
    """Enroll matching leads (captured since ``created_since``) into one campaign (one
    statement)."""
    with session_scope(engine) as session:
        return enroll(session, campaign, now, created_since=created_since)


def _enroll_all(engine: Engine, refs: list[CampaignRef], now: datetime) -> dict[str, int]:
    """Enroll matching leads into each campaign."""
    return {ref.name: enroll_campaign(engine, ref, now) for ref in refs}


def _advance_all(
    engine: Engine,
    refs: list[CampaignRef],
    now: datetime,
    batch_size: int,
    domains: Mapping[str, str],
) -> dict[str, AdvanceResult]:
    """Move due enrollments forward and queue their deliveries, campaign by campaign.

    Each batch of due enrollments is its own transaction, so a retry resumes where a
    failed attempt stopped and never queues a step twice (the outbox key is unique).
    """
    return {
        ref.name: advance_due(
            engine, ref, now, batch_size=batch_size, mail_domain=domains[ref.name]
        )
        for ref in refs
    }


def _queue_all(
    engine: Engine, refs: list[CampaignRef], programme: Programme, now: datetime
) -> dict[str, int]:
    """Queue every lead that meets its campaign's promotion rule, once each."""
    return {ref.name: queue_promotions(engine, ref, programme.pipeline, now) for ref in refs}


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
