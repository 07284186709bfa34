"""Enrollment and due steps: who enters a campaign, and what each due enrollment does next.

The flow of one campaign in one tick:

1. :func:`enroll` inserts every matching lead with one ``INSERT ... SELECT``.
2. :func:`advance_due` takes due enrollments in batches. For each batch it exits the ones
   whose exit rule holds (or who are suppressed), defers the ones outside their send window
   to the window's next opening in their own time zone, evaluates branches as one SQL query
   per arm, and queues one delivery per (enrollment, step) in the outbox. The unique key on
   that pair is what makes a second copy of a step impossible, whatever else goes wrong.
"""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Engine, and_, exists, func, literal, or_, select, update
from sqlalchemy.orm import Session, aliased

from nurture.journey.pauses import held_campaign_ids, is_paused
from nurture.journey.schedule import (
    arrive,
    choose_variant,
    effective_zone,
    next_opening,
    variant_label,
)
from nurture.journey.segments import RuleContext, compile_rule
from nurture.message.mime import message_id
from nurture.spec.rules import parse_duration
from nurture.spec.schema import Action, CampaignSpec, Step
from nurture.store.consent import enroll_filters
from nurture.store.db import session_scope
from nurture.store.models import (
    Account,
    Campaign,
    CampaignVersion,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Lead,
    OptIn,
    Suppression,
)
from nurture.store.sql import at, bulk_update, insert_for, inserted, is_postgres
from nurture.store.suppression import suppress


@dataclass(frozen=True)
class CampaignRef:
    """A campaign's database id with its validated spec."""

    id: int
    spec: CampaignSpec

    @property
    def name(self) -> str:
        """The campaign's name."""
        return self.spec.name


@dataclass
class AdvanceResult:
    """What :func:`advance_due` did in one campaign."""

    queued: int = 0
    exited: int = 0
    deferred: int = 0
    completed: int = 0
    jumped: int = 0
    sunset: int = 0  # suppressed by a branch arm's ``suppress: true``
    by_step: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def sync_campaigns(
    session: Session,
    specs: Iterable[CampaignSpec],
    now: datetime,
    templates: Mapping[str, Mapping[str, str]] | None = None,
) -> list[CampaignRef]:
    """Store each spec; a changed spec bumps the campaign's version. Returns active campaigns.

    ``templates`` maps a campaign name to its template sources (file -> source). When
    given, they are stored with the version and a change to them bumps the version too.
    A version stored before sources were kept (NULL) gets today's, without a bump: what
    it sent with before is unknown, so no change can be told.
    """
    specs = list(specs)
    existing = {c.name: c for c in session.scalars(select(Campaign))}
    current = {
        v.campaign_id: v
        for v in session.scalars(
            select(CampaignVersion)
            .join(Campaign, Campaign.id == CampaignVersion.campaign_id)
            .where(CampaignVersion.version == Campaign.version)
        )
    }
    refs: list[CampaignRef] = []
    for spec in specs:
        digest = spec.digest()
        sources = dict(templates[spec.name]) if templates and spec.name in templates else None
        row = existing.get(spec.name)
        if row is None:
            row = Campaign(
                name=spec.name,
                spec=spec.model_dump(mode="json", by_alias=True),
                spec_hash=digest,
                version=1,
                active=spec.active,
                topic=spec.topic,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            session.add(
                CampaignVersion(
                    campaign_id=row.id,
                    version=1,
                    spec_hash=digest,
                    spec=row.spec,
                    templates=sources,
                    created_at=now,
                )
            )
            if spec.active:
                refs.append(CampaignRef(id=row.id, spec=spec))
            continue
        version = current.get(row.id)
        stored = version.templates if version is not None else None
        if sources is not None and version is not None and stored is None:
            version.templates = sources
        bump = row.spec_hash != digest or (
            sources is not None and stored is not None and stored != sources
        )
        if bump or row.active != spec.active:
            if bump:
                # The version history is what campaign health is judged on: close the old one.
                session.execute(
                    update(CampaignVersion)
                    .where(
                        CampaignVersion.campaign_id == row.id,
                        CampaignVersion.retired_at.is_(None),
                    )
                    .values(retired_at=now)
                )
                session.add(
                    CampaignVersion(
                        campaign_id=row.id,
                        version=row.version + 1,
                        spec_hash=digest,
                        spec=spec.model_dump(mode="json", by_alias=True),
                        templates=sources,
                        created_at=now,
                    )
                )
            row.spec = spec.model_dump(mode="json", by_alias=True)
            row.version += bump
            row.spec_hash = digest
            row.active = spec.active
            row.topic = spec.topic
            row.updated_at = now
        if spec.active:
            refs.append(CampaignRef(id=row.id, spec=spec))
    return refs


def _not_suppressed() -> Any:
    return ~exists(select(Suppression.id).where(Suppression.email == Lead.email))


def entry_conditions(
    spec: CampaignSpec, campaign_id: int, now: datetime
) -> tuple[ColumnElement[bool], Any]:
    """Which leads (a condition over ``Lead``) may enter the campaign at ``now``, and the
    cycle number their enrollment gets: the audience, not suppressed, and re-entry allowed.

    ``nurture plan`` counts with the same condition that :func:`enroll` inserts with.
    """
    ctx = RuleContext(now=now, campaign_id=campaign_id)
    prior = aliased(Enrollment)
    same = and_(prior.campaign_id == campaign_id, prior.lead_id == Lead.id)
    if spec.reentry == "never":
        may_enter = ~exists(select(prior.id).where(same))
        cycle: Any = literal(1)
    else:
        cooldown = parse_duration(spec.reentry.after)
        may_enter = and_(
            ~exists(
                select(prior.id).where(
                    same,
                    or_(
                        prior.status == EnrollmentStatus.active.value,
                        prior.ended_at > at(now - cooldown),
                    ),
                )
            ),
        )
        cycle = select(func.coalesce(func.max(prior.cycle), 0) + 1).where(same).scalar_subquery()
    entry = and_(
        compile_rule(spec.audience, ctx), _not_suppressed(), may_enter, *enroll_filters(spec.topic)
    )
    return entry, cycle


def enroll(
    session: Session, campaign: CampaignRef, now: datetime, *, created_since: datetime | None = None
) -> int:
    """Enroll every lead matching the audience who may (re-)enter. One INSERT ... SELECT.

    ``created_since`` limits it to the leads captured, or whose double opt-in was
    confirmed, since then (the first-touch pass: it stays small however big the database;
    the regular tick enrolls everyone).
    """
    spec = campaign.spec
    # Outside its enrollment window (starts_at/ends_at), paused or stopped: nobody enters.
    if not spec.enrolling(now) or spec.stopped(now) or is_paused(session, campaign.id):
        return 0
    entry, cycle = entry_conditions(spec, campaign.id, now)
    if created_since is not None:
        confirmed = select(OptIn.lead_id).where(OptIn.confirmed_at >= at(created_since))
        entry = and_(or_(Lead.created_at >= at(created_since), Lead.id.in_(confirmed)), entry)
    first = spec.steps[0]
    wait = first.wait_spec
    # Weekday waits depend on the lead's zone; they are fixed up per zone right after.
    due = now + wait.delay
    query = select(
        literal(campaign.id),
        Lead.id,
        cycle,
        literal(EnrollmentStatus.active.value),
        literal(first.id),
        at(due),
        at(now),
    ).where(entry)
    stmt = insert_for(session, Enrollment).from_select(
        ["campaign_id", "lead_id", "cycle", "status", "step_id", "due_at", "enrolled_at"], query
    )
    count = inserted(session, stmt, Enrollment.id)
    if count and (wait.weekday is not None or first.send_at is not None):
        _fix_zoned_waits(session, campaign, first, now)
    return count


def _fix_zoned_waits(session: Session, campaign: CampaignRef, step: Step, now: datetime) -> None:
    """Weekday waits and send_at anchors of the first step depend on each lead's zone."""
    rows = session.execute(
        select(Enrollment.id, Lead.timezone, Account.timezone, Lead.country)
        .join(Lead, Lead.id == Enrollment.lead_id)
        .outerjoin(Account, Account.id == Lead.account_id)
        .where(
            Enrollment.campaign_id == campaign.id,
            Enrollment.enrolled_at == at(now),
            Enrollment.step_id == step.id,
        )
    ).all()
    default = default_timezone(campaign.spec)
    updates: list[dict[str, Any]] = []
    for eid, ltz, atz, cc in rows:
        target, due = arrive(campaign.spec, step.id, now, effective_zone(ltz, atz, cc, default))
        if target is None:  # every anchored step has passed for this lead
            updates.append(
                {
                    "id": eid,
                    "status": EnrollmentStatus.completed.value,
                    "step_id": None,
                    "due_at": None,
                    "ended_at": now,
                }
            )
        else:
            updates.append({"id": eid, "step_id": target, "due_at": due})
    if updates:
        bulk_update(session, Enrollment, updates)


def default_timezone(spec: CampaignSpec) -> str:
    return spec.send_window.default_timezone if spec.send_window else "UTC"


@dataclass
class _Due:
    enrollment_id: int
    lead_id: int
    step_id: str
    zone: ZoneInfo
    email: str


def _claim_due(
    session: Session,
    campaign: CampaignRef,
    now: datetime,
    limit: int,
    enrolled_since: datetime | None = None,
) -> list[_Due]:
    query = (
        select(Enrollment.id, Enrollment.lead_id, Enrollment.step_id, Lead.timezone, Lead.country)
        .add_columns(Account.timezone, Lead.email)
        .join(Lead, Lead.id == Enrollment.lead_id)
        .outerjoin(Account, Account.id == Lead.account_id)
        .where(
            Enrollment.campaign_id == campaign.id,
            Enrollment.status == EnrollmentStatus.active.value,
            Enrollment.due_at <= at(now),
        )
        .order_by(Enrollment.due_at, Enrollment.id)
        .limit(limit)
    )
    if enrolled_since is not None:  # the first-touch pass: new enrollments only
        query = query.where(Enrollment.enrolled_at >= at(enrolled_since))
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True, of=Enrollment)
    default = default_timezone(campaign.spec)
    return [
        _Due(eid, lid, sid, effective_zone(ltz, atz, cc, default), email)
        for eid, lid, sid, ltz, cc, atz, email in session.execute(query).all()
    ]


_ENROLLMENT_ID = cast(ColumnElement[int], Enrollment.id)


def _ids_where(
    session: Session, ids: Sequence[int], rule: Any, ctx_now: datetime, cid: int
) -> set[int]:
    """Which of these enrollments' leads satisfy ``rule`` (one query)."""
    ctx = RuleContext(now=ctx_now, campaign_id=cid, enrollment_id=_ENROLLMENT_ID)
    query = (
        select(Enrollment.id)
        .join(Lead, Lead.id == Enrollment.lead_id)
        .where(Enrollment.id.in_(ids), compile_rule(rule, ctx))
    )
    return set(session.scalars(query))


def _suppressed(session: Session, ids: Sequence[int]) -> set[int]:
    query = (
        select(Enrollment.id)
        .join(Lead, Lead.id == Enrollment.lead_id)
        .join(Suppression, Suppression.email == Lead.email)
        .where(Enrollment.id.in_(ids))
    )
    return set(session.scalars(query))


def _route(
    session: Session, campaign: CampaignRef, step: Step, items: list[_Due], now: datetime
) -> list[tuple[_Due, Action | None]]:
    """Each enrollment's action at a step: the step, a branch arm, or None (fall through)."""
    if not step.branch:
        plain = Action(template=step.template, variants=step.variants)
        return [(d, plain) for d in items]
    remaining = {d.enrollment_id: d for d in items}
    routed: list[tuple[_Due, Action | None]] = []
    for arm in step.branch:
        if not remaining:
            break
        if arm.when is None:
            matched = set(remaining)
        else:
            matched = _ids_where(session, list(remaining), arm.when, now, campaign.id)
        for eid in matched:
            routed.append((remaining.pop(eid), arm))
    routed.extend((d, None) for d in remaining.values())
    return routed


def advance_due(
    engine: Engine,
    campaign: CampaignRef,
    now: datetime,
    *,
    batch_size: int = 500,
    mail_domain: str = "nurture.local",
    enrolled_since: datetime | None = None,
) -> AdvanceResult:
    """Move every due enrollment of one campaign forward, one transaction per batch.

    ``enrolled_since`` limits the pass to enrollments made since then (the first-touch
    pass for new leads); the rules are the same: exits, send windows, one row per step.
    """
    result = AdvanceResult()
    spec = campaign.spec
    window = spec.send_window
    with session_scope(engine) as session:
        # A paused campaign (or one past its stop_at) stands still: its leads stay on their
        # step, due, and move on at the first tick after it is resumed.
        if campaign.id in held_campaign_ids(session, now):
            return result
    # Each pass strictly moves rows out of "due now"; no zero-wait goto cycles exist (specs
    # validates that), so the number of passes is bounded by the number of steps.
    for _ in range(10_000):
        with session_scope(engine) as session:
            batch = _claim_due(session, campaign, now, batch_size, enrolled_since)
            if not batch:
                break
            _advance_batch(session, campaign, batch, now, window, result, mail_domain)
    return result


def _advance_batch(
    session: Session,
    campaign: CampaignRef,
    batch: list[_Due],
    now: datetime,
    window: Any,
    result: AdvanceResult,
    mail_domain: str,
) -> None:
    spec = campaign.spec
    ids = [d.enrollment_id for d in batch]
    # 1. Suppression always wins, then the campaign's exit rule (checked before every send).
    ended: dict[int, str] = dict.fromkeys(_suppressed(session, ids), "suppressed")
    if spec.exit_when is not None:
        for eid in _ids_where(session, ids, spec.exit_when, now, campaign.id):
            ended.setdefault(eid, "exit_when")
    if ended:
        bulk_update(
            session,
            Enrollment,
            [
                {
                    "id": eid,
                    "status": EnrollmentStatus.exited.value,
                    "ended_at": now,
                    "exit_reason": why,
                    "due_at": None,
                }
                for eid, why in ended.items()
            ],
        )
        result.exited += len(ended)
    live = [d for d in batch if d.enrollment_id not in ended]
    # 2. Send windows, in each lead's own zone.
    deferred: list[dict[str, Any]] = []
    ready: list[_Due] = []
    openings: dict[ZoneInfo, datetime] = {}
    for d in live:
        opening = openings.get(d.zone)
        if opening is None:
            opening = openings[d.zone] = next_opening(now, d.zone, window)
        if opening > now:
            deferred.append({"id": d.enrollment_id, "due_at": opening})
        else:
            ready.append(d)
    if deferred:
        bulk_update(session, Enrollment, deferred)
        result.deferred += len(deferred)
    # 3. Route per step (branches are one query per arm), queue deliveries, advance.
    by_step: dict[str, list[_Due]] = defaultdict(list)
    for d in ready:
        by_step[d.step_id].append(d)
    deliveries: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    sunset: list[str] = []
    for step_id, items in by_step.items():
        step = spec.step(step_id)
        following = spec.next_step_id(step_id)
        for d, action in _route(session, campaign, step, items, now):
            target: str | None = following
            if action is not None and action.goto:
                target = action.goto
                result.jumped += 1
            elif action is not None and action.end:
                target = None
            elif action is not None and action.suppress:
                target = None
                sunset.append(d.email)
            elif action is not None:
                template, variant = _pick_template(action, d.lead_id, spec.name, step_id)
                deliveries.append(
                    {
                        "enrollment_id": d.enrollment_id,
                        "campaign_id": campaign.id,
                        "lead_id": d.lead_id,
                        "step_id": step_id,
                        "template": template,
                        "variant": variant,
                        "domain": d.email.rsplit("@", 1)[-1],
                        "status": DeliveryStatus.queued.value,
                        "message_id": message_id(d.enrollment_id, step_id, mail_domain),
                        "attempts": 0,
                        "due_at": now,
                        "queued_at": now,
                        "updated_at": now,
                    }
                )
                result.by_step[step_id] += 1
            target, due = arrive(spec, target, now, d.zone)
            if target is None:
                moves.append(
                    {
                        "id": d.enrollment_id,
                        "status": EnrollmentStatus.completed.value,
                        "step_id": None,
                        "due_at": None,
                        "ended_at": now,
                    }
                )
                result.completed += 1
            else:
                moves.append({"id": d.enrollment_id, "step_id": target, "due_at": due})
    if deliveries:
        stmt = insert_for(session, Delivery).on_conflict_do_nothing(
            index_elements=["enrollment_id", "step_id"]
        )
        result.queued += inserted(session, stmt, Delivery.id, deliveries)
    if moves:
        bulk_update(session, Enrollment, moves)
    if sunset:
        suppress(session, sunset, "sunset", f"campaign {spec.name}", now)
        result.sunset += len(sunset)


def _pick_template(
    action: Action, lead_id: int, campaign: str, step_id: str
) -> tuple[str, str | None]:
    if action.variants:
        index = choose_variant(lead_id, campaign, step_id, action.variants)
        chosen = action.variants[index]
        return chosen.template, variant_label(index, chosen)
    assert action.template is not None
    return action.template, None


def worker_id() -> str:
    """An identity for claims: host and pid, so crash recovery can tell a dead claimant."""
    import os
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
