"""The naive baseline: one Prefect task per lead (render + send), against our tick.

Run: ``python -m benchmarks.baseline_bench --leads 2000``. This is the flow a user would
write by hand: load the leads, then for each lead call a Prefect task that renders the same
template with the same tracking links and sends it with smtplib over a connection of its
own. It runs in Prefect's ephemeral mode; a warm-up flow starts the temporary server
first, so its start-up is not counted. Our side is a whole tick (enroll, queue, send) over
the same number of leads to the same sink. Target: ours >= 15x the naive flow.
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.smtp_bench import start_sink
from benchmarks.tick_bench import NOW, TEMPLATES, fresh_database, make_mailer, tick_once

TARGET = 15.0
_LEADS_SQL = (
    "SELECT l.id, l.email, l.first_name, l.last_name, a.name, l.source, l.country,"
    " l.lifecycle_stage, l.attributes FROM leads l LEFT JOIN accounts a ON a.id = l.account_id"
)


def ensure_prefect_home() -> None:
    """Create ``PREFECT_HOME`` if it is set and missing, before Prefect is imported.

    On a fresh checkout ``make bench`` points it at ``.nurture/prefect``, which nothing has
    made yet; Prefect only warns that it cannot create it, and its ephemeral server then
    fails to start.
    """
    home = os.environ.get("PREFECT_HOME")
    if home:
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)


def naive_flow_seconds(db: Path, host: str, port: int) -> tuple[float, int]:
    """Seconds for the naive per-lead-task flow over every lead in ``db``, and its count."""
    import sqlite3

    ensure_prefect_home()
    from prefect import flow, task
    from prefect.cache_policies import NONE

    from nurture.message.mime import build_message
    from nurture.message.rendering import TemplateStore, lead_context
    from nurture.message.tokens import tracking_links

    store = TemplateStore(TEMPLATES)
    secret, base = "bench-secret-key-0123456789", "https://track.nurture.example"

    @task(cache_policy=NONE)
    def send_one(lead: dict[str, Any]) -> None:
        links = tracking_links(base, lead["id"], lead["id"], secret)
        extra = {"open_pixel_url": links.open_pixel_url}
        ctx = lead_context(
            lead, unsubscribe_url=links.unsubscribe_url, campaign="naive", step="one", extra=extra
        )
        rendered = store.render("b2b/welcome", ctx, link_rewriter=links.rewrite)
        data = build_message(
            rendered,
            from_addr="Nurture Bench <hello@nurture.example>",
            to_addr=lead["email"],
            message_id=f"<naive-{lead['id']}@nurture.example>",
            unsubscribe_url=links.unsubscribe_url,
            date=NOW,
        )
        with smtplib.SMTP(host, port, timeout=30) as conn:
            conn.sendmail("hello@nurture.example", [lead["email"]], data)

    @flow
    def naive(path: str) -> int:
        with sqlite3.connect(path) as conn:
            rows = [
                {
                    "id": r[0], "email": r[1], "first_name": r[2], "last_name": r[3],
                    "company": r[4], "source": r[5], "country": r[6], "lifecycle_stage": r[7],
                    "attributes": json.loads(r[8] or "{}"),
                }
                for r in conn.execute(_LEADS_SQL)
            ]  # fmt: skip
        for lead in rows:
            send_one(lead)
        return len(rows)

    @flow
    def warm_up() -> int:
        return 0

    warm_up()  # starts the ephemeral server, which is not the flow's cost
    start = time.perf_counter()
    count = naive(str(db))
    return time.perf_counter() - start, count


def run(leads: int, workdir: Path, host: str, port: int) -> dict[str, Any]:
    """Time the naive flow and our tick over ``leads`` leads each, on the same sink."""
    workdir.mkdir(parents=True, exist_ok=True)
    # Ours first: after the naive flow, its ephemeral Prefect server (a child process) keeps
    # flushing task-run events for seconds and would compete with our tick for the cores.
    engine = fresh_database(workdir / "ours.db", leads)
    mailer = make_mailer(host, port, 4)
    try:
        ours = tick_once(engine, mailer)
    finally:
        mailer.sender.close()
        engine.dispose()
    if ours["sent"] != leads:
        raise AssertionError(f"our tick sent {ours['sent']}, expected {leads}")
    naive_db = workdir / "naive.db"
    fresh_database(naive_db, leads).dispose()
    naive_s, count = naive_flow_seconds(naive_db, host, port)
    if count != leads:
        raise AssertionError(f"the naive flow handled {count} leads, expected {leads}")
    naive_rate, ours_rate = leads / naive_s, leads / ours["tick_s"]
    return {
        "leads": leads,
        "naive_s": round(naive_s, 2),
        "ours_s": round(ours["tick_s"], 2),
        "naive_leads_per_s": round(naive_rate, 1),
        "ours_leads_per_s": round(ours_rate, 1),
        "speedup": round(ours_rate / naive_rate, 2),
        "target": TARGET,
        "ok": ours_rate / naive_rate >= TARGET,
    }


def main() -> None:
    """Command-line entry point; prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leads", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_sink("smtp-sink") as (host, port):
        print(json.dumps(run(args.leads, Path(tmp), host, port), indent=2))


if __name__ == "__main__":
    main()
