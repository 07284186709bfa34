"""Scoring time against one hand-written SQL aggregate over the same database.

Run: ``python -m benchmarks.scoring_bench --leads 100000 --events 1000000 [--postgres]``. It
generates seeded leads (with accounts and fit attributes) and events in a SQLite file (and,
with ``--postgres``, in a throwaway PostgreSQL cluster), then times

* ``score_all``: behaviour with decay, fit and grade, and the account roll-up, written back;
* the floor: ONE ``SELECT lead_id, SUM(points * exp(...)) FROM events GROUP BY lead_id``
  computing the same decayed behaviour sums, fetched and nothing else.

First over leads never scored (every score written), then over ``repeat`` ticks 15 minutes
apart, each after adding 1% new events, as in production. The target is the best tick's
``score_all`` within 1.5x the aggregate's time on the same data; the first run is printed
beside it. SQLite runs inside this process, so its CPU time is exactly the work each side
did, whatever else the machine runs; PostgreSQL works in the server, so that side compares
wall-clock times. The stored behaviour scores are checked against the aggregate's sums, to
within ``SCORE_TOLERANCE``, so the two sides provably compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from nurture.engagement.scoring import SCORE_TOLERANCE, score_all
from nurture.spec.rules import parse_duration
from nurture.spec.schema import ScoringSpec
from nurture.store.db import make_engine, upgrade

TARGET = 1.5  # score_all may take at most this many times the aggregate (issue 19)
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
TYPES = ["opened", "opened", "opened", "clicked", "clicked", "page_view", "replied", "form_submit"]
SPEC = ScoringSpec.model_validate(
    {
        "points": ScoringSpec().points,  # the shipped defaults
        "half_life": "30d",
        "fit": [
            {"name": "b2b", "when": {"field": "attributes.type", "op": "eq", "value": "b2b"},
             "points": 20},
            {"name": "big", "when": {"field": "attributes.employees", "op": "gte", "value": 50},
             "points": 20},
            {"name": "country", "when": {"field": "country", "op": "in",
                                         "value": ["US", "GB", "DE"]}, "points": 10},
        ],
        "account": {"method": "top_n", "top": 3},
    }
)  # fmt: skip
_STAMP = "strftime('%Y-%m-%d %H:%M:%S', '2026-03-03 10:00:00', '-' || ({age}) || ' seconds')"


def generate(path: Path, leads: int, events: int, seed: int = 7) -> None:
    """Fill a migrated SQLite file with seeded accounts, leads and events.

    One ``INSERT ... SELECT`` over a recursive counter per table: the rows never pass
    through Python. A multiplicative hash of the row number and the seed spreads events
    over leads, types and the last 180 days, the same for the same seed.
    """
    conn = sqlite3.connect(path)
    accounts = max(leads // 10, 1)
    now_text = "'2026-03-03 10:00:00.000000'"
    types = " ".join(f"WHEN {n} THEN '{t}'" for n, t in enumerate(TYPES))
    with conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {accounts})
            INSERT INTO accounts (id, name, domain, score, attributes, created_at, updated_at)
            SELECT i, 'Account ' || i, 'acct' || i || '.example', 0.0, '{{}}',
                   {now_text}, {now_text}
            FROM n
            """
        )
        conn.execute(
            f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {leads})
            INSERT INTO leads (id, email, account_id, source, country, lifecycle_stage,
                               attributes, behaviour_score, fit_score, created_at, updated_at)
            SELECT i, 'lead' || i || '@acct' || (i % {accounts} + 1) || '.example',
                   CASE WHEN i % 5 = 0 THEN NULL ELSE i % {accounts} + 1 END,
                   'website',
                   json_extract('["US","GB","DE","FR","JP"]',
                                '$[' || ((i * 31 + {seed}) % 5) || ']'),
                   'subscriber',
                   json_object('type', CASE WHEN (i + {seed}) % 3 = 0 THEN 'b2c' ELSE 'b2b' END,
                               'employees', (i * 37 + {seed}) % 500),
                   0.0, 0.0, {now_text}, {now_text}
            FROM n
            """
        )
        age = f"((i * 104729 + {seed} * 7919) % {180 * 86400})"
        # Building the index once after the load is much faster than keeping it up to date
        # through a million random-order inserts.
        conn.execute("DROP INDEX ix_events_lead_type")
        conn.execute(
            f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {events})
            INSERT INTO events (id, lead_id, type, occurred_at, payload)
            SELECT i,
                   (i * 2654435761 + {seed}) % {leads} + 1,
                   CASE (i * 7 + {seed}) % {len(TYPES)} {types} END,
                   {_STAMP.format(age=age)} || '.000000',
                   '{{}}'
            FROM n
            """
        )
        conn.execute(
            "CREATE INDEX ix_events_lead_type "
            "ON events (lead_id, type, occurred_at, counted_human, counted_any)"
        )
    conn.execute("ANALYZE")
    conn.close()


def aggregate_sql(spec: ScoringSpec, postgres: bool = False) -> str:
    """The hand-written floor: one GROUP BY computing every lead's decayed behaviour sum.

    On PostgreSQL the age is ``date_part``, not ``EXTRACT``, which computes in numeric and
    takes the aggregate 3.5 times as long: the floor is the fastest way we know to write it.
    """
    half_life = parse_duration(spec.half_life or "1000000d").total_seconds()
    points = " ".join(f"WHEN '{name}' THEN {float(value)!r}" for name, value in spec.points.items())
    listed = ", ".join(f"'{name}'" for name in spec.points)
    now = "%(now)s" if postgres else ":now"
    age = (
        f"date_part('epoch', {now} - occurred_at)"
        if postgres
        else (f"(julianday({now}) - julianday(occurred_at)) * 86400.0")
    )
    return f"""
        SELECT lead_id,
               SUM((CASE type {points} ELSE 0.0 END)
                   * exp(-{math.log(2)!r} * {age} / {half_life!r}))
        FROM events
        WHERE occurred_at <= {now} AND type IN ({listed}) AND counted_human
        GROUP BY lead_id
    """


def generate_postgres(engine: Engine, leads: int, events: int, seed: int = 7) -> None:
    """The same seeded rows as :func:`generate`, in a migrated PostgreSQL database.

    ``generate_series`` instead of a recursive counter, and the same hashes, so both
    databases hold the same leads, accounts and events.
    """
    accounts = max(leads // 10, 1)
    now = "TIMESTAMP '2026-03-03 10:00:00'"
    types = " ".join(f"WHEN {n} THEN '{t}'" for n, t in enumerate(TYPES))
    with engine.begin() as conn:
        _pg(
            conn,
            f"""
            INSERT INTO accounts (id, name, domain, score, attributes, created_at, updated_at)
            SELECT i, 'Account ' || i, 'acct' || i || '.example', 0.0, '{{}}', {now}, {now}
            FROM generate_series(1, {accounts}) AS i
            """,
        )
        _pg(
            conn,
            f"""
            INSERT INTO leads (id, email, account_id, source, country, lifecycle_stage,
                               attributes, behaviour_score, fit_score, created_at, updated_at)
            SELECT i, 'lead' || i || '@acct' || (i % {accounts} + 1) || '.example',
                   CASE WHEN i % 5 = 0 THEN NULL ELSE i % {accounts} + 1 END,
                   'website',
                   (ARRAY['US', 'GB', 'DE', 'FR', 'JP'])[(i * 31 + {seed}) % 5 + 1],
                   'subscriber',
                   jsonb_build_object(
                       'type', CASE WHEN (i + {seed}) % 3 = 0 THEN 'b2c' ELSE 'b2b' END,
                       'employees', (i * 37 + {seed}) % 500),
                   0.0, 0.0, {now}, {now}
            FROM generate_series(1, {leads}) AS i
            """,
        )
        _pg(
            conn,
            f"""
            INSERT INTO events (id, lead_id, type, occurred_at, payload)
            SELECT i,
                   (i * 2654435761 + {seed}) % {leads} + 1,
                   CASE (i * 7 + {seed}) % {len(TYPES)} {types} END,
                   {now} - make_interval(secs => (i * 104729 + {seed} * 7919) % {180 * 86400}),
                   '{{}}'
            FROM generate_series(1::bigint, {events}::bigint) AS i
            """,
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")


def _pg(conn: Any, sql: str) -> None:
    """One statement without parameters: psycopg reads ``%`` as a placeholder."""
    conn.exec_driver_sql(sql.replace("%", "%%"))


TICK = timedelta(minutes=15)
TICK_EVENTS = 0.01  # new events per tick, as a share of the generated ones


def tick_events_sql(first: int, count: int, leads: int, now: datetime, postgres: bool) -> str:
    """``count`` new events (ids from ``first``) in the ``TICK`` before ``now``, spread
    over the leads and types by the same kind of hash as the generated ones."""
    types = " ".join(f"WHEN {n} THEN '{t}'" for n, t in enumerate(TYPES))
    stamp = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    window = int(TICK.total_seconds())
    if postgres:
        counter = f"generate_series({first}::bigint, {first + count - 1}::bigint) AS n(i)"
        when = f"TIMESTAMP '{stamp}' - make_interval(secs => (i * 7919) % {window})"
    else:
        counter = (
            f"(WITH RECURSIVE c(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM c "
            f"WHERE i < {first + count - 1}) SELECT i FROM c) AS n"
        )
        when = (
            f"strftime('%Y-%m-%d %H:%M:%S', '{stamp}', '-' || ((i * 7919) % {window}) "
            "|| ' seconds') || '.000000'"
        )
    return f"""
        INSERT INTO events (id, lead_id, type, occurred_at, payload)
        SELECT i, (i * 2654435761) % {leads} + 1, CASE (i * 7) % {len(TYPES)} {types} END,
               {when}, '{{}}'
        FROM {counter}
    """


def _time_aggregate(path: Path, sql: str, now: datetime) -> tuple[float, float, dict[int, float]]:
    conn = sqlite3.connect(path)
    stamp = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    start, cpu = time.perf_counter(), time.process_time()
    rows = conn.execute(sql, {"now": stamp}).fetchall()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    conn.close()
    return elapsed, cpu, dict(rows)


def _time_score_all(engine: Engine, now: datetime, leads: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    scored = score_all(engine, SPEC, now)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if scored != leads:
        raise AssertionError(f"score_all scored {scored} leads, expected {leads}")
    return elapsed, cpu


def _check(stored: dict[int, float], sums: dict[int, float]) -> float:
    """The largest distance of a stored score from the aggregate's; fails past the tolerance."""
    worst = max((abs(stored[lead] - sums.get(lead, 0.0)) for lead in stored), default=0.0)
    if worst > SCORE_TOLERANCE + 1e-9:
        raise AssertionError(f"score_all and the aggregate disagree by {worst}")
    return worst


def _summary(
    leads: int,
    events: int,
    generate_s: float,
    first: tuple[float, float],
    ticks: list[tuple[float, float]],
    worst: float,
    measure: str,
) -> dict[str, Any]:
    """``first`` and ``ticks``: (score_all s, aggregate s) in the ``measure`` the verdict uses."""
    score_s, aggregate_s = min(ticks, key=lambda t: t[0] / t[1])
    return {
        "leads": leads,
        "events": events,
        "ticks": len(ticks),
        "tick_events": round(events * TICK_EVENTS),
        "measure": measure,
        "generate_s": round(generate_s, 2),
        "first_score_all_s": round(first[0], 3),
        "first_aggregate_s": round(first[1], 3),
        "first_ratio": round(first[0] / first[1], 3),
        "score_all_s": round(score_s, 3),
        "aggregate_s": round(aggregate_s, 3),
        "score_all_events_per_s": round(events / score_s),
        "aggregate_events_per_s": round(events / aggregate_s),
        "ratio": round(score_s / aggregate_s, 3),
        "target": TARGET,
        "max_abs_diff": worst,
        "ok": score_s / aggregate_s <= TARGET,
    }  # fmt: skip


def run(
    leads: int = 100_000, events: int = 1_000_000, workdir: Path | None = None, repeat: int = 3
) -> dict[str, Any]:
    """SQLite: generate, score once from nothing, then ``repeat`` ticks; compare CPU times.

    The first run writes every score. Each tick then adds ``TICK_EVENTS`` of new events in
    the 15 minutes before its instant, 15 minutes after the last, as in production, and
    times the aggregate and ``score_all`` on the same data. The verdict uses the best
    tick. SQLite runs in this process, so its CPU time is the work done whatever else the
    machine runs; wall-clock times are kept beside it.

    Raises:
        AssertionError: a stored score is further than ``SCORE_TOLERANCE`` from the sum.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run(leads, events, Path(tmp), repeat)
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "scoring_bench.db"
    for leftover in workdir.glob(f"{db.name}*"):
        leftover.unlink()
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    start = time.perf_counter()
    generate(db, leads, events)
    generate_s = time.perf_counter() - start
    sql = aggregate_sql(SPEC)
    _, aggregate_cpu, sums = _time_aggregate(db, sql, NOW)
    first = (_time_score_all(engine, NOW, leads)[1], aggregate_cpu)
    ticks: list[tuple[float, float]] = []
    walls: list[tuple[float, float]] = []
    added = round(events * TICK_EVENTS)
    for tick in range(1, repeat + 1):
        now = NOW + TICK * tick
        with sqlite3.connect(db) as conn:
            conn.execute(tick_events_sql(events + (tick - 1) * added + 1, added, leads, now, False))
        aggregate_wall, aggregate_cpu, sums = _time_aggregate(db, sql, now)
        score_wall, score_cpu = _time_score_all(engine, now, leads)
        ticks.append((score_cpu, aggregate_cpu))
        walls.append((score_wall, aggregate_wall))
    with sqlite3.connect(db) as conn:
        stored = dict(conn.execute("SELECT id, behaviour_score FROM leads"))
    engine.dispose()
    result = _summary(leads, events, generate_s, first, ticks, _check(stored, sums), "CPU")
    score_wall, aggregate_wall = min(walls, key=lambda t: t[0] / t[1])
    result["wall_ratio"] = round(score_wall / aggregate_wall, 3)
    return result


def run_postgres(
    leads: int = 100_000, events: int = 1_000_000, url: str | None = None, repeat: int = 3
) -> dict[str, Any]:
    """The same runs on PostgreSQL: a throwaway cluster unless ``url`` is given.

    The work runs in the server (the aggregate in parallel workers), so this side
    compares wall-clock times, best tick of ``repeat``.

    Raises:
        AssertionError: a stored score is further than ``SCORE_TOLERANCE`` from the sum.
    """
    if url is None:
        from tests.servers import PostgresCluster

        cluster = PostgresCluster.start()
        try:
            cluster.execute("CREATE DATABASE scoring_bench")
            return run_postgres(leads, events, cluster.url("scoring_bench"), repeat)
        finally:
            cluster.stop()
    engine = make_engine(url)
    upgrade(engine)
    start = time.perf_counter()
    generate_postgres(engine, leads, events)
    generate_s = time.perf_counter() - start
    sql = aggregate_sql(SPEC, postgres=True)

    def aggregate(now: datetime) -> tuple[float, dict[int, float]]:
        with engine.connect() as conn:
            start = time.perf_counter()
            rows = conn.exec_driver_sql(sql, {"now": now.astimezone(UTC).replace(tzinfo=None)})
            sums = {int(lead): float(score) for lead, score in rows.fetchall()}
            return time.perf_counter() - start, sums

    aggregate_s, sums = aggregate(NOW)
    first = (_time_score_all(engine, NOW, leads)[0], aggregate_s)
    ticks: list[tuple[float, float]] = []
    added = round(events * TICK_EVENTS)
    for tick in range(1, repeat + 1):
        now = NOW + TICK * tick
        with engine.begin() as conn:
            first_id = events + (tick - 1) * added + 1
            _pg(conn, tick_events_sql(first_id, added, leads, now, True))
        aggregate_s, sums = aggregate(now)
        ticks.append((_time_score_all(engine, now, leads)[0], aggregate_s))
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, behaviour_score FROM leads").fetchall()
        stored: dict[int, float] = {int(lead): float(score) for lead, score in rows}
    engine.dispose()
    return _summary(leads, events, generate_s, first, ticks, _check(stored, sums), "wall")


def describe(name: str, n: dict[str, Any]) -> str:
    """Two lines for one database: the best tick against the target, and the first run."""
    return (
        f"{name}, {n['events']:,} events over {n['leads']:,} leads, {n['measure']} time: "
        f"tick (+{n['tick_events']:,} events) score_all {n['score_all_s']} s, aggregate "
        f"{n['aggregate_s']} s, ratio {n['ratio']} (target <= {n['target']}) "
        f"{'OK' if n['ok'] else 'ABOVE TARGET'}\n"
        f"  first run (every score written): score_all {n['first_score_all_s']} s, aggregate "
        f"{n['first_aggregate_s']} s, ratio {n['first_ratio']}"
    )


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leads", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="Ticks; the best counts.")
    parser.add_argument("--postgres", action="store_true", help="Also on a throwaway cluster.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    numbers = {"sqlite": run(args.leads, args.events, args.workdir, args.repeat)}
    if args.postgres:
        numbers["postgresql"] = run_postgres(args.leads, args.events, repeat=args.repeat)
    if args.json:
        print(json.dumps(numbers))
    else:
        print("\n".join(describe(name, n) for name, n in numbers.items()))
    raise SystemExit(0 if all(n["ok"] for n in numbers.values()) else 1)


if __name__ == "__main__":
    main()
