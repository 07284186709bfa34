"""``nurture plan``: what a change to the campaign files will do, before it does it.

For each campaign that differs from its stored version (or is new) a plan shows the diff,
the audience now (who would enter, who is enrolled, who would exit or be stranded), a
day-by-day forecast of messages per step, and the promotions the rule would make now.
It reads the live database and writes nothing.

The forecast is set-based: one grouped query over the enrollments (and one over the
leads who would enter) folds every lead into groups that behave alike: same step, same
due time, same time zone, same exit and branch outcome. Only the groups are walked
through the sequence, with the scheduler's own functions, so 100k leads in a few hundred
groups cost a few hundred walks. With no new engagement, which is the assumption, the
rules' outcomes do not change, so the walk is what the ticks will do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, Engine, case, func, literal, select
from sqlalchemy.orm import Session

from nurture.journey.pauses import paused_campaigns
from nurture.journey.pipeline import earlier_stages
from nurture.journey.schedule import arrive, effective_zone, next_opening
from nurture.journey.segments import RuleContext, compile_rule
from nurture.journey.sequences import default_timezone, entry_conditions
from nurture.message.sources import source_diff, template_sources
from nurture.planning.rates import KINDS, UsedRate, observed, step_rates, used_rates
from nurture.spec.rules import AllRule, AnyRule, EventRule, NotRule
from nurture.spec.schema import CampaignSpec, PipelineSpec, SpecError, Step
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
    Promotion,
    Suppression,
)

DAY = timedelta(days=1)
#: How the forecast treats engagement: none new (the default), or the observed rates.
RATES = ("none", "history")
# A campaign not stored yet has no id; no enrollment or event carries this one.
NEW_CAMPAIGN = -1


@dataclass(frozen=True)
class Change:
    """One difference between the stored spec and the working copy."""

    kind: str  # added | removed | changed | moved
    what: str  # step, audience, exit_when, promote, schedule, send_window, ...
    name: str  # the step id or the key
    detail: str = ""

    def __str__(self) -> str:
        sign = {"added": "+", "removed": "-"}.get(self.kind, "~")
        tail = f": {self.detail}" if self.detail else ""
        return f"{sign} {self.what} {self.name}{tail}"


@dataclass
class Audience:
    """Who the change touches now."""

    would_enter: int = 0
    enrolled: int = 0
    would_exit: int = 0
    stranded: dict[str, int] = field(default_factory=dict)


@dataclass
class CampaignPlan:
    """The plan of one campaign."""

    name: str
    file: str | None
    status: str  # new | changed | unchanged | removed
    version: int | None
    changes: list[Change] = field(default_factory=list)
    audience: Audience = field(default_factory=Audience)
    forecast: dict[str, list[int]] = field(default_factory=dict)
    promotions: int = 0
    notes: list[str] = field(default_factory=list)
    # Changed templates: file -> a unified diff of its source, capped (see source_diff).
    template_diffs: dict[str, list[str]] = field(default_factory=dict)
    # With --rates history: the rates each step was forecast with, and their sources.
    rates: list[UsedRate] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Messages forecast over the whole horizon."""
        return sum(sum(v) for v in self.forecast.values())

    def as_json(self, days: list[date]) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "name": self.name,
            "file": self.file,
            "status": self.status,
            "stored_version": self.version,
            "changes": [
                {"kind": c.kind, "what": c.what, "name": c.name, "detail": c.detail}
                for c in self.changes
            ],
            "audience": {
                "would_enter": self.audience.would_enter,
                "enrolled": self.audience.enrolled,
                "would_exit": self.audience.would_exit,
                "stranded": self.audience.stranded,
            },
            "forecast": {
                "days": [d.isoformat() for d in days],
                "by_step": self.forecast,
                "total": self.total,
            },
            "promotions": self.promotions,
            "notes": self.notes,
            "template_diffs": {k: "\n".join(v) for k, v in self.template_diffs.items()},
            "rates": [r.as_json() for r in self.rates],
        }


@dataclass
class Plan:
    """A whole plan: every changed campaign, or the errors that stop it."""

    now: datetime
    days: int
    campaigns: list[CampaignPlan] = field(default_factory=list)
    errors: list[SpecError] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rates: str = "none"  # none | history
    since: timedelta = timedelta(days=90)
    min_sends: int = 50

    @property
    def day_labels(self) -> list[date]:
        """The first date of each forecast day (day i covers [now + i d, now + (i+1) d))."""
        return [(self.now + i * DAY).date() for i in range(self.days)]

    def as_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        labels = self.day_labels
        return {
            "now": self.now.isoformat(),
            "days": self.days,
            "ok": not self.errors,
            "errors": [
                {"file": e.file, "line": e.line, "key": e.key, "message": e.message}
                for e in self.errors
            ],
            "campaigns": [c.as_json(labels) for c in self.campaigns],
            "unchanged": self.unchanged,
            "rates": {
                "mode": self.rates,
                "since_days": self.since / DAY,
                "min_sends": self.min_sends,
            },
        }


# --- the diff ----------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _step_templates(step: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for action in [step, *(step.get("branch") or [])]:
        if action.get("template"):
            names.add(action["template"])
        names.update(v["template"] for v in action.get("variants") or [])
    return names


def _step_summary(step: dict[str, Any]) -> str:
    parts = []
    if step.get("send_at"):
        parts.append(f"send_at {step['send_at']}")
    elif step.get("wait") not in (None, 0, "0"):
        parts.append(f"wait {step['wait']}")
    if step.get("branch"):
        parts.append(f"branch of {len(step['branch'])} arms")
    if step.get("variants"):
        parts.append(f"{len(step['variants'])} variants")
    templates = sorted(_step_templates(step))
    if templates:
        parts.append("templates " + ", ".join(templates))
    return "; ".join(parts)


def _step_changes(sid: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key, label in (("wait", "wait"), ("send_at", "send_at"), ("subject", "subject")):
        if old.get(key) != new.get(key):
            out.append(f"{label} {old.get(key) or '-'} -> {new.get(key) or '-'}")
    before, after = _step_templates(old), _step_templates(new)
    if before != after:
        delta = [f"+{t}" for t in sorted(after - before)] + [
            f"-{t}" for t in sorted(before - after)
        ]
        out.append("templates " + " ".join(delta))
    if old.get("variants") != new.get("variants"):
        out += _variant_changes(old.get("variants") or [], new.get("variants") or [])
    if old.get("branch") != new.get("branch"):
        out.append(f"branch {_short(old.get('branch'))} -> {_short(new.get('branch'))}")
    if old.get("template") != new.get("template") and before == after:
        out.append(f"template {old.get('template')} -> {new.get('template')}")
    return out


def _variant_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    """Variants added, removed or re-weighted, by label (name, else template)."""

    def by_label(variants: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {v.get("name") or v["template"]: v for v in variants}

    before, after = by_label(old), by_label(new)
    out = [f"variant {k} added (weight {after[k]['weight']:g})" for k in after if k not in before]
    out += [f"variant {k} removed" for k in before if k not in after]
    for k in after:
        if k in before and before[k] != after[k]:
            parts = [
                f"{key} {before[k].get(key)} -> {after[k].get(key)}"
                for key in ("template", "weight")
                if before[k].get(key) != after[k].get(key)
            ]
            out.append(f"variant {k} " + ", ".join(parts))
    return out


_SCHEDULE = ("starts_at", "ends_at", "stop_at")


def diff_specs(old: dict[str, Any] | None, new: CampaignSpec) -> list[Change]:
    """What changed from the stored spec ``old`` (JSON) to ``new``; None means all new."""
    cur = new.model_dump(mode="json", by_alias=True)
    if old is None:
        return [Change("added", "step", s["id"], _step_summary(s)) for s in cur["steps"]]
    changes: list[Change] = []
    for key in sorted(set(old) | set(cur)):
        if key == "steps" or old.get(key) == cur.get(key):
            continue
        what = "schedule" if key in _SCHEDULE else key
        detail = f"{_short(old.get(key))} -> {_short(cur.get(key))}"
        changes.append(Change("changed", what, key, detail))
    old_steps = {s["id"]: (i, s) for i, s in enumerate(old.get("steps") or [])}
    new_steps = {s["id"]: (i, s) for i, s in enumerate(cur["steps"])}
    for sid, (_, step) in new_steps.items():
        if sid not in old_steps:
            changes.append(Change("added", "step", sid, _step_summary(step)))
    for sid, (_, step) in old_steps.items():
        if sid not in new_steps:
            changes.append(Change("removed", "step", sid, _step_summary(step)))
    old_order = [s for s in old_steps if s in new_steps]
    new_order = [s for s in new_steps if s in old_steps]
    for sid in new_order:
        details = _step_changes(sid, old_steps[sid][1], new_steps[sid][1])
        if old_order.index(sid) != new_order.index(sid):
            details.insert(0, f"moved from position {old_steps[sid][0] + 1}")
        if details:
            changes.append(Change("changed", "step", sid, "; ".join(details)))
    return changes


def template_changes(
    old: dict[str, str], new: dict[str, str]
) -> tuple[list[Change], dict[str, list[str]]]:
    """Template files added, removed or edited between two source maps, with the diffs."""
    changes: list[Change] = []
    diffs: dict[str, list[str]] = {}
    for name in sorted(set(old) | set(new)):
        if name not in old:
            changes.append(
                Change("added", "template", name, f"{len(new[name].splitlines())} lines")
            )
        elif name not in new:
            changes.append(Change("removed", "template", name))
        elif old[name] != new[name]:
            lines, added, removed = source_diff(name, old[name], new[name])
            changes.append(Change("changed", "template", name, f"+{added} -{removed} lines"))
            diffs[name] = lines
    return changes, diffs


# --- the audience and the forecast --------------------------------------------------------


@dataclass
class _Group:
    """Leads that move through the sequence alike, and how many they are."""

    count: int
    step_id: str | None  # None: a queued delivery of ``sent_step`` only
    due: datetime
    zone_key: tuple[str | None, str | None, str | None]
    exits: bool
    arms: dict[str, int]  # branch step id -> the arm taken (-1: none matches)
    sent_step: str | None = None


def _enrollment_ctx(now: datetime, campaign_id: int, enrollment: Any) -> RuleContext:
    return RuleContext(now=now, campaign_id=campaign_id, enrollment_id=enrollment)


def _outcome_columns(
    spec: CampaignSpec, ctx: RuleContext
) -> tuple[ColumnElement[Any], list[tuple[str, ColumnElement[Any]]]]:
    """SQL for "would exit now" and, per branch step, "which arm it takes now"."""
    suppressed = select(Suppression.id).where(Suppression.email == Lead.email).exists()
    exits: ColumnElement[Any] = suppressed
    if spec.exit_when is not None:
        exits = suppressed | compile_rule(spec.exit_when, ctx)
    arms: list[tuple[str, ColumnElement[Any]]] = []
    for step in spec.steps:
        if not step.branch:
            continue
        whens = [(compile_rule(arm.when, ctx), j) for j, arm in enumerate(step.branch) if arm.when]
        if step.branch[-1].when is None:
            arms.append((step.id, case(*whens, else_=len(step.branch) - 1)))
        else:
            arms.append((step.id, case(*whens, else_=-1)))
    exit_col = case((exits, 1), else_=0)
    return exit_col, arms


def _grouped(rows: Any) -> Any:
    """Count the rows of a subquery per distinct combination of all its columns.

    Grouping the subquery's columns (not the expressions) lets PostgreSQL group by
    correlated EXISTS and CASE expressions, which it refuses in a GROUP BY of their own.
    """
    cols = list(rows.c)
    return select(*cols, func.count()).group_by(*cols)


def _groups(
    session: Session, spec: CampaignSpec, campaign_id: int | None, now: datetime
) -> tuple[list[_Group], Audience]:
    """The enrolled and would-be-enrolled leads of ``spec`` folded into groups."""
    audience = Audience()
    groups: list[_Group] = []
    cid = campaign_id if campaign_id is not None else NEW_CAMPAIGN
    tz_cols = (Lead.timezone, Account.timezone, Lead.country)
    step_ids = {s.id for s in spec.steps}
    if campaign_id is not None:
        # Queued mail goes out at the next tick whatever the new spec says.
        for step_id, due, n in session.execute(
            select(Delivery.step_id, Delivery.due_at, func.count())
            .where(
                Delivery.campaign_id == campaign_id,
                Delivery.status == DeliveryStatus.queued.value,
            )
            .group_by(Delivery.step_id, Delivery.due_at)
        ):
            groups.append(_Group(n, None, max(due, now), (None, None, None), False, {}, step_id))
        ctx = _enrollment_ctx(now, cid, cast(ColumnElement[int], Enrollment.id))
        exit_col, arm_cols = _outcome_columns(spec, ctx)
        per_row = (
            select(
                Enrollment.step_id.label("step_id"),
                Enrollment.due_at.label("due_at"),
                *[c.label(f"tz{i}") for i, c in enumerate(tz_cols)],
                exit_col.label("exits"),
                *[c.label(f"arm{i}") for i, (_, c) in enumerate(arm_cols)],
            )
            .select_from(Enrollment)
            .join(Lead, Lead.id == Enrollment.lead_id)
            .outerjoin(Account, Account.id == Lead.account_id)
            .where(
                Enrollment.campaign_id == campaign_id,
                Enrollment.status == EnrollmentStatus.active.value,
            )
            .subquery()
        )
        for row in session.execute(_grouped(per_row)):
            step_id, due, ltz, atz, cc, exits, *arms, n = row
            audience.enrolled += n
            if step_id not in step_ids:
                audience.stranded[step_id] = audience.stranded.get(step_id, 0) + n
                continue
            if exits:
                audience.would_exit += n
            arm_map = {sid: int(a) for (sid, _), a in zip(arm_cols, arms, strict=True)}
            start = max(due, now) if due else now
            groups.append(_Group(n, step_id, start, (ltz, atz, cc), bool(exits), arm_map))
    # Leads who would enter at the next tick (or when the enrollment window opens).
    entry, _cycle = entry_conditions(spec, cid, now)
    ctx = _enrollment_ctx(now, cid, cast(ColumnElement[int], literal(NEW_CAMPAIGN)))
    exit_col, arm_cols = _outcome_columns(spec, ctx)
    per_lead = (
        select(
            *[c.label(f"tz{i}") for i, c in enumerate(tz_cols)],
            exit_col.label("exits"),
            *[c.label(f"arm{i}") for i, (_, c) in enumerate(arm_cols)],
        )
        .select_from(Lead)
        .outerjoin(Account, Account.id == Lead.account_id)
        .where(entry)
        .subquery()
    )
    query = _grouped(per_lead)
    enter_at = max(now, spec.starts_at) if spec.starts_at else now
    for row in session.execute(query):
        ltz, atz, cc, exits, *arms, n = row
        audience.would_enter += n
        if exits:  # e.g. a customer the audience lets in: enrolled, then out at once
            audience.would_exit += n
        arm_map = {sid: int(a) for (sid, _), a in zip(arm_cols, arms, strict=True)}
        groups.append(_Group(n, "", enter_at, (ltz, atz, cc), bool(exits), arm_map))
    return groups, audience


def _walk(
    spec: CampaignSpec,
    group: _Group,
    now: datetime,
    end: datetime,
    counts: dict[str, list[int]],
) -> None:
    """Walk one group through the sequence as the ticks would, counting its sends."""
    days = len(next(iter(counts.values())))
    stop = spec.stop_at

    def record(step_id: str, t: datetime) -> None:
        day = int((t - now) / DAY)
        if 0 <= day < days:
            counts[step_id][day] += group.count

    if group.step_id is None:  # a queued delivery
        if group.sent_step in counts and not (stop and group.due >= stop):
            record(group.sent_step, group.due)
        return
    zone = effective_zone(*group.zone_key, default_timezone(spec))
    t = group.due
    step_id: str | None = group.step_id
    if step_id == "":  # enters at t: the first step's wait (or anchor) counts from there
        if not spec.enrolling(t):
            return
        step_id, due = arrive(spec, spec.steps[0].id, t, zone)
        if step_id is None or due is None:
            return
        t = due
    window = spec.send_window
    for _ in range(10_000):  # bounded like advance_due: every pass moves time or a step on
        if step_id is None or t >= end or (stop is not None and t >= stop):
            return
        if group.exits:
            return
        opening = next_opening(t, zone, window)
        if opening > t:
            t = opening
            continue
        step = spec.step(step_id)
        target = spec.next_step_id(step_id)
        sends = _sends(step, group.arms.get(step_id))
        if sends is True:
            record(step_id, t)
        elif sends == "end":
            target = None
        elif isinstance(sends, str):
            target = sends
        nxt, due = arrive(spec, target, t, zone)
        if nxt is None or due is None:
            return
        step_id, t = nxt, due


def _rule_chance(
    rule: Any, sent: tuple[str, ...], rates: dict[str, dict[str, float]]
) -> float | None:
    """The chance that new engagement makes ``rule`` hold, or None when rates cannot tell.

    Only "at least one open/click/reply" (optionally since a step) is modelled, from the
    rates of the steps this path sent; all/any/not combine them as independent.
    """
    if isinstance(rule, EventRule):
        at_least_one = (rule.op == "gte" and rule.count <= 1) or (
            rule.op == "gt" and rule.count == 0
        )
        if rule.event not in KINDS or not at_least_one or rule.url_contains or rule.payload:
            return None
        if rule.since_step is not None:
            if rule.since_step not in sent:
                return 0.0
            sent = sent[sent.index(rule.since_step) :]
        miss = 1.0
        for step_id in sent:
            miss *= 1.0 - rates[step_id][rule.event]
        return 1.0 - miss
    if isinstance(rule, AllRule | AnyRule):
        parts = [
            _rule_chance(r, sent, rates)
            for r in (rule.all if isinstance(rule, AllRule) else rule.any)
        ]
        if any(p is None for p in parts):
            return None
        chances = [p for p in parts if p is not None]
        if isinstance(rule, AllRule):
            out = 1.0
            for p in chances:
                out *= p
            return out
        miss = 1.0
        for p in chances:
            miss *= 1.0 - p
        return 1.0 - miss
    if isinstance(rule, NotRule):
        inner = _rule_chance(rule.not_, sent, rates)
        return None if inner is None else 1.0 - inner
    return None


def _arm_shares(
    step: Step, base: int | None, sent: tuple[str, ...], rates: dict[str, dict[str, float]]
) -> list[tuple[int, float]]:
    """(arm, share) at a branch step: the arm that holds now, or one that engagement on
    this path's earlier messages would make hold first (a missing share falls through)."""
    shares: list[tuple[int, float]] = []
    left = 1.0
    for j, arm in enumerate(step.branch or []):
        if arm.when is None or base == j:
            chance = 1.0
        else:
            chance = _rule_chance(arm.when, sent, rates) or 0.0  # None: as it is now (false)
        if chance > 0:
            shares.append((j, left * chance))
            left *= 1.0 - chance
        if left <= 1e-12 or base == j:
            break
    return shares


def _walk_rates(
    spec: CampaignSpec,
    group: _Group,
    now: datetime,
    end: datetime,
    counts: dict[str, list[float]],
    rates: dict[str, dict[str, float]],
) -> None:
    """Like :func:`_walk`, with the observed rates: each send loses its exit rate, and the
    branches split by the engagement the rates imply on the messages this path sent."""
    days = len(next(iter(counts.values())))
    stop = spec.stop_at

    def record(step_id: str, t: datetime, n: float) -> None:
        day = int((t - now) / DAY)
        if 0 <= day < days:
            counts[step_id][day] += n

    if group.step_id is None:
        if group.sent_step in counts and not (stop and group.due >= stop):
            record(group.sent_step, group.due, group.count)
        return
    if group.exits:
        return
    zone = effective_zone(*group.zone_key, default_timezone(spec))
    t = group.due
    first: str | None = group.step_id
    if first == "":
        if not spec.enrolling(t):
            return
        first, due = arrive(spec, spec.steps[0].id, t, zone)
        if first is None or due is None:
            return
        t = due
    window = spec.send_window
    if first is None:
        return
    work: list[tuple[float, str, datetime, tuple[str, ...]]] = [(float(group.count), first, t, ())]
    passes = 0
    while work and passes < 100_000:
        passes += 1
        n, step_id, t, sent = work.pop()
        if n < 1e-9 or t >= end or (stop is not None and t >= stop):
            continue
        opening = next_opening(t, zone, window)
        if opening > t:
            work.append((n, step_id, opening, sent))
            continue
        step = spec.step(step_id)
        following = spec.next_step_id(step_id)
        outcomes: list[tuple[float, bool | str]] = []
        if step.branch:
            for j, share in _arm_shares(step, group.arms.get(step_id), sent, rates):
                outcomes.append((n * share, _sends(step, j)))
            fell = n - sum(m for m, _ in outcomes)
            if fell > 1e-9:
                outcomes.append((fell, False))
        else:
            outcomes.append((n, True))
        for m, sends in outcomes:
            target: str | None = following
            path = sent
            if sends is True:
                record(step_id, t, m)
                m *= 1.0 - rates[step_id]["exited"]
                path = (*sent, step_id)
            elif sends == "end":
                target = None
            elif isinstance(sends, str):
                target = sends
            nxt, due = arrive(spec, target, t, zone)
            if nxt is not None and due is not None:
                work.append((m, nxt, due, path))


def _sends(step: Step, arm_index: int | None) -> bool | str:
    """True when the step sends; else the goto target, "end", or False (falls through)."""
    if not step.branch:
        return True
    if arm_index is None or arm_index < 0:
        return False
    arm = step.branch[arm_index]
    if arm.goto:
        return arm.goto
    if arm.end or arm.suppress:
        return "end"
    return True


def _promotions(
    session: Session, spec: CampaignSpec, campaign_id: int | None, pipeline: PipelineSpec,
    now: datetime,
) -> int:  # fmt: skip
    """Leads the promotion rule would queue now (enrolled, earlier stage, not queued yet)."""
    if spec.promote is None or campaign_id is None:
        return 0
    promote = spec.promote
    earlier = earlier_stages(pipeline, promote.to.stage)
    ctx = RuleContext(now=now, campaign_id=campaign_id)
    enrolled = select(Enrollment.lead_id).where(Enrollment.campaign_id == campaign_id)
    already = select(Promotion.lead_id).where(
        Promotion.connector == promote.to.connector, Promotion.stage == promote.to.stage
    )
    query = select(func.count()).where(
        Lead.id.in_(enrolled),
        Lead.id.not_in(already),
        Lead.lifecycle_stage.in_(earlier) if earlier else literal(True),
        compile_rule(promote.when, ctx),
    )
    return int(session.scalar(query) or 0)


def plan_campaign(
    session: Session,
    spec: CampaignSpec,
    stored: Campaign | None,
    now: datetime,
    days: int,
    pipeline: PipelineSpec,
    *,
    paused: bool = False,
    rates: str = "none",
    since: timedelta = timedelta(days=90),
    min_sends: int = 50,
) -> CampaignPlan:
    """The plan of one campaign against its stored row (None when new).

    ``rates="history"`` forecasts with each step's observed rates over the last ``since``
    (see :mod:`nurture.planning.rates`) instead of assuming no new engagement.
    """
    status = "new" if stored is None else "changed"
    result = CampaignPlan(
        name=spec.name,
        file=None,
        status=status,
        version=stored.version if stored else None,
        changes=diff_specs(stored.spec if stored else None, spec),
    )
    cid = stored.id if stored else None
    groups, result.audience = _groups(session, spec, cid, now)
    counts: dict[str, list[int]] = {s.id: [0] * days for s in spec.steps}
    end = now + days * DAY
    if rates == "history" and not paused and spec.active:
        seen = observed(session, cid, now - since, now) if cid is not None else {}
        result.rates = used_rates(spec, seen, min_sends)
        by_step = {step.id: step_rates(step, result.rates) for step in spec.steps}
        fractional: dict[str, list[float]] = {s.id: [0.0] * days for s in spec.steps}
        for g in groups:
            _walk_rates(spec, g, now, end, fractional, by_step)
        counts = {k: [round(x) for x in v] for k, v in fractional.items()}
        fallback = [r for r in result.rates if r.source not in ("step", "variant")]
        for r in fallback:
            label = r.step + (f" variant {r.variant}" if r.variant else "")
            why = f"{r.own_sends} sends in {since / DAY:g}d, fewer than {min_sends}"
            use = (
                f"the campaign's overall rates ({r.sample} sends)"
                if r.source == "campaign"
                else "no engagement and no exits"
            )
            result.notes.append(f"rates for {label}: {why}; forecast with {use}")
    elif paused:
        result.notes.append("paused: nothing is enrolled, advanced or sent until it is resumed")
    elif not spec.active:
        result.notes.append("active: false: only mail already queued goes out")
        for g in groups:
            if g.step_id is None:
                _walk(spec, g, now, end, counts)
    else:
        for g in groups:
            _walk(spec, g, now, end, counts)
    if spec.starts_at and spec.starts_at > now:
        result.notes.append(f"enrollment opens at {spec.starts_at.isoformat()}")
    if spec.ends_at and spec.ends_at <= now:
        result.notes.append(f"enrollment closed at {spec.ends_at.isoformat()}")
    if spec.stop_at and spec.stop_at < end:
        result.notes.append(f"nothing is sent from {spec.stop_at.isoformat()} (stop_at)")
    if result.audience.stranded:
        result.notes.append(
            "stranded: enrolled leads wait on steps the new spec removes; they would stand "
            "still (move them, or keep the step until they have passed it)"
        )
    result.forecast = counts
    result.promotions = _promotions(session, spec, cid, pipeline, now)
    return result


def build_plan(
    engine: Engine,
    specs: list[tuple[Path | None, CampaignSpec]],
    now: datetime,
    *,
    days: int = 14,
    pipeline: PipelineSpec | None = None,
    errors: list[SpecError] | None = None,
    include_unchanged: bool = False,
    templates_dir: Path | None = None,
    rates: str = "none",
    since: timedelta = timedelta(days=90),
    min_sends: int = 50,
) -> Plan:
    """Plan every campaign of ``specs`` that is new or differs from its stored version.

    Reads only: nothing is stored, enrolled or sent. ``errors`` (from validating the files)
    are carried into the plan, which then has no campaigns. With ``templates_dir`` the
    sources of the templates each campaign uses are compared with those stored with its
    version: an edited template body is a change, shown as a short diff.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    if rates not in RATES:
        raise ValueError(f"rates must be one of {', '.join(RATES)}, not {rates!r}")
    if since <= timedelta(0) or min_sends < 1:
        raise ValueError("since must be positive and min_sends at least 1")
    plan = Plan(
        now=now,
        days=days,
        errors=list(errors or []),
        rates=rates,
        since=since,
        min_sends=min_sends,
    )
    if plan.errors:
        return plan
    pipeline = pipeline or PipelineSpec()
    with session_scope(engine) as session:
        stored = {c.name: c for c in session.scalars(select(Campaign))}
        kept = dict(
            session.execute(
                select(CampaignVersion.campaign_id, CampaignVersion.templates)
                .join(Campaign, Campaign.id == CampaignVersion.campaign_id)
                .where(CampaignVersion.version == Campaign.version)
            ).all()
        )
        paused = paused_campaigns(session)
        for path, spec in specs:
            row = stored.get(spec.name)
            old_sources = kept.get(row.id) if row is not None else None
            t_changes: list[Change] = []
            t_diffs: dict[str, list[str]] = {}
            if templates_dir is not None and old_sources is not None:
                new_sources = template_sources(templates_dir, spec.templates())
                t_changes, t_diffs = template_changes(old_sources, new_sources)
            if (
                row is not None
                and row.spec_hash == spec.digest()
                and row.active == spec.active
                and not t_changes
            ):
                plan.unchanged.append(spec.name)
                if not include_unchanged:
                    continue
            one = plan_campaign(
                session,
                spec,
                row,
                now,
                days,
                pipeline,
                paused=spec.name in paused,
                rates=rates,
                since=since,
                min_sends=min_sends,
            )
            one.file = str(path) if path else None
            one.changes += t_changes
            one.template_diffs = t_diffs
            if templates_dir is not None and row is not None and old_sources is None:
                one.notes.append(
                    f"stored v{row.version} predates kept template sources: template edits "
                    "cannot be shown (the next sync records them)"
                )
            if row is not None and not one.changes and one.status == "changed":
                one.status = "unchanged"
            plan.campaigns.append(one)
        names = {spec.name for _, spec in specs}
        for name, row in sorted(stored.items()):
            if name in names or not row.active:
                continue
            active = session.scalar(
                select(func.count()).where(
                    Enrollment.campaign_id == row.id,
                    Enrollment.status == EnrollmentStatus.active.value,
                )
            )
            gone = CampaignPlan(name=name, file=None, status="removed", version=row.version)
            gone.audience.enrolled = int(active or 0)
            gone.notes.append(
                "no file any more: ticks stop advancing it and its enrolled leads stand still"
            )
            plan.campaigns.append(gone)
    return plan


# --- output ------------------------------------------------------------------------------


def _md(text: object) -> str:
    """Text safe in a markdown table cell or list item."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


_MAX_TEMPLATE_DIFFS = 5


def _fence(lines: list[str]) -> str:
    """A code fence longer than any run of backticks in ``lines``."""
    longest = max((len(run) for ln in lines for run in re.findall(r"`+", ln)), default=0)
    return "`" * max(3, longest + 1)


def plan_markdown(plan: Plan) -> str:
    """The plan as markdown, written to be pasted as a pull-request comment."""
    lines = [f"## nurture plan ({plan.days} days from {plan.now.isoformat()})", ""]
    if plan.errors:
        lines += ["**The campaign files have errors; nothing was planned.**", "", "```"]
        lines += [str(e) for e in plan.errors]
        lines += ["```"]
        return "\n".join(lines) + "\n"
    if not plan.campaigns:
        lines.append("No changes: every campaign matches its stored version.")
        return "\n".join(lines) + "\n"
    summary = ", ".join(f"{_md(c.name)} ({c.status}, {c.total:,} messages)" for c in plan.campaigns)
    lines += [f"**{len(plan.campaigns)} campaign(s) change:** {summary}", ""]
    labels = plan.day_labels
    for c in plan.campaigns:
        version = f", stored v{c.version}" if c.version else ""
        lines += [f"### {_md(c.name)} ({c.status}{version})", ""]
        if c.file:
            lines += [f"File: `{_md(c.file)}`", ""]
        if c.changes:
            lines += ["```diff"] + [str(ch) for ch in c.changes] + ["```", ""]
        for name, diff in list(c.template_diffs.items())[:_MAX_TEMPLATE_DIFFS]:
            fence = _fence(diff)
            lines += [f"<details><summary>template {_md(name)}</summary>", ""]
            lines += [f"{fence}diff", *diff, fence, "", "</details>", ""]
        if len(c.template_diffs) > _MAX_TEMPLATE_DIFFS:
            lines += [
                f"({len(c.template_diffs) - _MAX_TEMPLATE_DIFFS} more template diffs in --json)",
                "",
            ]
        a = c.audience
        lines += [
            f"- would enter now: **{a.would_enter:,}**",
            f"- already enrolled: {a.enrolled:,}",
            f"- would exit at their next step (exit rule or suppression): {a.would_exit:,}",
        ]
        if a.stranded:
            stranded = ", ".join(f"{_md(k)}: {v:,}" for k, v in sorted(a.stranded.items()))
            lines.append(f"- **stranded** on removed steps: {stranded}")
        if c.promotions:
            lines.append(f"- promotions the rule would queue now: {c.promotions:,}")
        lines += [f"- note: {_md(n)}" for n in c.notes]
        lines.append("")
        if c.rates:
            lines += [
                f"Rates observed over the last {plan.since / DAY:g} days "
                f"(own rates need {plan.min_sends} sends):",
                "",
                "| step | variant | rates from | sends measured | open | click | reply | exit |",
                "|---|---|---|---:|---:|---:|---:|---:|",
            ]
            for r in c.rates:
                pct = " | ".join(
                    f"{r.rates[k]:.1%}" for k in ("opened", "clicked", "replied", "exited")
                )
                lines.append(
                    f"| {_md(r.step)} | {_md(r.variant or '-')} | {r.source} | "
                    f"{r.sample:,} | {pct} |"
                )
            lines.append("")
        if c.forecast:
            assumption = "observed rates" if c.rates else "no new engagement"
            lines.append(f"Forecast, {assumption}: **{c.total:,} messages** in {plan.days} days")
            lines += [""]
            lines.append("| day | " + " | ".join(_md(s) for s in c.forecast) + " | total |")
            lines.append("|---|" + "---:|" * (len(c.forecast) + 1))
            for i, day in enumerate(labels):
                row = [c.forecast[s][i] for s in c.forecast]
                if not any(row):
                    continue
                lines.append(
                    f"| {day.isoformat()} | "
                    + " | ".join(f"{n:,}" for n in row)
                    + f" | {sum(row):,} |"
                )
            lines.append("")
    if plan.unchanged:
        lines.append(f"Unchanged: {', '.join(_md(n) for n in plan.unchanged)}")
    return "\n".join(lines) + "\n"


def forecast_by_day(plan: CampaignPlan) -> list[int]:
    """Messages per forecast day, all steps together."""
    if not plan.forecast:
        return []
    width = len(next(iter(plan.forecast.values())))
    totals = [0] * width
    for per_day in plan.forecast.values():
        for i, n in enumerate(per_day):
            totals[i] += n
    return totals


def plan_errors(
    folder: Path, templates_dir: Path
) -> tuple[list[tuple[Path | None, CampaignSpec]], list[SpecError]]:
    """Validate the campaign files and lint the templates they use.

    Returns the good campaigns and every problem as ``file:line`` errors (template
    warnings are not errors).
    """
    from nurture.message.rendering import RenderError, TemplateStore
    from nurture.spec.schema import check_campaigns, template_exists

    good, errors = check_campaigns([folder], template_exists(templates_dir))
    store = TemplateStore(templates_dir)
    used = sorted(set().union(*(spec.templates() for _, spec in good))) if good else []
    seen: set[tuple[str, int | None, str]] = set()
    for name in used:
        try:
            problems = store.lint(name)
        except RenderError as exc:  # a syntax error in a file the store reads for every lint
            # Already reported when it was the lint of that very template?
            where = (Path(exc.file or name).name, exc.line)
            if where not in {(k[0], k[1]) for k in seen}:
                errors.append(SpecError(exc.file or name, exc.line, "template", exc.reason))
            break
        for problem in problems:
            key = (Path(problem.file).name, problem.line, problem.message)
            if problem.severity == "error" and key not in seen:
                seen.add(key)
                errors.append(SpecError(problem.file, problem.line, "template", problem.message))
    specs: list[tuple[Path | None, CampaignSpec]] = [(p, s) for p, s in good]
    return specs, errors
