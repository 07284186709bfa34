"""Tick delivery throughput: the outbox (claim, render, MIME, SMTP, record) against smtplib.

Run: ``python -m benchmarks.tick_bench --leads 10000``. The workload is ``leads`` seeded
synthetic leads in a fresh SQLite database, every one enrolled in a one-step campaign, so a
single tick queues and sends one message per lead. The floor is plain smtplib sending
prebuilt copies of the same messages over the same number of connections to the same
Postfix ``smtp-sink`` (``benchmarks.smtp_bench.smtplib_floor``). Target: >= 0.7x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, func, select

from benchmarks.smtp_bench import smtplib_floor, start_sink
from nurture.config import PROJECT_ROOT
from nurture.dev.synthetic import generate, insert_leads
from nurture.journey.sequences import CampaignRef, advance_due, enroll, sync_campaigns
from nurture.message.compose import compose_message
from nurture.message.rendering import TemplateStore
from nurture.outbox.claim import load_deliveries
from nurture.outbox.delivery import Mailer, send_due
from nurture.outbox.smtp_transport import Outgoing, SmtpConfig, SmtpSender
from nurture.spec.schema import CampaignSpec
from nurture.store.db import make_engine, session_scope, upgrade
from nurture.store.models import Delivery, DeliveryStatus

FLOOR = 0.7
TEMPLATES = PROJECT_ROOT / "templates" / "emails"
# A Tuesday at 10:00 UTC: inside every default send window.
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
SEED = 7
FLOOR_SAMPLE = 20_000  # prebuilding every message for the floor would cost as much as the tick

ONE_STEP = """
name: bench-one-step
audience: {field: lifecycle_stage, op: in, value: [subscriber, lead]}
steps:
  - id: welcome
    template: b2b/welcome
"""


def one_step_campaign() -> CampaignSpec:
    """A campaign whose audience is every synthetic lead and whose one step is due now."""
    return CampaignSpec.model_validate(yaml.safe_load(ONE_STEP))


def make_mailer(host: str, port: int, connections: int) -> Mailer:
    """A tracking mailer over the shipped templates, sending to ``host:port``."""
    sender = SmtpSender(SmtpConfig(host=host, port=port, security="plain"), connections=connections)
    return Mailer(
        store=TemplateStore(TEMPLATES),
        sender=sender,
        from_address="Nurture Bench <hello@nurture.example>",
        envelope_from="hello@nurture.example",
        secret="bench-secret-key-0123456789",
        tracking_url="https://track.nurture.example",
        unsubscribe_mailto="unsubscribe@nurture.example",
    )


def fresh_database(path: Path, leads: int, *, chunk: int = 20_000) -> Engine:
    """A new SQLite database at ``path`` holding ``leads`` seeded synthetic leads."""
    for leftover in path.parent.glob(f"{path.name}*"):
        leftover.unlink()
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    for start in range(0, leads, chunk):
        batch = list(generate(min(chunk, leads - start), seed=SEED, start=start))
        insert_leads(engine, batch, NOW)
    return engine


def prebuilt(engine: Engine, mailer: Mailer, count: int) -> list[Outgoing]:
    """The first ``count`` sent deliveries rebuilt byte for byte, for the smtplib floor."""
    with session_scope(engine) as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(Delivery.status == DeliveryStatus.sent.value)
                .order_by(Delivery.id)
                .limit(count)
            )
        )
        rows = load_deliveries(session, ids)
    return [
        Outgoing(
            key=r.id,
            sender=mailer.envelope_from,
            recipient=r.email,
            data=compose_message(mailer, r, NOW),
        )
        for r in rows
    ]


def tick_once(engine: Engine, mailer: Mailer, *, batch_size: int = 500) -> dict[str, Any]:
    """Enroll, queue and send one tick's worth; the seconds of each stage and the counts."""
    started = time.perf_counter()
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [one_step_campaign()], NOW)
        enrolled = enroll(session, CampaignRef(ref.id, ref.spec), NOW)
    enrolled_at = time.perf_counter()
    adv = advance_due(engine, ref, NOW, batch_size=batch_size, mail_domain="nurture.example")
    queued_at = time.perf_counter()
    report = send_due(engine, NOW, mailer, worker="bench:1:x", chunk=batch_size)
    sent_at = time.perf_counter()
    return {
        "enrolled": enrolled,
        "queued": adv.queued,
        "sent": report.sent,
        "failed": report.failed,
        "errors": report.errors,
        "enroll_s": enrolled_at - started,
        "queue_s": queued_at - enrolled_at,
        "send_s": sent_at - queued_at,
        "tick_s": sent_at - started,
    }


def run(
    leads: int,
    workdir: Path,
    host: str,
    port: int,
    *,
    connections: int = 4,
    floor_sample: int = FLOOR_SAMPLE,
    base: Path | None = None,
) -> dict[str, Any]:
    """One tick over ``leads`` due leads against the smtplib floor on the same sink.

    Returns:
        Rates (msgs/s for the send stage, leads/s for the whole tick), the stage times,
        the smtplib floor rate and the ratio.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    setup = time.perf_counter()
    db = workdir / f"tick{leads}.db"
    if base is None:
        engine = fresh_database(db, leads)
    else:  # a copy of the harness's shared database of the same leads
        shutil.copyfile(base, db)
        engine = make_engine(f"sqlite:///{db}")
    setup_s = time.perf_counter() - setup
    mailer = make_mailer(host, port, connections)
    try:
        out = tick_once(engine, mailer)
    finally:
        mailer.sender.close()
    with session_scope(engine) as session:
        sent_rows = session.scalar(
            select(func.count(Delivery.id)).where(Delivery.status == DeliveryStatus.sent.value)
        )
    if out["sent"] != leads or sent_rows != leads:
        raise AssertionError(f"expected {leads} sent, got {out['sent']} ({out['errors']})")
    sample = prebuilt(engine, mailer, min(leads, floor_sample))
    floor_s = min(smtplib_floor(sample, connections, host, port) for _ in range(2))
    engine.dispose()
    floor_rate = len(sample) / floor_s
    send_rate = leads / out["send_s"]
    return {
        **out,
        "leads": leads,
        "connections": connections,
        "setup_s": round(setup_s, 2),
        "send_msgs_per_s": round(send_rate, 1),
        "tick_leads_per_s": round(leads / out["tick_s"], 1),
        "us_per_lead": round(out["tick_s"] / leads * 1e6, 1),
        "smtplib_msgs_per_s": round(floor_rate, 1),
        "floor_sample": len(sample),
        "ratio": round(send_rate / floor_rate, 3),
        "floor": FLOOR,
        "ok": send_rate / floor_rate >= FLOOR,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: one tick against a fresh smtp-sink; prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leads", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--sink", choices=["aiosmtpd", "smtp-sink"], default="smtp-sink")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, start_sink(args.sink) as (host, port):
        result = run(
            args.leads,
            Path(tmp),
            host,
            port,
            connections=args.connections,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
