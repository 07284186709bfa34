"""The ``nurture_demo`` flow: replay N simulated days of a nurture programme through Prefect.

An imported list arrives on day one; after that, leads sign up between ticks, a cohort
at a random time of each interval, each lead at its own minute. The first-touch pass
(the task of the every-minute ``nurture_first_touch`` deployment) runs a minute after a
cohort's last signup, so speed to lead is measured as a real programme would see it:
minutes inside the send window, the window's opening outside it. Every tick runs as
batch tasks (the same ones as ``nurture_tick``), and simulated recipients react to the
real emails through the tracking service.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from prefect import flow, task
from prefect.cache_policies import NONE

from nurture.dev.sales_sim import work_pipeline
from nurture.dev.simulate import Clock, simulate_engagement
from nurture.dev.smtp_sink import OutboxSink
from nurture.dev.synthetic import generate, insert_leads
from nurture.flows.first_touch import first_touch_task
from nurture.flows.runtime import engine_for
from nurture.flows.tick import run_tick

#: Tick stages that take a few milliseconds in the demo: plain calls, not task runs.
DIRECT_STAGES = frozenset({"sync", "held", "double-opt-in", "stages", "promote", "crm-deletions"})
#: A cohort signs up over this many minutes, one sub-batch every SIGNUP_GAP minutes.
SIGNUP_SPAN = 10
SIGNUP_GAP = 3


@dataclass
class DemoWorld:
    """The in-process parts of the demo that tasks reach: SMTP sink and tracking app."""

    sink: OutboxSink
    client: httpx.Client
    clock: Clock
    tracking_prefix: str
    ingest_key: str


WORLD: list[DemoWorld] = []  # set by the CLI before the flow runs, in this process


@dataclass
class DemoTotals:
    """Running totals printed as the demo goes."""

    ticks: int = 0
    arrived: int = 0
    sent: int = 0
    opened: int = 0
    clicked: int = 0
    replied: int = 0
    promoted: int = 0
    scanned: int = 0  # messages a simulated security gateway scanned
    proxied: int = 0  # pixels a simulated privacy proxy fetched
    sales_moves: dict[str, int] = field(default_factory=dict)  # stage -> leads a rep moved
    nps: int = 0
    first_touch_sent: int = 0  # first steps sent by the first-touch passes between ticks
    last_tick: str = ""
    per_day: list[dict[str, Any]] = field(default_factory=list)


@task(cache_policy=NONE)
def arrive_task(db: str, start: int, count: int, now: str, seed: int) -> int:
    """A cohort of new synthetic leads arrives."""
    leads = list(generate(count, seed=seed, start=start))
    return insert_leads(engine_for(db), leads, datetime.fromisoformat(now))


@task(cache_policy=NONE)
def capture_task(db: str, start: int, count: int, times: list[str], seed: int) -> int:
    """A cohort signs up between ticks: lead ``i`` is captured at ``times[i % len(times)]``
    (its ``created_at``, the capture time speed to lead starts from)."""
    leads = list(generate(count, seed=seed, start=start))
    engine = engine_for(db)
    return sum(
        insert_leads(engine, leads[i :: len(times)], datetime.fromisoformat(t))
        for i, t in enumerate(times)
    )


def signup_times(prev: datetime, now: datetime, rng: random.Random) -> tuple[list[str], str]:
    """When a cohort signs up between two ticks, and when the first-touch pass after it
    runs (a minute after the last signup)."""
    span = (now - prev).total_seconds() / 60
    first = prev + timedelta(minutes=rng.uniform(5, max(6.0, span - SIGNUP_SPAN - 5)))
    times = [first + timedelta(minutes=m) for m in range(0, SIGNUP_SPAN, SIGNUP_GAP)]
    return [t.isoformat() for t in times], (times[-1] + timedelta(minutes=1)).isoformat()


@task(cache_policy=NONE)
def simulate_task(db: str, now: str, seed: int) -> dict[str, Any]:
    """Recipients react to what they received since the last tick, and the simulated sales
    team works the promoted leads in the local CRM (one task: a task run costs time)."""
    world = WORLD[0]
    sales = work_pipeline(engine_for(db), datetime.fromisoformat(now), seed=seed)
    result = simulate_engagement(
        engine_for(db),
        world.client,
        world.clock,
        world.sink.take_recent(),
        datetime.fromisoformat(now),
        tracking_prefix=world.tracking_prefix,
        ingest_key=world.ingest_key,
    )
    return {**asdict(result), "sales": dict(sales.moves), "nps": sales.nps}


@flow(name="nurture_demo")
def nurture_demo(
    database_url: str,
    campaigns_dir: str,
    templates_dir: str,
    start: str = "2026-03-02T06:00:00+00:00",
    days: int = 30,
    tick_hours: int = 8,
    leads: int = 2000,
    seed: int = 7,
) -> dict[str, Any]:
    """Replay ``days`` simulated days, one tick every ``tick_hours``."""
    begin = datetime.fromisoformat(start)
    ticks = days * 24 // tick_hours
    initial = leads * 2 // 5  # an imported list on day one, the rest arrive over time
    per_tick = max(1, (leads - initial) // ticks)
    totals = DemoTotals()
    arrived = 0
    rng = random.Random(seed)
    for k in range(ticks):
        now = begin + timedelta(hours=tick_hours * k)
        count = initial if k == 0 else min(per_tick, leads - arrived)
        if count > 0 and k == 0:  # the imported list
            totals.arrived += arrive_task(database_url, arrived, count, now.isoformat(), seed)
            arrived += count
        elif count > 0:  # sign-ups since the last tick, then their first touch
            times, touch = signup_times(now - timedelta(hours=tick_hours), now, rng)
            totals.arrived += capture_task(database_url, arrived, count, times, seed)
            arrived += count
            first = first_touch_task(database_url, campaigns_dir, templates_dir, touch, None)
            totals.sent += first["sent"]
            totals.first_touch_sent += first["sent"]
        result = run_tick(
            now,
            database_url=database_url,
            campaigns_dir=campaigns_dir,
            templates_dir=templates_dir,
            direct_stages=DIRECT_STAGES,
        )
        reactions = simulate_task(database_url, now.isoformat(), seed)
        totals.nps += reactions["nps"]
        for stage, n in reactions["sales"].items():
            totals.sales_moves[stage] = totals.sales_moves.get(stage, 0) + n
        totals.last_tick = now.isoformat()
        totals.ticks += 1
        totals.sent += result.send.sent
        totals.promoted += result.promotions.pushed
        totals.opened += reactions["opened"]
        totals.clicked += reactions["clicked"]
        totals.replied += reactions["replied"]
        totals.scanned += reactions["scanned"]
        totals.proxied += reactions["proxied"]
    return asdict(totals)
