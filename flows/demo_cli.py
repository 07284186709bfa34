"""``nurture demo``: 30 simulated days of the example programme, end to end, through Prefect.

The command lives beside the flows it runs, not in the core: the ``nurture`` command finds
it through the ``nurture.commands`` entry point, so :mod:`nurture` never imports
:mod:`flows` (the import contract in ``pyproject.toml`` checks that).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table
from sqlalchemy import Engine

from nurture.cli.common import console, fail, json_option, print_json, shown
from nurture.scaffold import STARTER_CAMPAIGNS, STARTER_TEMPLATES


def keep_prefect_local() -> None:
    """For the demo only: Prefect's home under ``.nurture/prefect``, no telemetry, logs at
    WARNING, and a startup timeout that fits a cold start of the ephemeral server (unless
    already set)."""
    os.environ.setdefault("PREFECT_HOME", os.path.abspath(".nurture/prefect"))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # A thousand task runs: their INFO lines would bury the demo's output and cost time.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Prefect creates its home without parents: on a fresh clone it would warn.
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)


def boot_prefect_early() -> threading.Thread | None:
    """Start Prefect's ephemeral API server in the background (it takes seconds to boot),
    so it comes up while the demo starts its SMTP sink, database and tracking service.

    Only when no ``PREFECT_API_URL`` is set (the flow would start the same server); the
    caller joins the thread before running the flow, so the flow finds it healthy.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception:
            return

    thread = threading.Thread(target=start, name="prefect-ephemeral-boot", daemon=True)
    thread.start()
    return thread


if TYPE_CHECKING:
    from nurture.reporting.report import CampaignFunnel, Report


@click.command()
@click.option("--days", default=30, show_default=True, help="Simulated days to replay.")
@click.option("--leads", default=2000, show_default=True, help="Synthetic leads to generate.")
@click.option("--tick-hours", default=8, show_default=True, help="Simulated hours per tick.")
@click.option(
    "--dir",
    "workdir",
    default=".nurture/demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@json_option
def demo(days: int, leads: int, tick_hours: int, workdir: Path, as_json: bool) -> None:
    """Import synthetic leads, run the example campaigns for 30 days, print the funnel."""
    keep_prefect_local()
    started = time.monotonic()
    if workdir.exists():
        # Only ever wipe a previous demo's folder, never whatever --dir happens to name.
        leftovers = {p.name for p in workdir.iterdir()}
        if leftovers - {
            "nurture.db",
            "nurture.db-wal",
            "nurture.db-shm",
            "outbox",
            "report.html",
            "spool",
        }:
            fail(f"--dir {workdir}: not empty and not a previous demo; choose another folder")
        shutil.rmtree(workdir)
    booting = boot_prefect_early()
    outbox = workdir / "outbox"
    from nurture.dev.smtp_sink import OutboxSink

    sink = OutboxSink(outbox).start()
    from nurture.dev.webhook_receiver import WebhookSink

    hooks = WebhookSink().start()  # stands in for the sales team's Slack channels
    db_url = f"sqlite:///{workdir.resolve()}/nurture.db"
    secret = "demo-secret-" + os.urandom(8).hex()
    from nurture.dev.simulate import Clock, TrackingProcess

    ingest_key = "demo-ingest-key"
    clock = Clock(datetime.now(UTC))
    tracking = TrackingProcess(db_url, secret, ingest_key, clock, workdir / "spool")
    os.environ.update(
        {
            "NURTURE_DATABASE_URL": db_url,
            "NURTURE_SMTP_URL": sink.url,
            "NURTURE_SECRET_KEY": secret,
            "NURTURE_TRACKING_URL": tracking.url,
            "NURTURE_ALERT_WEBHOOKS": hooks.url + "/alerts",
        }
    )
    from nurture.config import get_settings

    get_settings.cache_clear()
    # The packaged starter programme, so the demo runs the same from a wheel install.
    campaigns = str(STARTER_CAMPAIGNS)
    templates = str(STARTER_TEMPLATES)
    if not as_json:
        console.print(
            f"[bold]nurture demo[/]: {leads} synthetic leads, {days} simulated days, "
            f"a tick every {tick_hours} h; SMTP sink {sink.url}, tracking {tracking.url}"
        )
        console.print("starting Prefect (the first run migrates its local database)...")
    import httpx

    from nurture.flows.demo import WORLD, DemoWorld, nurture_demo
    from nurture.reporting.report import campaign_funnels
    from nurture.store.db import get_engine

    engine = get_engine(db_url)  # migrates the schema before the tracking process starts
    tracking.start()
    if booting is not None:
        booting.join()
    try:
        with httpx.Client(base_url=tracking.url, timeout=30) as client:
            WORLD[:] = [DemoWorld(sink, client, clock, tracking.url + "/", ingest_key)]
            totals = nurture_demo(
                database_url=db_url,
                campaigns_dir=campaigns,
                templates_dir=templates,
                days=days,
                tick_hours=tick_hours,
                leads=leads,
            )
    finally:
        WORLD.clear()
        tracking.stop()
        sink.stop()
        hooks.stop()
    funnels = campaign_funnels(engine)
    as_of = datetime.fromisoformat(totals["last_tick"]) if totals.get("last_tick") else None
    report = _build_report(engine, as_of)
    report_path = _write_report(report, workdir / "report.html")
    elapsed = time.monotonic() - started
    if as_json:
        print_json(
            {
                "totals": totals,
                "funnel": [f.as_dict() for f in funnels],
                "outbox": str(outbox),
                "messages": sink.count,
                "report": str(report_path),
                "alerts": hooks.count,
                "speed_to_lead": asdict(report.speed_to_lead),
                "speed_to_human": asdict(report.speed_to_human) if report.speed_to_human else None,
                "speed_in_window": (
                    asdict(report.speed_in_window) if report.speed_in_window else None
                ),
                "backtest": asdict(report.backtest),
                "goals": report.as_dict()["goals"],
                "seconds": round(elapsed, 1),
            }
        )
        return
    # Two tables of a few columns each, so campaign names are never cut on a narrow terminal.
    _print_funnel(
        f"Messages after {days} simulated days",
        funnels,
        ["sent", "opened", "clicked", "replied", "machine_opened", "machine_clicked"],
    )
    _print_funnel(
        "Leads enrolled and the stages they reached (distinct leads of each campaign)",
        funnels,
        ["enrolled", "mql", "sql", "opportunity", "customer", "promoted"],
    )
    _print_outcomes(report)
    first = hooks.received[0][1]["title"] if hooks.received else None
    console.print(
        f"{hooks.count} sales alerts reached the local webhook receiver"
        + (f" (the first: {escape(first)})" if first else "")
    )
    console.print(
        f"{sink.count} messages in {shown(outbox)}/ ({totals['ticks']} ticks, {elapsed:.0f} s)"
    )
    console.print(f"HTML report with charts: {shown(report_path)}")


def _print_funnel(title: str, funnels: list[CampaignFunnel], columns: list[str]) -> None:
    """One table of the demo's funnel: a row per campaign, the given columns."""
    table = Table(title=title, title_justify="left")
    table.add_column("campaign", justify="left", no_wrap=True)
    for col in columns:
        table.add_column(col.replace("machine_", "machine "), justify="right")
    for f in funnels:
        table.add_row(shown(f.campaign), *(shown(getattr(f, c)) for c in columns))
    console.print(table)


def _build_report(engine: Engine, as_of: datetime | None) -> Report:
    """The analytics report of the whole demo, with goals paced at the last simulated tick."""
    from nurture.reporting.report import build_report
    from nurture.spec.schema import load_pipeline

    pipeline = load_pipeline(STARTER_CAMPAIGNS / "pipeline.yaml")
    return build_report(engine, pipeline, now=as_of)


def _write_report(report: Report, path: Path) -> Path:
    """The report (stages, A/B, health, goals, charts) as HTML."""
    from nurture.reporting.html_report import write_html

    return write_html(report, path).resolve()


def _print_outcomes(report: Report) -> None:
    """Speed to lead, the back-test and the goals, a few lines under the funnel."""
    s, h, b = report.speed_to_lead, report.speed_to_human, report.backtest
    w = report.speed_in_window

    def minutes(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f} min"

    console.print(
        f"Speed to lead: first email median {minutes(s.median_minutes)} "
        f"({s.within_hour}/{s.captured} within 1 h)"
        + (
            f"; captured inside the send window: median {minutes(w.median_minutes)} "
            f"({w.within_hour}/{w.captured} within 1 h)"
            if w is not None
            else ""
        )
        + (
            f"; first human touch median {minutes(h.median_minutes)} "
            f"({h.contacted} leads touched by a rep)"
            if h is not None
            else ""
        )
    )
    grades = ", ".join(f"{g.grade} {g.won}/{g.leads} ({g.win_rate:.0%})" for g in b.by_grade)
    auc = "-" if b.auc is None else f"{b.auc:.2f}"
    console.print(
        f"Score back-test: AUC {auc} over {b.promoted} promoted leads, {b.won} won; "
        f"win rate by grade: {grades or '-'}"
    )
    for g in report.goals:
        fmt = "{:.0%}" if g.is_rate else "{:,.0f}"
        actual = "-" if g.actual is None else fmt.format(g.actual)
        pace = "-" if g.projected is None else fmt.format(g.projected)
        console.print(
            f"Goal {g.goal}: {actual} of {fmt.format(g.target)} "
            f"(pace {pace}, {g.elapsed_share:.0%} of the period gone): {g.status}"
        )
