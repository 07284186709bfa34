"""``nurture demo``: 30 simulated days of the example programme, end to end, through Prefect.

The command lives beside the flows it runs, not in the core: the ``nurture`` command finds
it through the ``nurture.commands`` entry point, so :mod:`nurture` never imports
:mod:`flows` (the import contract in ``pyproject.toml`` checks that).
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from nurture.cli.common import console, fail, json_option, print_json, shown
from nurture.config import PROJECT_ROOT


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
    outbox = workdir / "outbox"
    from nurture.dev.smtp_sink import OutboxSink

    sink = OutboxSink(outbox).start()
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
        }
    )
    from nurture.config import get_settings

    get_settings.cache_clear()
    campaigns = str(PROJECT_ROOT / "campaigns")
    templates = str(PROJECT_ROOT / "templates" / "emails")
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
    funnels = campaign_funnels(engine)
    report_path = _write_report(engine, workdir / "report.html")
    elapsed = time.monotonic() - started
    if as_json:
        print_json(
            {
                "totals": totals,
                "funnel": [f.as_dict() for f in funnels],
                "outbox": str(outbox),
                "messages": sink.count,
                "report": str(report_path),
                "seconds": round(elapsed, 1),
            }
        )
        return
    table = Table(title=f"Funnel after {days} simulated days")
    columns = [
        "campaign",
        "leads",
        "enrolled",
        "sent",
        "opened",
        "clicked",
        "replied",
        "mql",
        "promoted",
        "machine_opened",
        "machine_clicked",
    ]
    for col in columns:
        label = col.replace("machine_", "machine ")
        table.add_column(label, justify="left" if col == "campaign" else "right")
    for f in funnels:
        table.add_row(*(shown(getattr(f, c)) for c in columns))
    Console(width=max(console.width, 110)).print(table)
    console.print(
        f"{sink.count} messages in {shown(outbox)}/ ({totals['ticks']} ticks, {elapsed:.0f} s)"
    )
    console.print(f"HTML report with charts: {shown(report_path)}")


def _write_report(engine: Engine, path: Path) -> Path:
    """The analytics report of the whole demo (stages, A/B, health, charts) as HTML."""
    from nurture.reporting.html_report import write_html
    from nurture.reporting.report import build_report
    from nurture.spec.schema import load_pipeline

    pipeline = load_pipeline(PROJECT_ROOT / "campaigns" / "pipeline.yaml")
    return write_html(build_report(engine, pipeline), path).resolve()
