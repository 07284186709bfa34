"""``nurture tick``: run one tick of the nurture loop now, without a Prefect server."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from nurture.cli.common import console, engine, fail, json_option, parse_now, print_json, shown


@click.command()
@click.option(
    "--now", "now_text", default=None, help="The tick's instant (ISO 8601); default: now."
)
@click.option(
    "--campaigns",
    type=click.Path(path_type=Path),
    default=None,
    help="Campaign folder (default: NURTURE_CAMPAIGNS).",
)
@click.option(
    "--templates",
    type=click.Path(path_type=Path),
    default=None,
    help="Templates folder (default: NURTURE_TEMPLATES).",
)
@click.option(
    "--first-touch",
    is_flag=True,
    help="Only the first-touch pass: enroll new leads and send their first step "
    "(run it every minute from cron; the full tick keeps its own schedule).",
)
@json_option
def tick(
    now_text: str | None,
    campaigns: Path | None,
    templates: Path | None,
    first_touch: bool,
    as_json: bool,
) -> None:
    """Enroll, send due steps, score and promote, once, at --now."""
    from nurture.config import get_settings
    from nurture.crm.alerts import notifier_from_settings
    from nurture.journey.sequences import worker_id
    from nurture.outbox.delivery import mailer_from_settings
    from nurture.spec.programme import Programme
    from nurture.spec.schema import SpecErrors
    from nurture.tick import tick as run_tick

    now = parse_now(now_text)
    settings = get_settings()
    try:
        programme = Programme.load(campaigns or settings.campaigns, templates or settings.templates)
    except SpecErrors as exc:
        fail("invalid campaign specs:\n" + "\n".join(f"  {e}" for e in exc.errors))
    mailer = mailer_from_settings(programme.templates)
    if first_touch:
        from nurture.first_touch import first_touch as run_first_touch

        try:
            quick = run_first_touch(
                engine(), now, programme, mailer, worker=worker_id(), batch_size=settings.batch_size
            )
        finally:
            mailer.sender.close()
        counts = {"enrolled": quick.enrolled, "sent": quick.send.sent, "failed": quick.send.failed}
        if as_json:
            print_json(counts)
        else:
            console.print(
                f"first touch at {now.isoformat()}: enrolled {quick.enrolled}, "
                f"sent {quick.send.sent}, failed {quick.send.failed}"
            )
        return
    try:
        result = run_tick(
            engine(),
            now,
            programme,
            mailer,
            worker=worker_id(),
            batch_size=settings.batch_size,
            throttle=settings.throttle(),
            park_after=settings.crm_park_after,
            notifier=notifier_from_settings(
                settings.alert_webhooks.get_secret_value() if settings.alert_webhooks else None
            ),
        )
    finally:
        mailer.sender.close()
    if as_json:
        print_json(result.summary())
        return
    table = Table(title=f"tick at {now.isoformat()}")
    for col in ("campaign", "enrolled", "queued", "exited", "deferred", "completed", "promotions"):
        table.add_column(col, justify="left" if col == "campaign" else "right")
    for name, c in result.campaigns.items():
        table.add_row(
            shown(name),
            str(c.enrolled),
            str(c.queued),
            str(c.exited),
            str(c.deferred),
            str(c.completed),
            str(c.queued_promotions),
        )
    console.print(table)
    s = result.send
    console.print(
        f"sent {s.sent}, failed {s.failed}, retry later {s.retry}, skipped {s.skipped}, "
        f"unknown {s.unknown + s.recovered_unknown}; promoted {result.promotions.pushed}, "
        f"parked {result.promotions.parked}"
    )
