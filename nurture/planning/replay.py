"""``nurture replay``: run a version of a campaign over the recorded history, in a scratch copy.

The replay never touches the live database or SMTP. It copies the leads, accounts,
suppressions, stage changes and events it needs into a scratch SQLite file, then ticks
the campaign there from ``since`` to ``until`` with the injected clock. Everything
recorded arrives in the scratch copy when it happened: a lead when it was created, an
event when it occurred, a suppression or a stage change when it was made. So the recorded
events drive the branches and exits. An open or click on a real message of this campaign
is tied to the replay's message of the same lead and step (and dropped when the replay
did not send that step: it could not have happened). What the replay queues counts as
sent; nothing is rendered or mailed.

Limits, said plainly: a lead's fields other than its stage are today's; events before
``since`` count for scoring and "ever" rules but are tied to no message.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from nurture.engagement.scoring import score_all
from nurture.journey.sequences import advance_due, enroll, sync_campaigns
from nurture.message.sources import template_sources
from nurture.spec.schema import CampaignSpec, ScoringSpec
from nurture.store.db import make_engine, session_scope, upgrade
from nurture.store.models import (
    Account,
    Campaign,
    CampaignVersion,
    Delivery,
    DeliveryStatus,
    Event,
    Lead,
    StageTransition,
    Suppression,
)

# Engagement with a message: only possible when the replay sent that message too.
_ON_A_MESSAGE = {"opened", "clicked"}
_BATCH = 1000

Key = tuple[str, str | None]  # (step, variant)


@dataclass
class ReplayResult:
    """What the replayed version would have sent, beside what was actually sent."""

    campaign: str
    version: str
    since: datetime
    until: datetime
    ticks: int = 0
    replayed: dict[Key, int] = field(default_factory=dict)
    actual: dict[Key, int] = field(default_factory=dict)
    dropped_events: int = 0

    def rows(self) -> list[tuple[str, str | None, int, int]]:
        """(step, variant, replayed, actual), in step then variant order."""
        keys = sorted(set(self.replayed) | set(self.actual), key=lambda k: (k[0], k[1] or ""))
        return [(s, v, self.replayed.get((s, v), 0), self.actual.get((s, v), 0)) for s, v in keys]

    def as_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "campaign": self.campaign,
            "version": self.version,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "ticks": self.ticks,
            "dropped_events": self.dropped_events,
            "steps": [
                {"step": s, "variant": v, "replayed": r, "actual": a, "delta": r - a}
                for s, v, r, a in self.rows()
            ],
            "replayed_total": sum(self.replayed.values()),
            "actual_total": sum(self.actual.values()),
        }


def stored_spec(engine: Engine, name: str, version: int | None = None) -> tuple[CampaignSpec, str]:
    """A stored version of campaign ``name`` (default: the current one), and its label.

    Raises:
        ValueError: no such campaign, or no stored spec for that version.
    """
    with session_scope(engine) as session:
        row = session.scalars(select(Campaign).where(Campaign.name == name)).first()
        if row is None:
            raise ValueError(f"no stored campaign {name!r}")
        if version is None or version == row.version:
            return CampaignSpec.model_validate(row.spec), f"v{row.version} (stored)"
        spec = session.scalar(
            select(CampaignVersion.spec).where(
                CampaignVersion.campaign_id == row.id, CampaignVersion.version == version
            )
        )
        if spec is None:
            raise ValueError(
                f"campaign {name!r} has no stored spec for version {version} "
                f"(versions 1 to {row.version}; specs are kept from this release on)"
            )
        return CampaignSpec.model_validate(spec), f"v{version} (stored)"


def template_note(
    engine: Engine, name: str, version: int | None, templates_dir: Path, spec: CampaignSpec
) -> tuple[str, list[str]]:
    """How a stored version's template sources compare with the working copy's.

    Returns a status (``same``, ``differ``, ``unavailable``: stored before sources were
    kept, or no such version) and the files that differ.
    """
    with session_scope(engine) as session:
        row = session.scalars(select(Campaign).where(Campaign.name == name)).first()
        if row is None:
            return "unavailable", []
        kept = session.scalar(
            select(CampaignVersion.templates).where(
                CampaignVersion.campaign_id == row.id,
                CampaignVersion.version == (version or row.version),
            )
        )
    if kept is None:
        return "unavailable", []
    now = template_sources(templates_dir, spec.templates())
    differ = sorted(k for k in set(kept) | set(now) if kept.get(k) != now.get(k))
    return ("differ" if differ else "same"), differ


def _rows(session: Any, model: Any, where: Any = None) -> list[dict[str, Any]]:
    table = model.__table__
    query = select(table)
    if where is not None:
        query = query.where(where)
    return [dict(r._mapping) for r in session.execute(query.order_by(table.c.id))]


def _insert(engine: Engine, model: Any, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), _BATCH):
        with session_scope(engine) as session:
            session.execute(insert(model.__table__), rows[start : start + _BATCH])


def replay(
    engine: Engine,
    spec: CampaignSpec,
    *,
    since: datetime,
    until: datetime,
    workdir: Path,
    scoring: ScoringSpec | None = None,
    every: timedelta = timedelta(hours=1),
    version: str = "working copy",
) -> ReplayResult:
    """Replay ``spec`` over the recorded history in ``[since, until]``, ticking ``every``.

    Reads the live ``engine`` only; all writes go to a scratch SQLite file in ``workdir``.
    """
    if since >= until:
        raise ValueError("since must be before until")
    if every <= timedelta(0):
        raise ValueError("the tick interval must be positive")
    result = ReplayResult(campaign=spec.name, version=version, since=since, until=until)
    scoring = scoring or ScoringSpec()
    with session_scope(engine) as live:
        cid = live.scalar(select(Campaign.id).where(Campaign.name == spec.name))
        if cid is not None:
            for step, variant, n in live.execute(
                select(Delivery.step_id, Delivery.variant, func.count())
                .where(
                    Delivery.campaign_id == cid,
                    Delivery.status.in_([DeliveryStatus.sent.value, DeliveryStatus.unknown.value]),
                    Delivery.queued_at >= since,
                    Delivery.queued_at <= until,
                )
                .group_by(Delivery.step_id, Delivery.variant)
            ):
                result.actual[(step, variant)] = n
        accounts = _rows(live, Account)
        leads = _rows(live, Lead, Lead.created_at <= until)
        suppressions = _rows(live, Suppression, Suppression.created_at < until)
        transitions = list(
            live.execute(
                select(StageTransition.occurred_at, StageTransition.lead_id,
                       StageTransition.to_stage, StageTransition.from_stage)
                .where(StageTransition.occurred_at > since, StageTransition.occurred_at < until)
                .order_by(StageTransition.occurred_at, StageTransition.id)
            )
        )  # fmt: skip
        event_cols = [c for c in Event.__table__.c if c.name not in ("id", "delivery_id")]
        events = [
            (dict(zip([c.name for c in event_cols], row[:-3], strict=True)), row[-3:])
            for row in live.execute(
                select(*event_cols, Delivery.campaign_id, Delivery.lead_id, Delivery.step_id)
                .outerjoin(Delivery, Delivery.id == Event.delivery_id)
                .where(Event.occurred_at <= until)
                .order_by(Event.occurred_at, Event.id)
            )
        ]
    # Each lead's stage as it was at ``since``: the from-stage of its first later change.
    first_from: dict[int, str] = {}
    for _, lead_id, _to, from_stage in transitions:
        if from_stage is not None:
            first_from.setdefault(lead_id, from_stage)
    for lead in leads:
        lead["lifecycle_stage"] = first_from.get(lead["id"], lead["lifecycle_stage"])
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "replay.db"
    for leftover in workdir.glob("replay.db*"):
        leftover.unlink()
    scratch = make_engine(f"sqlite:///{path}")
    try:
        upgrade(scratch)
        _run(scratch, spec, result, scoring, every, accounts, leads, suppressions, transitions,
             events, cid)  # fmt: skip
    finally:
        scratch.dispose()
    return result


def _run(
    scratch: Engine,
    spec: CampaignSpec,
    result: ReplayResult,
    scoring: ScoringSpec,
    every: timedelta,
    accounts: list[dict[str, Any]],
    leads: list[dict[str, Any]],
    suppressions: list[dict[str, Any]],
    transitions: list[Any],
    events: list[tuple[dict[str, Any], Any]],
    live_cid: int | None,
) -> None:
    since, until = result.since, result.until
    _insert(scratch, Account, accounts)
    with session_scope(scratch) as session:
        (ref,) = sync_campaigns(session, [spec.model_copy(update={"active": True})], since)
    uses_scores = '"score"' in spec.model_dump_json(by_alias=True)
    # Cursors into the time-ordered history: each tick adds what happened before it.
    leads.sort(key=lambda r: r["created_at"])
    suppressions.sort(key=lambda r: r["created_at"])
    li = si = ti = ei = 0
    present: set[int] = set()
    t = since
    while t <= until:
        # Leads and events recorded by the tick's instant; suppressions and stage changes made
        # strictly before it (one made at a tick's instant was made by that tick, after it sent).
        new_leads = []
        while li < len(leads) and leads[li]["created_at"] <= t:
            new_leads.append(leads[li])
            present.add(leads[li]["id"])
            li += 1
        _insert(scratch, Lead, new_leads)
        new_supp = []
        while si < len(suppressions) and suppressions[si]["created_at"] < t:
            new_supp.append({k: v for k, v in suppressions[si].items() if k != "id"})
            si += 1
        _insert(scratch, Suppression, new_supp)
        with session_scope(scratch) as session:
            while ti < len(transitions) and transitions[ti][0] < t:
                _, lead_id, to_stage, _ = transitions[ti]
                session.execute(
                    update(Lead).where(Lead.id == lead_id).values(lifecycle_stage=to_stage)
                )
                ti += 1
            batch: list[dict[str, Any]] = []
            while ei < len(events) and events[ei][0]["occurred_at"] <= t:
                row, (d_campaign, d_lead, d_step) = events[ei]
                ei += 1
                row = dict(row, delivery_id=None)
                if row["lead_id"] not in present:  # a lead created after its event: unusable
                    result.dropped_events += 1
                    continue
                recent = row["occurred_at"] >= since
                if recent and d_campaign is not None and d_campaign == live_cid:
                    row["delivery_id"] = session.scalar(
                        select(Delivery.id).where(
                            Delivery.lead_id == d_lead,
                            Delivery.step_id == d_step,
                            Delivery.status == DeliveryStatus.sent.value,
                        )
                    )
                    if row["delivery_id"] is None and row["type"] in _ON_A_MESSAGE:
                        result.dropped_events += 1
                        continue
                batch.append(row)
            if batch:
                session.execute(insert(Event), batch)
        with session_scope(scratch) as session:
            enroll(session, ref, t)
        advance_due(scratch, ref, t)
        with session_scope(scratch) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.status == DeliveryStatus.queued.value)
                .values(status=DeliveryStatus.sent.value, sent_at=t, updated_at=t)
            )
        if uses_scores:
            score_all(scratch, scoring, t)
        result.ticks += 1
        t += every
    counts: dict[Key, int] = defaultdict(int)
    with session_scope(scratch) as session:
        for step, variant, n in session.execute(
            select(Delivery.step_id, Delivery.variant, func.count())
            .where(Delivery.status == DeliveryStatus.sent.value)
            .group_by(Delivery.step_id, Delivery.variant)
        ):
            counts[(step, variant)] += n
    result.replayed = dict(counts)
