"""``nurture plan`` at scale: diff, audience and a 14-day forecast over N leads.

Run: ``python -m benchmarks.plan_bench --leads 100000``. On a SQLite database of seeded
synthetic leads, version 1 of the shipped B2B campaign (its audience narrowed to the
website source) has enrolled its leads, spread over three steps and five due days. The
plan is of the shipped file (the wider audience) with a changed wait and an added
``send_at`` step: it counts who would enter, folds every enrollment into groups and
forecasts 14 days. The floor is the two grouped queries a plan cannot do without, written
by hand (the enrollments per step, due time and zone; the audience count), on the same
database. Target: the plan finishes in seconds (<= 10 s) at 100k leads.

The same plan is then timed with ``rates="history"`` after a recorded history is added:
a welcome sent to every enrolled lead and a case study (two variants) to two thirds of
them, with people's opens on 30% of the welcomes and clicks on 10% of the case studies.
Its target is the same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from benchmarks.tick_bench import NOW, fresh_database
from nurture.config import PROJECT_ROOT
from nurture.journey.sequences import enroll, sync_campaigns
from nurture.planning.plan import build_plan
from nurture.spec.schema import CampaignSpec, load_campaign, load_pipeline
from nurture.store.db import make_engine, session_scope

CAMPAIGNS = PROJECT_ROOT / "campaigns"
SHIPPED = CAMPAIGNS / "b2b-inbound-welcome.yaml"
TARGET_S = 10.0

FLOOR_ENROLLED = """
SELECT e.step_id, e.due_at, l.timezone, a.timezone, l.country, count(*)
FROM enrollments e JOIN leads l ON l.id = e.lead_id LEFT JOIN accounts a ON a.id = l.account_id
WHERE e.campaign_id = :cid AND e.status = 'active'
GROUP BY 1, 2, 3, 4, 5
"""
FLOOR_AUDIENCE = """
SELECT l.timezone, a.timezone, l.country, count(*)
FROM leads l LEFT JOIN accounts a ON a.id = l.account_id
WHERE l.source IN ('website', 'social', 'marketplace', 'partner')
  AND json_extract(l.attributes, '$.type') = 'b2b'
  AND l.lifecycle_stage IN ('subscriber', 'lead')
  AND NOT EXISTS (SELECT 1 FROM enrollments e WHERE e.lead_id = l.id AND e.campaign_id = :cid)
GROUP BY 1, 2, 3
"""


def _versions() -> tuple[CampaignSpec, CampaignSpec]:
    shipped = load_campaign(SHIPPED)
    data = shipped.model_dump(mode="json", by_alias=True, exclude_none=True)
    v1 = dict(data, audience={"all": [*data["audience"]["all"][1:], {
        "field": "source", "op": "eq", "value": "website"}]})  # fmt: skip
    v2 = json.loads(json.dumps(data))
    v2["steps"][1]["wait"] = "3d"
    v2["steps"].insert(
        2, {"id": "webinar", "template": "b2b/welcome", "send_at": "2026-03-10 10:00"}
    )
    return CampaignSpec.model_validate(v1), CampaignSpec.model_validate(v2)


def _spread(db: Path, cid: int) -> None:
    """Put the enrolled leads mid-way: three steps, five due days (one UPDATE each)."""
    with sqlite3.connect(db) as conn:
        for k, step in enumerate(["welcome", "case-study", "demo-offer"]):
            for d in range(5):
                due = (NOW + timedelta(days=d)).replace(tzinfo=None).isoformat(" ")
                conn.execute(
                    "UPDATE enrollments SET step_id = ?, due_at = ? "
                    "WHERE campaign_id = ? AND id % 15 = ?",
                    (step, due, cid, k * 5 + d),
                )
        conn.commit()


def _history(db: Path, cid: int) -> int:
    """Sent welcomes and case studies with opens and clicks (set-based INSERTs)."""
    at = {d: (NOW - timedelta(days=d)).replace(tzinfo=None).isoformat(" ") for d in (10, 8, 7)}
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO deliveries (enrollment_id, campaign_id, lead_id, step_id, template,"
            " variant, domain, status, message_id, attempts, due_at, queued_at, sent_at,"
            " updated_at) SELECT id, campaign_id, lead_id, 'welcome', 'b2b/welcome', NULL,"
            " 'x.example', 'sent', 'w' || id || '@bench', 1, :t, :t, :t, :t"
            " FROM enrollments WHERE campaign_id = :cid",
            {"t": at[10], "cid": cid},
        )
        conn.execute(
            "INSERT INTO deliveries (enrollment_id, campaign_id, lead_id, step_id, template,"
            " variant, domain, status, message_id, attempts, due_at, queued_at, sent_at,"
            " updated_at) SELECT id, campaign_id, lead_id, 'case-study',"
            " CASE id % 2 WHEN 0 THEN 'b2b/case_study_roi' ELSE 'b2b/case_study_story' END,"
            " CASE id % 2 WHEN 0 THEN 'roi' ELSE 'story' END,"
            " 'x.example', 'sent', 'c' || id || '@bench', 1, :t, :t, :t, :t"
            " FROM enrollments WHERE campaign_id = :cid AND id % 3 != 0",
            {"t": at[8], "cid": cid},
        )
        for step, kind, share in (("welcome", "opened", 3), ("case-study", "clicked", 1)):
            conn.execute(
                "INSERT INTO events (lead_id, delivery_id, type, occurred_at, payload,"
                " engagement, counted_human, counted_any) SELECT lead_id, id, :kind, :t, '{}',"
                " 'human', 1, 1 FROM deliveries WHERE step_id = :step AND id % 10 < :share",
                {"kind": kind, "t": at[7], "step": step, "share": share},
            )
        conn.commit()
        return int(conn.execute("SELECT count(*) FROM deliveries").fetchone()[0])


def run(leads: int, workdir: Path, *, base: Path | None = None) -> dict[str, Any]:
    """Time ``build_plan`` of a changed campaign over ``leads`` leads, and the floor."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "plan.db"
    if base is None:
        fresh_database(db, leads).dispose()
    else:
        shutil.copyfile(base, db)
    v1, v2 = _versions()
    engine = make_engine(f"sqlite:///{db}")
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [v1], NOW)
        enrolled = enroll(session, ref, NOW)
    _spread(db, ref.id)
    with engine.connect() as conn:  # the same page cache for both sides
        conn.execute(text("SELECT count(*) FROM leads")).scalar()
    pipeline = load_pipeline(CAMPAIGNS / "pipeline.yaml")
    start = time.perf_counter()
    plan = build_plan(engine, [(SHIPPED, v2)], NOW, days=14, pipeline=pipeline)
    plan_s = time.perf_counter() - start
    engine.dispose()
    (cp,) = plan.campaigns
    sent = _history(db, ref.id)
    engine = make_engine(f"sqlite:///{db}")
    start = time.perf_counter()
    rated = build_plan(engine, [(SHIPPED, v2)], NOW, days=14, pipeline=pipeline, rates="history")
    history_s = time.perf_counter() - start
    engine.dispose()
    (hp,) = rated.campaigns
    sources = {r.source for r in hp.rates}
    if not {"step", "variant"} <= sources or hp.forecast["demo-offer"] == cp.forecast["demo-offer"]:
        raise AssertionError(f"history rates not used: {hp.rates}, {hp.forecast}")
    with sqlite3.connect(db) as conn:
        start = time.perf_counter()
        groups = conn.execute(FLOOR_ENROLLED, {"cid": ref.id}).fetchall()
        entering = conn.execute(FLOOR_AUDIENCE, {"cid": ref.id}).fetchall()
        floor_s = time.perf_counter() - start
    if cp.audience.enrolled != enrolled or sum(r[-1] for r in groups) != enrolled:
        raise AssertionError(f"plan saw {cp.audience.enrolled} enrolled, the floor {enrolled}")
    if cp.audience.would_enter != sum(r[-1] for r in entering) or not cp.total:
        raise AssertionError(f"plan: {cp.audience}, {cp.total} messages")
    return {
        "leads": leads,
        "enrolled": enrolled,
        "would_enter": cp.audience.would_enter,
        "forecast_messages": cp.total,
        "groups": len(groups) + len(entering),
        "plan_s": round(plan_s, 3),
        "floor_s": round(floor_s, 3),
        "leads_per_s": round(leads / plan_s),
        "floor_leads_per_s": round(leads / floor_s),
        "ratio": round(floor_s / plan_s, 3),
        "history_deliveries": sent,
        "history_messages": hp.total,
        "history_demo_offers": sum(hp.forecast["demo-offer"]),
        "demo_offers": sum(cp.forecast["demo-offer"]),
        "plan_history_s": round(history_s, 3),
        "ok": plan_s <= TARGET_S and history_s <= TARGET_S,
    }


def main() -> None:
    """Command-line entry point; prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leads", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(args.leads, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
