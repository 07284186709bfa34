"""Import throughput against email-validator alone, on a seeded synthetic CSV.

Run: ``python -m benchmarks.import_bench --rows 100000``. The floor is an import rate of
at least 0.6x the rate of validating the same emails with email-validator and nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from email_validator import validate_email

from nurture.intake.leads import import_leads
from nurture.store.db import make_engine, upgrade

FLOOR = 0.6
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Linus", "Ken"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson"]
ZONES = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC", "Europe/Berlin"]
COUNTRIES = ["FR", "US", "JP", "DE", "GB", "ES"]
SOURCES = ["website", "social", "marketplace", "partner", "franchise", "sales"]
FREE = ["gmail.com", "outlook.com", "yahoo.com"]


def write_csv(path: Path, rows: int, seed: int = 42) -> list[str]:
    """Write ``rows`` synthetic leads to ``path`` and return their emails."""
    rng = random.Random(seed)
    emails = []
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(
            [
                "Email",
                "First Name",
                "Last Name",
                "Company",
                "Country",
                "Time Zone",
                "Source",
                "Job Title",
                "Industry",
            ]
        )
        for i in range(rows):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            company = i % 5000
            domain = rng.choice(FREE) if i % 4 == 0 else f"company{company}.example.com"
            email = f"{first}.{last}{i}@{domain}"
            emails.append(email)
            out.writerow(
                [
                    email,
                    first,
                    last,
                    f"Company {company}",
                    rng.choice(COUNTRIES),
                    rng.choice(ZONES),
                    rng.choice(SOURCES),
                    "Engineer",
                    "Software",
                ]
            )
    return emails


def _time_validator(emails: list[str]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for email in emails:
        validate_email(email, check_deliverability=False)
    return time.perf_counter() - start, time.process_time() - cpu


def run(rows: int, workdir: Path, repeat: int = 1) -> dict[str, Any]:
    """Time email-validator alone and a full import of the same ``rows`` into fresh SQLite.

    Each side runs ``repeat`` times, alternating, and the fastest run counts: a busy
    machine only ever adds time. CPU-time rates are reported too, as a cross-check.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "leads.csv"
    emails = write_csv(source, rows)
    now = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
    validator: list[tuple[float, float]] = []
    imports: list[tuple[float, float]] = []
    for attempt in range(repeat):
        validator.append(_time_validator(emails))
        db = workdir / f"bench{attempt}.db"
        for leftover in workdir.glob(f"{db.name}*"):
            leftover.unlink()
        engine = make_engine(f"sqlite:///{db}")
        upgrade(engine)
        start, cpu = time.perf_counter(), time.process_time()
        result = import_leads(engine, source, now=now)
        imports.append((time.perf_counter() - start, time.process_time() - cpu))
        engine.dispose()
        if result.inserted != rows:
            raise AssertionError(f"expected {rows} inserted, got {result.as_dict()}")
    validator_s, validator_cpu = min(v[0] for v in validator), min(v[1] for v in validator)
    import_s, import_cpu = min(i[0] for i in imports), min(i[1] for i in imports)
    validator_rate = rows / validator_s
    import_rate = rows / import_s
    return {
        "rows": rows,
        "repeat": repeat,
        "validator_rows_per_s": round(validator_rate),
        "import_rows_per_s": round(import_rate),
        "ratio": round(import_rate / validator_rate, 3),
        "cpu_ratio": round(validator_cpu / import_cpu, 3),
        "floor": FLOOR,
        "ok": import_rate / validator_rate >= FLOOR,
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="Runs per side; the best counts.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    if args.workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            numbers = run(args.rows, Path(tmp), args.repeat)
    else:
        numbers = run(args.rows, args.workdir, args.repeat)
    if args.json:
        print(json.dumps(numbers))
    else:
        print(
            f"import {numbers['rows']:,} rows: {numbers['import_rows_per_s']:,} rows/s; "
            f"email-validator alone: {numbers['validator_rows_per_s']:,} rows/s; "
            f"ratio {numbers['ratio']} (CPU time: {numbers['cpu_ratio']}; floor {FLOOR}) "
            f"{'OK' if numbers['ok'] else 'BELOW FLOOR'}"
        )
    raise SystemExit(0 if numbers["ok"] else 1)


if __name__ == "__main__":
    main()
