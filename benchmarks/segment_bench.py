"""Segment + enroll throughput: a campaign audience over N leads, against hand-written SQL.

Run: ``python -m benchmarks.segment_bench --leads 100000``. On a fresh SQLite database of
seeded synthetic leads it times ``sync_campaigns`` + ``enroll`` of a B2B campaign (the
audience rule compiled to SQL, suppression and re-entry checks, one ``INSERT ... SELECT``).
The floor is one hand-written ``INSERT ... SELECT`` with the same predicate and no
suppression or re-entry check, on a copy of the same database. The two must enroll the
same number of leads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.tick_bench import NOW, fresh_database
from nurture.journey.sequences import enroll, sync_campaigns
from nurture.spec.schema import CampaignSpec
from nurture.store.db import make_engine, session_scope

AUDIENCE = """
name: bench-b2b-audience
audience:
  all:
    - {field: source, op: in, value: [website, social, marketplace, partner]}
    - {field: attributes.type, op: eq, value: b2b}
    - {field: lifecycle_stage, op: in, value: [subscriber, lead]}
steps:
  - id: welcome
    template: b2b/welcome
"""

HAND_WRITTEN = """
INSERT INTO enrollments (campaign_id, lead_id, cycle, status, step_id, due_at, enrolled_at)
SELECT 1, id, 1, 'active', 'welcome', :now, :now FROM leads
WHERE source IN ('website', 'social', 'marketplace', 'partner')
  AND json_extract(attributes, '$.type') = 'b2b'
  AND lifecycle_stage IN ('subscriber', 'lead')
"""


def _hand_written(db: Path) -> tuple[float, int]:
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO campaigns (id, name, spec, spec_hash, version, active, created_at,"
            " updated_at) VALUES (1, 'floor', '{}', 'x', 1, 1, :now, :now)",
            {"now": NOW.isoformat()},
        )
        conn.commit()
        start = time.perf_counter()
        count = conn.execute(HAND_WRITTEN, {"now": NOW.isoformat()}).rowcount
        conn.commit()
        return time.perf_counter() - start, count


def run(leads: int, workdir: Path, *, base: Path | None = None) -> dict[str, Any]:
    """Time our enroll and the hand-written SQL over the same ``leads`` synthetic leads."""
    workdir.mkdir(parents=True, exist_ok=True)
    ours_db, floor_db = workdir / "segment.db", workdir / "segment_floor.db"
    if base is None:
        fresh_database(ours_db, leads).dispose()
    else:
        shutil.copyfile(base, ours_db)
    shutil.copyfile(ours_db, floor_db)
    spec = CampaignSpec.model_validate(yaml.safe_load(AUDIENCE))
    engine = make_engine(f"sqlite:///{ours_db}")
    start = time.perf_counter()
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [spec], NOW)
        enrolled = enroll(session, ref, NOW)
    ours_s = time.perf_counter() - start
    engine.dispose()
    floor_s, floor_count = _hand_written(floor_db)
    if enrolled != floor_count or not enrolled:
        raise AssertionError(f"enroll took {enrolled} leads, the hand-written SQL {floor_count}")
    ours_rate, floor_rate = leads / ours_s, leads / floor_s
    return {
        "leads": leads,
        "enrolled": enrolled,
        "enroll_s": round(ours_s, 3),
        "floor_s": round(floor_s, 3),
        "leads_per_s": round(ours_rate),
        "floor_leads_per_s": round(floor_rate),
        "ratio": round(ours_rate / floor_rate, 3),
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
