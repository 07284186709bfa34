"""The benchmark harness: every stage in a process of its own, one table of ratios.

``python -m benchmarks [--size N]`` (or ``make bench [SIZE=N]``) builds one seeded database
of N synthetic leads, then runs each stage as ``python -m benchmarks.harness STAGE ...`` in
a fresh process. A stage prints its numbers as one JSON line, with its own peak memory
(``resource.getrusage``: ``ru_maxrss`` of the stage process, and of its largest child such
as the sink). Throughputs are printed next to their ratio to a floor measured
in the same run, on the same machine, in the same stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MARK = "BENCH-RESULT "
DEFAULT_SIZE = 100_000
BASELINE_LEADS = 2_000
CRM_LEADS = 10_000  # the fake keeps every record in one Python process, behind one lock


# -- stages (each runs in a child process) ---------------------------------------------


def stage_prepare(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """The shared database of ``size`` seeded synthetic leads."""
    from benchmarks.tick_bench import fresh_database

    start = time.perf_counter()
    fresh_database(workdir / f"base{size}.db", size).dispose()
    return {"leads": size, "seconds": round(time.perf_counter() - start, 2)}


def stage_import(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """Import rows/s vs email-validator alone (benchmarks.import_bench)."""
    from benchmarks import import_bench

    return import_bench.run(size, workdir / "import", repeat=1)


def stage_segment(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """Segment + enroll leads/s vs one hand-written INSERT ... SELECT."""
    from benchmarks import segment_bench

    return segment_bench.run(size, workdir / "segment", base=_base(workdir, size))


def stage_plan(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """``nurture plan`` (audience + 14-day forecast) vs the two grouped queries by hand."""
    from benchmarks import plan_bench

    return plan_bench.run(size, workdir / "plan", base=_base(workdir, size))


def stage_tick(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """One tick over ``size`` due leads to smtp-sink vs smtplib on the same messages."""
    from benchmarks import tick_bench
    from benchmarks.smtp_bench import start_sink

    with start_sink("smtp-sink") as (host, port):
        return tick_bench.run(size, workdir / "tick", host, port, base=_base(workdir, size))


def stage_scoring(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """score_all events/s vs one SQL aggregate (benchmarks.scoring_bench, when present)."""
    try:
        from benchmarks import scoring_bench  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        return {"missing": f"benchmarks.scoring_bench: {exc}"}
    # A first run from nothing, then three ticks with new events; the best tick counts.
    return dict(scoring_bench.run(size, size * 10, workdir / "scoring", repeat=3))


def stage_scoring_pg(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """The same scoring comparison on a throwaway PostgreSQL cluster (wall-clock time)."""
    from benchmarks import scoring_bench

    return dict(scoring_bench.run_postgres(size, size * 10, repeat=3))


def stage_crm(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """Promotions pushed to the local HubSpot fake, leads/s, vs raw batch POSTs to it."""
    try:
        from nurture.connectors.hubspot.connector import HubSpotConnector
        from tests.fakes.harness import seed_promotions
        from tests.fakes.hubspot import FakeHubSpot
    except ImportError as exc:
        return {"missing": f"HubSpot connector or fake: {exc}"}
    import httpx

    from benchmarks.tick_bench import NOW
    from nurture.crm.promotions import process_promotions
    from nurture.spec.schema import PipelineSpec
    from nurture.store.db import make_engine, upgrade

    leads = min(size, CRM_LEADS)
    (workdir / "crm").mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{workdir / 'crm' / 'crm.db'}")
    upgrade(engine)
    seed_promotions(engine, NOW, leads, "hubspot")
    with FakeHubSpot() as fake:
        url = fake.start() if fake.server is None else fake.server.url
        connector = HubSpotConnector(token="hs-token", base_url=url)
        start = time.perf_counter()
        report = process_promotions(engine, {"hubspot": connector}, PipelineSpec(), NOW)
        ours_s = time.perf_counter() - start
    pushed = int(getattr(report, "pushed", 0))
    if pushed != leads:
        raise AssertionError(f"pushed {pushed} of {leads}: {report}")
    with FakeHubSpot() as fake:
        assert fake.server is not None
        bodies = [
            {
                "inputs": [
                    {
                        "idProperty": "email",
                        "id": f"person{i}@co{i}.example",
                        "properties": {
                            "email": f"person{i}@co{i}.example",
                            "lifecyclestage": "mql",
                        },
                    }
                    for i in range(first, min(first + 100, leads))
                ]
            }
            for first in range(0, leads, 100)
        ]
        with httpx.Client(
            base_url=fake.server.url, headers={"Authorization": "Bearer hs-token"}, timeout=30
        ) as client:
            start = time.perf_counter()
            for body in bodies:
                client.post("/crm/v3/objects/contacts/batch/upsert", json=body).raise_for_status()
            floor_s = time.perf_counter() - start
    engine.dispose()
    return {
        "leads": leads,
        "push_s": round(ours_s, 3),
        "floor_s": round(floor_s, 3),
        "leads_per_s": round(leads / ours_s, 1),
        "floor_leads_per_s": round(leads / floor_s, 1),
        "ratio": round(floor_s / ours_s, 3),
    }


def stage_baseline(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """Our whole tick vs one Prefect task per lead, at 2,000 leads."""
    from benchmarks import baseline_bench
    from benchmarks.smtp_bench import start_sink

    with start_sink("smtp-sink") as (host, port):
        return baseline_bench.run(BASELINE_LEADS, workdir / "baseline", host, port)


def stage_tracking(size: int, workdir: Path, **_: Any) -> dict[str, Any]:
    """``nurture serve`` clicks/s and p99 under wrk vs a bare Starlette 302 (same uvicorn)."""
    from benchmarks import tracking_bench

    return tracking_bench.run(workdir / "tracking")


STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "prepare": stage_prepare,
    "import": stage_import,
    "segment": stage_segment,
    "plan": stage_plan,
    "tick": stage_tick,
    "scoring": stage_scoring,
    "scoring_pg": stage_scoring_pg,
    "crm": stage_crm,
    "baseline": stage_baseline,
    "tracking": stage_tracking,
}


def _base(workdir: Path, size: int) -> Path | None:
    path = workdir / f"base{size}.db"
    return path if path.exists() else None


def _peak_mib() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_mib": round(own, 1), "child_peak_mib": round(child, 1)}


def stage_main(argv: Sequence[str] | None = None) -> None:
    """Child side: run one stage and print its numbers on one marked JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = STAGES[args.stage](size=args.size, workdir=args.workdir)
    result.update(_peak_mib(), stage_s=round(time.perf_counter() - start, 1))
    print(MARK + json.dumps(result, default=str), flush=True)


# -- parent side -----------------------------------------------------------------------


def run_stage(stage: str, size: int, workdir: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run one stage in a fresh process and return its numbers (or its error).

    The default timeout is 15 minutes per 100,000 leads (at least 15 minutes).
    """
    if timeout is None:
        timeout = 900 * max(1.0, size / 100_000)
    cmd = [sys.executable, "-m", "benchmarks.harness", stage, "--size", str(size)]
    cmd += ["--workdir", str(workdir)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK) :]))
    tail = [line[:300] for line in (proc.stderr or proc.stdout).strip().splitlines()[-3:]]
    return {
        "error": f"exit {proc.returncode}: {' | '.join(tail)}",
        "stage_s": round(time.perf_counter() - start, 1),
    }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:,.2f}{unit}"


def rows_for(results: dict[str, Any], failures: list[str]) -> list[list[str]]:
    """Table rows: stage, size, throughput, floor, ratio, target, verdict, memory, time."""
    rows: list[list[str]] = []

    def mem(r: dict[str, Any]) -> str:
        if "peak_mib" not in r:
            return "-"
        return f"{r['peak_mib']:.0f}/{r['child_peak_mib']:.0f}"

    def add(
        name: str, r: dict[str, Any] | None, cells: Callable[[dict[str, Any]], list[str]]
    ) -> None:
        if r is None:
            return
        if "missing" in r:
            rows.append([name, "-", "not available yet", "-", "-", "-", "-", mem(r), "-"])
        elif "error" in r:
            rows.append([name, "-", "FAILED (below)", "-", "-", "-", "-", "-", "-"])
            failures.append(f"{name}: {r['error']}")
        else:
            rows.append([name, *cells(r), mem(r), f"{r.get('stage_s', 0):.0f}s"])

    def verdict(ok: bool) -> str:
        return "OK" if ok else "MISSED"

    add("import rows/s", results.get("import"), lambda r: [
        f"{r['rows']:,}", _fmt(r["import_rows_per_s"]),
        f"{_fmt(r['validator_rows_per_s'])} email-validator", f"{r['ratio']:.2f}x",
        ">= 0.6x", verdict(r["ok"])])  # fmt: skip
    add("segment+enroll leads/s", results.get("segment"), lambda r: [
        f"{r['leads']:,}", _fmt(r["leads_per_s"]),
        f"{_fmt(r['floor_leads_per_s'])} hand SQL", f"{r['ratio']:.2f}x", "-", "-"])  # fmt: skip
    add("plan leads/s (14 days)", results.get("plan"), lambda r: [
        f"{r['leads']:,}",
        f"{_fmt(r['leads_per_s'])} ({r['plan_s']:.1f} s; "
        f"--rates history {r['plan_history_s']:.1f} s)",
        f"{_fmt(r['floor_leads_per_s'])} grouped SQL", f"{r['ratio']:.2f}x", "<= 10 s",
        verdict(r["ok"])])  # fmt: skip
    tick = results.get("tick")
    add("tick delivery msgs/s", tick, lambda r: [
        f"{r['leads']:,}", _fmt(r["send_msgs_per_s"]),
        f"{_fmt(r['smtplib_msgs_per_s'])} smtplib", f"{r['ratio']:.2f}x", ">= 0.7x",
        verdict(r["ok"])])  # fmt: skip
    add("tick whole leads/s", tick, lambda r: [
        f"{r['leads']:,}", _fmt(r["tick_leads_per_s"]), "-", "-", "-", "-"])  # fmt: skip
    for key, db in (("scoring", "SQLite"), ("scoring_pg", "PostgreSQL")):
        add(f"scoring tick, {db}", results.get(key), lambda r: [
            f"{r['events']:,}+{r['tick_events']:,}", _fmt(r["score_all_events_per_s"]),
            f"{_fmt(r['aggregate_events_per_s'])} SQL aggregate",
            f"{r['ratio']:.2f}x {r['measure']}", f"<= {r['target']:g}x",
            verdict(r["ok"])])  # fmt: skip
        add(f"scoring first run, {db}", results.get(key), lambda r: [
            f"{r['events']:,}", f"{r['first_score_all_s']:.2f} s",
            f"{r['first_aggregate_s']:.2f} s aggregate",
            f"{r['first_ratio']:.2f}x {r['measure']}", "-", "-"])  # fmt: skip
    add("CRM push leads/s", results.get("crm"), lambda r: [
        f"{r['leads']:,}", _fmt(r["leads_per_s"]),
        f"{_fmt(r['floor_leads_per_s'])} raw POSTs", f"{r['ratio']:.2f}x", "-", "-"])  # fmt: skip
    for n, r in sorted(results.get("scale_points", {}).items()):
        add(f"scale tick us/lead @{n:,}", r, lambda r: [
            f"{r['leads']:,}", f"{r['us_per_lead']:,.0f} us", "-", "-", "-", "-"])  # fmt: skip
    scale = results.get("scale")
    if scale:
        rows.append(["scale spread", "-", "-", "-", f"{scale['spread']:.2f}x", "<= 1.5x",
                     verdict(scale["ok"]) if scale["points"] > 1 else "n/a: 1 point",
                     "-", "-"])  # fmt: skip
    add("baseline (1 task/lead)", results.get("baseline"), lambda r: [
        f"{r['leads']:,}", _fmt(r["ours_leads_per_s"]),
        f"{_fmt(r['naive_leads_per_s'])} naive Prefect", f"{r['speedup']:.1f}x", ">= 15x",
        verdict(r["ok"])])  # fmt: skip
    add("tracking clicks/s (50 conn)", results.get("tracking"), lambda r: [
        f"{r['connections']} conn", _fmt(r["ours_rps"]),
        f"{_fmt(r['bare_rps'])} bare Starlette 302", f"{r['ratio']:.2f}x", ">= 0.5x",
        verdict(r["ratio"] >= 0.5)])  # fmt: skip
    add("tracking p99 ms (50 conn)", results.get("tracking"), lambda r: [
        f"{r['connections']} conn", f"{r['ours_p99_ms']:.1f} ms",
        f"{r['bare_p99_ms']:.1f} ms bare", "-", "< 50 ms",
        verdict(r["ours_p99_ms"] < 50 and r["lost"] == 0)])  # fmt: skip
    return rows


HEADER = ["stage", "size", "ours", "floor", "ratio", "target", "verdict", "peak MiB", "time"]


def render_table(rows: list[list[str]]) -> str:
    """A plain fixed-width table."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(HEADER, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parent side: run every stage, print the table (and ``--json`` numbers)."""
    from benchmarks import scale_bench

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="leads (events: 10x)")
    parser.add_argument("--only", nargs="*", choices=[*STAGES, "scale"], help="stages to run")
    parser.add_argument("--workdir", type=Path, help="keep databases here (default: temp)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args(argv)
    wanted = set(args.only or [*STAGES, "scale"])
    started = time.perf_counter()
    print(
        f"nurture benchmarks: {args.size:,} leads, {args.size * 10:,} events, "
        f"{os.cpu_count()} CPUs, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        results: dict[str, Any] = {}
        order = ["prepare", "import", "segment", "plan", "tick", "scoring", "scoring_pg", "crm"]
        order.append("baseline")
        order.append("tracking")
        if {"segment", "plan", "tick", "scale"} & wanted:
            wanted.add("prepare")
        for stage in order:
            if stage not in wanted:
                continue
            print(f"  running {stage} ...", flush=True)
            results[stage] = run_stage(stage, args.size, workdir)
            if stage == "tick" and "scale" in wanted and "error" not in results[stage]:
                results.setdefault("scale_points", {})[args.size] = results[stage]
        if "scale" in wanted:
            points = results.setdefault("scale_points", {})
            for n in scale_bench.points_for(args.size):
                if n not in points:
                    print(f"  running scale tick at {n:,} leads ...", flush=True)
                    points[n] = run_stage("tick", n, workdir)
            good = [p for p in points.values() if "error" not in p]
            results["scale"] = scale_bench.summarise(good)
    print()
    failures: list[str] = []
    print(render_table(rows_for(results, failures)))
    for failure in failures:
        print(f"FAILED {failure}")
    print(
        f"\npeak MiB = stage process / its largest child (the sink); "
        f"total {time.perf_counter() - started:.0f}s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    stage_main()
