"""The ``nurture_tick`` flow: one tick as a handful of batch tasks, never a task per lead.

Concurrent ticks (several workers on PostgreSQL) are safe: due enrollments and queued
deliveries are claimed with ``FOR UPDATE SKIP LOCKED``, so each batch belongs to one run.
Every send batch holds one slot of the ``smtp`` global concurrency limit, so all runs
together respect the mail provider's connection limit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, TypeVar, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.utilities.annotations import quote

from nurture.config import get_settings
from nurture.flows.alerts import notifier
from nurture.flows.artifacts import SendProgress, publish_tick
from nurture.flows.limits import SMTP_LIMIT, LimitedConnector, crm_limit, slot
from nurture.flows.runtime import engine_for, mailer_for, parse_now, programme_for
from nurture.journey.sequences import worker_id
from nurture.outbox.record import SendReport
from nurture.tick import TickResult, connectors_for, tick

WORKER = worker_id()

T = TypeVar("T")


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, timeout_seconds=1800)
def stage_task(call: Any) -> Any:
    """One stage of the tick (named after it in the UI); every stage is safe to retry.

    ``call`` is ``(fn, args, kwargs)``, quoted by the caller.
    """
    fn, args, kwargs = call
    return fn(*args, **kwargs)


# No task-level retry: a batch that fails half way has rows in ``sending`` that must become
# ``unknown`` (never resent). Retryable SMTP failures are retried inside, message by message,
# and the rest wait in the outbox for the next batch or tick.
@task(name="send", cache_policy=NONE, timeout_seconds=1800)
def send_task(batch: Any, smtp_limit: str | None) -> SendReport:
    """Transmit one claimed batch, holding one slot of the ``smtp`` limit."""
    with slot(smtp_limit):
        return batch()


class TaskSteps:
    """:class:`nurture.steps.Steps` as Prefect tasks: a task per stage and per send batch."""

    def __init__(self, smtp_limit: str | None, direct: Collection[str] = ()) -> None:
        self.smtp_limit = smtp_limit
        self.direct = frozenset(direct)

    def stage(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` as the task ``name`` (retried twice), or as a plain call when the
        stage is named in ``direct`` (a task run costs about 10 ms: the demo runs its
        few-millisecond stages inline)."""
        if name in self.direct:
            return fn(*args, **kwargs)
        # quote(): the arguments (engine, campaigns) are passed as they are, not inspected.
        return cast(T, stage_task.with_options(name=name)(quote((fn, args, kwargs))))

    def send(self, batch: Callable[[], T]) -> T:
        """Run one send batch as a task (never retried)."""
        return cast(T, send_task(quote(batch), self.smtp_limit))


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
    direct_stages: Collection[str] = (),
) -> TickResult:
    """Run :func:`nurture.tick.tick` inside the current flow run, its stages as tasks.

    Args:
        now: The tick's instant.
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: Campaign YAML folder (default: ``NURTURE_CAMPAIGNS``).
        templates_dir: Templates folder (default: ``NURTURE_TEMPLATES``).
        batch_size: Leads per batch.
        smtp_block: A :class:`nurture.flows.blocks.NurtureSmtp` block name (default: settings).
        limits: Hold the ``smtp`` and ``crm-<name>`` global concurrency limits per batch.
        progress: Show a progress artifact when the send takes more than one batch.
        direct_stages: Stages run as plain calls instead of tasks (the demo's cheap ones).
    """
    settings = get_settings()
    programme = programme_for(campaigns_dir, templates_dir)
    connectors = {
        name: LimitedConnector(conn, crm_limit(name) if limits else None)
        for name, conn in connectors_for(programme).items()
    }
    bars: list[SendProgress] = []

    def show(total: SendReport) -> None:
        if not bars and total.due > batch_size:
            bars.append(SendProgress(total.due, f"Sending {total.due} due messages at {now}"))
        for bar in bars:
            bar.batch_done(total.claimed)

    result = tick(
        engine_for(database_url),
        now,
        programme,
        mailer_for(templates_dir, smtp_block),
        worker=WORKER,
        connectors=connectors,
        batch_size=batch_size,
        progress=show if progress else None,
        throttle=settings.throttle(),
        park_after=settings.crm_park_after,
        steps=TaskSteps(SMTP_LIMIT if limits else None, direct_stages),
        notifier=notifier() if programme.pipeline.alerts else None,
    )
    for bar in bars:
        bar.finish()
    _log(result)
    return result


def _log(result: TickResult) -> None:
    logger = get_run_logger()
    camps = result.campaigns.values()
    send, promo = result.send, result.promotions
    logger.info(
        "enrolled %d, queued %d messages, exited %d, deferred %d, completed %d",
        result.enrolled,
        sum(c.queued for c in camps),
        sum(c.exited for c in camps),
        sum(c.deferred for c in camps),
        sum(c.completed for c in camps),
    )
    logger.info(
        "sent %d of %d due, failed %d, retry later %d, unknown %d, skipped %d",
        send.sent,
        send.due,
        send.failed,
        send.retry,
        send.unknown + send.recovered_unknown,
        send.skipped,
    )
    logger.info(
        "scored %d leads; promotions queued %d, pushed %d, retry %d, parked %d",
        result.scored,
        sum(c.queued_promotions for c in camps),
        promo.pushed,
        promo.retry,
        promo.parked,
    )


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
