"""Pull-back: stage changes made in the CRM become stage transitions here.

``sync_stage_changes`` asks a connector for the changes since a high-water mark (the last
transition this connector caused, minus the connector's own overlap), then, set-based:

- resolves each change to a lead through ``crm_links`` (email only as a fallback);
- keeps the newest change per lead and drops stale ones (not newer than the lead's last
  transition), so overlapping pulls and out-of-order deliveries apply once;
- ignores its own echoes (the stage we pushed coming back) and no-op changes;
- applies per-field ownership: the stage is taken from the CRM only if the CRM owns
  ``lifecycle_stage``;
- moves the leads with one transition each (cause ``crm pull via <name>``).

Campaign rules then react: an ``exit_when`` on ``lifecycle_stage`` stops a sequence for a
won customer, and an audience on ``recycled`` re-nurtures a lost one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from nurture.crm import Connector, StageChange
from nurture.journey.pipeline import move_leads
from nurture.spec.schema import PipelineSpec
from nurture.store.db import session_scope
from nurture.store.models import CrmLink, Lead, Promotion, PromotionStatus, StageTransition

OWNERS = ("crm", "nurture")


def cause_for(connector: str) -> str:
    """The transition cause that marks changes pulled from ``connector``."""
    return f"crm pull via {connector}"


@dataclass
class PlannedMove:
    """One lead that a pulled change moves (what ``--dry-run`` prints)."""

    lead_id: int
    email: str
    from_stage: str
    to_stage: str
    external_id: str
    occurred_at: datetime


@dataclass
class SyncReport:
    """What one pull saw and did."""

    connector: str
    since: datetime | None = None
    pulled: int = 0
    unknown: int = 0
    echoes: int = 0
    stale: int = 0
    unchanged: int = 0
    not_owned: int = 0
    moves: list[PlannedMove] = field(default_factory=list)
    applied: bool = False

    def summary(self) -> dict[str, Any]:
        """Counts for logs and ``--json``."""
        return {
            "connector": self.connector,
            "since": self.since.isoformat() if self.since else None,
            "pulled": self.pulled,
            "moved": len(self.moves),
            "unknown": self.unknown,
            "echoes": self.echoes,
            "stale": self.stale,
            "unchanged": self.unchanged,
            "not_owned": self.not_owned,
            "applied": self.applied,
        }


def high_water_mark(engine: Engine, connector: str) -> datetime | None:
    """When this connector's pulled changes were last applied, or None before the first."""
    with session_scope(engine) as session:
        return session.scalar(
            select(func.max(StageTransition.occurred_at)).where(
                StageTransition.cause == cause_for(connector)
            )
        )


def _resolve(session: Any, name: str, changes: Sequence[StageChange]) -> dict[int, StageChange]:
    """The newest change per lead: by link first, by email only when there is no link."""
    ids = sorted({c.external_id for c in changes})
    by_ext: dict[str, int] = {}
    for start in range(0, len(ids), 500):
        by_ext.update(
            session.execute(
                select(CrmLink.external_id, CrmLink.lead_id).where(
                    CrmLink.connector == name, CrmLink.external_id.in_(ids[start : start + 500])
                )
            ).all()
        )
    emails = sorted({c.email.lower() for c in changes if c.email and c.external_id not in by_ext})
    by_email: dict[str, int] = {}
    for start in range(0, len(emails), 500):
        by_email.update(
            session.execute(
                select(Lead.email, Lead.id).where(Lead.email.in_(emails[start : start + 500]))
            ).all()
        )
    newest: dict[int, StageChange] = {}
    for change in changes:
        lead_id = by_ext.get(change.external_id)
        if lead_id is None and change.email:
            lead_id = by_email.get(change.email.lower())
        if lead_id is None:
            continue
        seen = newest.get(lead_id)
        if seen is None or change.occurred_at > seen.occurred_at:
            newest[lead_id] = change
    return newest


def sync_stage_changes(
    engine: Engine,
    connector: Connector,
    pipeline: PipelineSpec,
    now: datetime,
    *,
    ownership: Mapping[str, str] | None = None,
    dry_run: bool = False,
) -> SyncReport:
    """Pull ``connector``'s stage changes and record them as transitions (unless dry run).

    Args:
        engine: the database.
        connector: any :class:`~nurture.crm.Connector`.
        pipeline: the known stages; a change to an unknown stage is ignored.
        now: the tick's instant (the transitions' time and the next high-water mark).
        ownership: field -> "crm" or "nurture"; ``lifecycle_stage`` defaults to "crm".
        dry_run: plan the moves without writing.
    """
    owners = dict(ownership or {})
    for key, owner in owners.items():
        if owner not in OWNERS:
            raise ValueError(f"ownership.{key}: expected one of {OWNERS}, got {owner!r}")
    name = connector.name
    report = SyncReport(connector=name, since=high_water_mark(engine, name))
    changes = connector.pull(report.since, now)
    report.pulled = len(changes)
    known = set(pipeline.order()) | {s.id for s in pipeline.side_stages}
    with session_scope(engine) as session:
        newest = _resolve(session, name, changes)
        report.unknown = len({c.external_id for c in changes}) - len(newest)
        if owners.get("lifecycle_stage", "crm") != "crm":
            report.not_owned = len(newest)
            return report
        lead_ids = sorted(newest)
        current: dict[int, tuple[str, str]] = {}
        last_move: dict[int, datetime] = {}
        pushed: set[tuple[int, str]] = set()
        for start in range(0, len(lead_ids), 500):
            chunk = lead_ids[start : start + 500]
            for lid, email, stage in session.execute(
                select(Lead.id, Lead.email, Lead.lifecycle_stage).where(Lead.id.in_(chunk))
            ):
                current[lid] = (email, stage)
            last_move.update(
                session.execute(
                    select(StageTransition.lead_id, func.max(StageTransition.occurred_at))
                    .where(StageTransition.lead_id.in_(chunk))
                    .group_by(StageTransition.lead_id)
                ).all()
            )
            pushed.update(
                session.execute(
                    select(Promotion.lead_id, Promotion.stage).where(
                        Promotion.lead_id.in_(chunk),
                        Promotion.connector == name,
                        Promotion.status == PromotionStatus.done.value,
                    )
                ).all()
            )
        by_stage: dict[str, list[int]] = defaultdict(list)
        for lid, change in newest.items():
            email, stage = current[lid]
            if (lid, change.stage) in pushed:
                report.echoes += 1  # the stage we pushed, coming back
            elif change.stage not in known or change.stage == stage:
                report.unchanged += 1
            elif lid in last_move and change.occurred_at <= last_move[lid]:
                report.stale += 1  # older than what we already know
            else:
                report.moves.append(
                    PlannedMove(
                        lid, email, stage, change.stage, change.external_id, change.occurred_at
                    )
                )
                by_stage[change.stage].append(lid)
        if dry_run:
            return report
        for stage, ids in by_stage.items():
            for start in range(0, len(ids), 500):
                move_leads(
                    session,
                    Lead.id.in_(ids[start : start + 500]),
                    stage,
                    cause=cause_for(name),
                    now=now,
                )
        report.applied = True
    return report


@dataclass
class ConnectorStatus:
    """The promotion queue and links of one connector."""

    connector: str
    queued: int = 0
    due: int = 0
    done: int = 0
    parked: int = 0
    links: int = 0
    last_pull: datetime | None = None
    parked_reasons: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts for ``--json``."""
        return {
            "connector": self.connector,
            "queued": self.queued,
            "due": self.due,
            "done": self.done,
            "parked": self.parked,
            "links": self.links,
            "last_pull": self.last_pull.isoformat() if self.last_pull else None,
            "parked_reasons": self.parked_reasons,
        }


def connector_status(engine: Engine, now: datetime, reasons: int = 5) -> dict[str, ConnectorStatus]:
    """Queue counts, links, last pull and a few parked reasons for every connector seen."""
    from nurture.store.sql import at

    out: dict[str, ConnectorStatus] = {}
    with session_scope(engine) as session:
        rows = session.execute(
            select(Promotion.connector, Promotion.status, func.count()).group_by(
                Promotion.connector, Promotion.status
            )
        ).all()
        for name, status, n in rows:
            st = out.setdefault(name, ConnectorStatus(name))
            if status in ("queued", "done", "parked"):
                setattr(st, status, n)
        for name, n in session.execute(
            select(Promotion.connector, func.count())
            .where(Promotion.status == PromotionStatus.queued.value,
                   Promotion.next_attempt_at <= at(now))
            .group_by(Promotion.connector)
        ):  # fmt: skip
            out.setdefault(name, ConnectorStatus(name)).due = n
        for name, n in session.execute(
            select(CrmLink.connector, func.count()).group_by(CrmLink.connector)
        ):
            out.setdefault(name, ConnectorStatus(name)).links = n
        for name, st in out.items():
            st.last_pull = session.scalar(
                select(func.max(StageTransition.occurred_at)).where(
                    StageTransition.cause == cause_for(name)
                )
            )
            st.parked_reasons = [
                f"lead {lid}: {err}"
                for lid, err in session.execute(
                    select(Promotion.lead_id, Promotion.last_error)
                    .where(Promotion.connector == name,
                           Promotion.status == PromotionStatus.parked.value)
                    .order_by(Promotion.id)
                    .limit(reasons)
                )
            ]  # fmt: skip
    return out


def due_promotions(engine: Engine, connector: str, now: datetime, limit: int = 1000) -> list[Any]:
    """The promotions a push would send now (what ``nurture crm push --dry-run`` prints)."""
    from nurture.store.sql import at

    with session_scope(engine) as session:
        return list(
            session.execute(
                select(Promotion.id, Promotion.lead_id, Lead.email, Promotion.stage,
                       Promotion.attempts, CrmLink.external_id)
                .join(Lead, Lead.id == Promotion.lead_id)
                .outerjoin(CrmLink, (CrmLink.lead_id == Lead.id)
                           & (CrmLink.connector == connector))
                .where(Promotion.connector == connector,
                       Promotion.status == PromotionStatus.queued.value,
                       Promotion.next_attempt_at <= at(now))
                .order_by(Promotion.next_attempt_at, Promotion.id)
                .limit(limit)
            ).all()
        )  # fmt: skip
