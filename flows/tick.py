"""The ``nurture_tick`` flow: one tick as a handful of batch tasks, never a task per lead.

Concurrent ticks (several workers on PostgreSQL) are safe: due enrollments and queued
deliveries are claimed with ``FOR UPDATE SKIP LOCKED``, so each batch belongs to one run.
Every send batch holds one slot of the ``smtp`` global concurrency limit, so all runs
together respect the mail provider's connection limit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from nurture.crm.promotions import PromotionReport, process_promotions
from nurture.flows.alerts import notifier
from nurture.flows.artifacts import SendProgress, publish_tick
from nurture.flows.limits import SMTP_LIMIT, LimitedConnector, crm_limit, slot
from nurture.flows.runtime import engine_for, mailer_for, parse_now, programme_for
from nurture.outbox.claim import Budget, queued_due_count, skip_blocked
from nurture.outbox.record import SendReport
from nurture.outbox.recovery import recover_in_flight
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from nurture.config import get_settings
from nurture.crm.alerts import AlertReport, alerts_for
from nurture.engagement.scoring import score_all
from nurture.journey.pipeline import apply_stage_thresholds, queue_promotions
from nurture.journey.sequences import advance_due, worker_id
from nurture.message.render_workers import RenderWorkers
from nurture.outbox.delivery import Pacer, send_batch
from nurture.tick import (
    CampaignTick,
    TickResult,
    connectors_for,
    enroll_campaign,
    mail_domain,
    merge_advance,
    prepare_campaigns,
)

WORKER = worker_id()


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, timeout_seconds=900)
def enroll_task(
    db: str | None, campaigns: str | None, templates: str | None, now: str
) -> dict[str, int]:
    """Store the campaigns and enroll matching leads into each (one statement per campaign)."""
    engine, at = engine_for(db), parse_now(now)
    refs = prepare_campaigns(engine, programme_for(campaigns, templates), at)
    return {ref.name: enroll_campaign(engine, ref, at) for ref in refs}


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, timeout_seconds=1800)
def advance_task(
    db: str | None,
    campaigns: str | None,
    templates: str | None,
    now: str,
    batch_size: int,
    smtp_block: str | None = None,
) -> dict[str, Any]:
    """Move due enrollments forward and queue their deliveries, campaign by campaign.

    Each batch of due enrollments is its own transaction, so a retry resumes where the
    failed attempt stopped and never queues a step twice (the outbox key is unique).
    """
    engine, at = engine_for(db), parse_now(now)
    programme = programme_for(campaigns, templates)
    refs = prepare_campaigns(engine, programme, at)
    mailer = mailer_for(templates, smtp_block)
    out: dict[str, Any] = {}
    for ref in refs:
        stats = CampaignTick()
        domain = mail_domain(mailer, ref.spec)
        merge_advance(
            stats, advance_due(engine, ref, at, batch_size=batch_size, mail_domain=domain)
        )
        out[ref.name] = stats
    return out


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, timeout_seconds=300)
def recover_task(db: str | None, now: str) -> tuple[int, int, int]:
    """Mark deliveries orphaned by a dead sender ``unknown``; skip suppressed ones.

    Returns (recovered as unknown, skipped, queued and due now).
    """
    engine, at = engine_for(db), parse_now(now)
    unknown = recover_in_flight(engine, worker=WORKER)
    skipped = skip_blocked(engine, at)
    return unknown, skipped, queued_due_count(engine, at)


# No task-level retry: a batch that fails half way has rows in ``sending`` that must become
# ``unknown`` (never resent). Retryable SMTP failures are retried inside, message by message,
# and the rest wait in the outbox for the next batch or tick.
@task(cache_policy=NONE, timeout_seconds=1800)
def send_task(
    db: str | None,
    templates: str | None,
    now: str,
    batch_size: int,
    budget: Budget,
    smtp_block: str | None = None,
    smtp_limit: str | None = SMTP_LIMIT,
    workers: RenderWorkers | None = None,
) -> SendReport:
    """Claim and send one batch of due deliveries, holding one ``smtp`` slot.

    ``workers``: render processes kept for the whole send loop of the flow run.
    """
    with slot(smtp_limit):
        return send_batch(
            engine_for(db),
            parse_now(now),
            mailer_for(templates, smtp_block),
            worker=WORKER,
            limit=batch_size,
            budget=budget,
            workers=workers,
        )


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, timeout_seconds=1800)
def score_task(
    db: str | None, campaigns: str | None, templates: str | None, now: str
) -> dict[str, Any]:
    """Score every lead and apply stage thresholds, set-based."""
    engine, at = engine_for(db), parse_now(now)
    programme = programme_for(campaigns, templates)
    scored = score_all(engine, programme.scoring, at)
    moves = apply_stage_thresholds(engine, programme.scoring, programme.pipeline, at)
    return {"scored": scored, "moves": moves}


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, timeout_seconds=1800)
def promote_task(
    db: str | None,
    campaigns: str | None,
    templates: str | None,
    now: str,
    crm_limits: bool = True,
) -> tuple[dict[str, int], PromotionReport, AlertReport]:
    """Queue newly qualified leads and push the promotion queue through the connectors,
    then send the sales alerts of ``pipeline.yaml`` (none configured: nothing to do).

    Each push batch holds one slot of its CRM's ``crm-<connector>`` limit.
    """
    engine, at = engine_for(db), parse_now(now)
    programme = programme_for(campaigns, templates)
    refs = prepare_campaigns(engine, programme, at)
    queued = {ref.name: queue_promotions(engine, ref, programme.pipeline, at) for ref in refs}
    connectors: dict[str, Any] = {
        name: LimitedConnector(conn, crm_limit(name) if crm_limits else None)
        for name, conn in connectors_for(programme).items()
    }
    report = process_promotions(
        engine, connectors, programme.pipeline, at, park_after=get_settings().crm_park_after
    )
    alerts = alerts_for(
        engine,
        programme.pipeline,
        programme.scoring,
        notifier() if programme.pipeline.alerts else None,
        at,
    )
    return queued, report, alerts


def run_tick(
    now: datetime,
    *,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    batch_size: int = 500,
    smtp_block: str | None = None,
    limits: bool = False,
    progress: bool = False,
) -> TickResult:
    """Run one tick as tasks inside the current flow run.

    Args:
        now: The tick's instant.
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: Campaign YAML folder (default: ``NURTURE_CAMPAIGNS``).
        templates_dir: Templates folder (default: ``NURTURE_TEMPLATES``).
        batch_size: Leads per batch task.
        smtp_block: A :class:`nurture.flows.blocks.NurtureSmtp` block name (default: settings).
        limits: Hold the ``smtp`` and ``crm-<name>`` global concurrency limits per batch.
        progress: Show a progress artifact when the send takes more than one batch.
    """
    iso = now.isoformat()
    db, cdir, tdir = database_url, campaigns_dir, templates_dir
    logger = get_run_logger()
    result = TickResult(now=now)
    for name, n in enroll_task(db, cdir, tdir, iso).items():
        result.campaigns.setdefault(name, CampaignTick()).enrolled = n
    for name, stats in advance_task(db, cdir, tdir, iso, batch_size, smtp_block).items():
        stats.enrolled = result.campaigns.get(name, CampaignTick()).enrolled
        result.campaigns[name] = stats
    logger.info(
        "enrolled %d, queued %d messages, exited %d, deferred %d, completed %d",
        result.enrolled,
        sum(c.queued for c in result.campaigns.values()),
        sum(c.exited for c in result.campaigns.values()),
        sum(c.deferred for c in result.campaigns.values()),
        sum(c.completed for c in result.campaigns.values()),
    )
    unknown, skipped, due = recover_task(db, iso)
    result.send.recovered_unknown, result.send.skipped = unknown, skipped
    throttle = get_settings().throttle()
    budget = throttle.budget()
    pacer = Pacer(throttle.per_second) if throttle.per_second else None
    bar = (
        SendProgress(due, f"Sending {due} due messages at {iso}")
        if progress and due > batch_size
        else None
    )
    smtp_limit = SMTP_LIMIT if limits else None
    # More than one batch due: render each batch in worker processes (started once here,
    # about 0.3 s of CPU each), so rendering is not bound to this process's one core.
    processes = get_settings().render_processes()
    workers = (
        RenderWorkers(mailer_for(tdir, smtp_block), processes)
        if processes and due > batch_size
        else None
    )
    try:
        while True:
            report = send_task(db, tdir, iso, batch_size, budget, smtp_block, smtp_limit, workers)
            if not report.claimed:
                break
            result.send.add(report)
            if bar is not None:
                bar.batch(report.claimed)
            if pacer is not None:
                pacer.after(report.claimed)
            if report.sent == 0 and report.retry == report.claimed:
                break
    finally:
        if workers is not None:
            workers.close()
    if bar is not None:
        bar.finish()
    send = result.send
    logger.info(
        "sent %d of %d due, failed %d, retry later %d, unknown %d, skipped %d",
        send.sent,
        due,
        send.failed,
        send.retry,
        send.unknown + send.recovered_unknown,
        send.skipped,
    )
    scored = score_task(db, cdir, tdir, iso)
    result.scored, result.stage_moves = scored["scored"], scored["moves"]
    queued, result.promotions, result.alerts = promote_task(db, cdir, tdir, iso, limits)
    for name, n in queued.items():
        result.campaigns.setdefault(name, CampaignTick()).queued_promotions = n
    promo = result.promotions
    logger.info(
        "scored %d leads; promotions queued %d, pushed %d, retry %d, parked %d",
        result.scored,
        sum(queued.values()),
        promo.pushed,
        promo.retry,
        promo.parked,
    )
    return result


@flow(name="nurture_tick", log_prints=False, timeout_seconds=3 * 3600)
def nurture_tick(
    now: str | None = None,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    batch_size: int = 500,
    smtp_block: str | None = None,
    concurrency_limits: bool = True,
    artifacts: bool = True,
) -> dict[str, Any]:
    """One tick of the nurture loop: enroll, advance, send, score, promote.

    Args:
        now: ISO 8601 instant of the tick (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: Campaign YAML folder (default: ``NURTURE_CAMPAIGNS``).
        templates_dir: Templates folder (default: ``NURTURE_TEMPLATES``).
        batch_size: Leads per batch task (500 to 1,000 keeps Prefect's overhead small).
        smtp_block: Name of a ``nurture-smtp`` block; when empty, ``NURTURE_SMTP_URL``.
        concurrency_limits: Hold the ``smtp`` / ``crm-<name>`` global limits per batch.
        artifacts: Publish the tick's table, health summary and send progress.

    Raises:
        ConfigError: ``NURTURE_SECRET_KEY`` is unset or the public development key outside
            ``NURTURE_ENV=development``: the run fails before it enrolls or sends anything.
    """
    get_settings().secret_keys()
    result = run_tick(
        parse_now(now),
        database_url=database_url,
        campaigns_dir=campaigns_dir,
        templates_dir=templates_dir,
        batch_size=batch_size,
        smtp_block=smtp_block,
        limits=concurrency_limits,
        progress=artifacts,
    )
    if artifacts:
        publish_tick(result)
    logger = get_run_logger()
    logger.info("tick %s: %s", result.now.isoformat(), result.summary())
    return result.details()
