"""The ``nurture_tick`` flow: one tick as a handful of batch tasks, never a task per lead."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.runtime import engine_for, mailer_for, parse_now, programme_for
from nurture.config import get_settings
from nurture.delivery import (
    Budget,
    Pacer,
    SendReport,
    recover_in_flight,
    send_batch,
    skip_blocked,
)
from nurture.pipeline import (
    PromotionReport,
    apply_stage_thresholds,
    process_promotions,
    queue_promotions,
)
from nurture.scoring import score_all
from nurture.sequences import advance_due, worker_id
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


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def enroll_task(
    db: str | None, campaigns: str | None, templates: str | None, now: str
) -> dict[str, int]:
    """Store the campaigns and enroll matching leads into each (one statement per campaign)."""
    engine, at = engine_for(db), parse_now(now)
    refs = prepare_campaigns(engine, programme_for(campaigns, templates), at)
    return {ref.name: enroll_campaign(engine, ref, at) for ref in refs}


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def advance_task(
    db: str | None, campaigns: str | None, templates: str | None, now: str, batch_size: int
) -> dict[str, Any]:
    """Move due enrollments forward and queue their deliveries, campaign by campaign."""
    engine, at = engine_for(db), parse_now(now)
    programme = programme_for(campaigns, templates)
    refs = prepare_campaigns(engine, programme, at)
    domain = mail_domain(mailer_for(templates))
    out: dict[str, Any] = {}
    for ref in refs:
        stats = CampaignTick()
        merge_advance(
            stats, advance_due(engine, ref, at, batch_size=batch_size, mail_domain=domain)
        )
        out[ref.name] = stats
    return out


@task(cache_policy=NONE)
def recover_task(db: str | None, now: str) -> tuple[int, int]:
    """Mark deliveries orphaned by a dead sender ``unknown``; skip suppressed ones."""
    engine = engine_for(db)
    return recover_in_flight(engine, worker=WORKER), skip_blocked(engine, parse_now(now))


@task(cache_policy=NONE, retries=1, retry_delay_seconds=10)
def send_task(
    db: str | None, templates: str | None, now: str, batch_size: int, budget: Budget
) -> SendReport:
    """Claim and send one batch of due deliveries (retries inside are classified)."""
    return send_batch(
        engine_for(db),
        parse_now(now),
        mailer_for(templates),
        worker=WORKER,
        limit=batch_size,
        budget=budget,
    )


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def score_task(
    db: str | None, campaigns: str | None, templates: str | None, now: str
) -> dict[str, Any]:
    """Score every lead and apply stage thresholds, set-based."""
    engine, at = engine_for(db), parse_now(now)
    programme = programme_for(campaigns, templates)
    scored = score_all(engine, programme.scoring, at)
    moves = apply_stage_thresholds(engine, programme.scoring, programme.pipeline, at)
    return {"scored": scored, "moves": moves}


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def promote_task(
    db: str | None, campaigns: str | None, templates: str | None, now: str
) -> tuple[dict[str, int], PromotionReport]:
    """Queue newly qualified leads and push the promotion queue through the connectors."""
    engine, at = engine_for(db), parse_now(now)
    programme = programme_for(campaigns, templates)
    refs = prepare_campaigns(engine, programme, at)
    queued = {ref.name: queue_promotions(engine, ref, programme.pipeline, at) for ref in refs}
    report = process_promotions(engine, connectors_for(programme), programme.pipeline, at)
    return queued, report


def run_tick(
    now: datetime,
    *,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    batch_size: int = 500,
) -> TickResult:
    """Run one tick as tasks inside the current flow run."""
    iso = now.isoformat()
    db, cdir, tdir = database_url, campaigns_dir, templates_dir
    result = TickResult(now=now)
    for name, n in enroll_task(db, cdir, tdir, iso).items():
        result.campaigns.setdefault(name, CampaignTick()).enrolled = n
    for name, stats in advance_task(db, cdir, tdir, iso, batch_size).items():
        stats.enrolled = result.campaigns.get(name, CampaignTick()).enrolled
        result.campaigns[name] = stats
    unknown, skipped = recover_task(db, iso)
    result.send.recovered_unknown, result.send.skipped = unknown, skipped
    throttle = get_settings().throttle()
    budget = throttle.budget()
    pacer = Pacer(throttle.per_second) if throttle.per_second else None
    while True:
        report = send_task(db, tdir, iso, batch_size, budget)
        if not report.claimed:
            break
        result.send.add(report)
        if pacer is not None:
            pacer.after(report.claimed)
        if report.sent == 0 and report.retry == report.claimed:
            break
    scored = score_task(db, cdir, tdir, iso)
    result.scored, result.stage_moves = scored["scored"], scored["moves"]
    queued, result.promotions = promote_task(db, cdir, tdir, iso)
    for name, n in queued.items():
        result.campaigns.setdefault(name, CampaignTick()).queued_promotions = n
    return result


@flow(name="nurture_tick", log_prints=False)
def nurture_tick(
    now: str | None = None,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    batch_size: int = 500,
) -> dict[str, Any]:
    """One tick of the nurture loop: enroll, advance, send, score, promote."""
    result = run_tick(
        parse_now(now),
        database_url=database_url,
        campaigns_dir=campaigns_dir,
        templates_dir=templates_dir,
        batch_size=batch_size,
    )
    logger = get_run_logger()
    logger.info("tick %s: %s", result.now.isoformat(), result.summary())
    return result.details()
