"""Engagement scoring, set-based: behaviour points with half-life decay, fit rules and grades,
and an account roll-up. One UPDATE per score over the whole table; no per-lead Python.

Behaviour score = sum over the lead's events of ``points[type] * 0.5 ** (age / half_life)``,
counting only events at or before ``now``. Fit score = sum of the points of the fit rules the
lead matches; the grade is the highest letter whose threshold the fit score reaches, else F.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, Float, case, cast, func, literal, select, update
from sqlalchemy.orm import Session

from nurture.db import session_scope
from nurture.models import Account, Event, Lead
from nurture.rules import parse_duration
from nurture.segments import RuleContext, compile_rule
from nurture.specs import ScoringSpec
from nurture.sql import affected, at, seconds_between


def behaviour_points_expr(spec: ScoringSpec, now: datetime, dialect_bind: Engine) -> object:
    """The decayed points of one event row, as a SQL expression over ``events``."""
    points = case(
        *((Event.type == name, literal(float(value))) for name, value in spec.points.items()),
        else_=literal(0.0),
    )
    if spec.half_life is None:
        return points
    half_life = parse_duration(spec.half_life).total_seconds()
    age = seconds_between(dialect_bind, at(now), Event.occurred_at)
    return points * func.exp(-math.log(2) * age / half_life)


def score_all(engine: Engine, spec: ScoringSpec, now: datetime) -> int:
    """Recompute behaviour, fit, grade and account scores for every lead. Returns leads scored."""
    decayed = behaviour_points_expr(spec, now, engine)
    behaviour = (
        select(func.coalesce(func.sum(decayed), 0.0))
        .where(
            Event.lead_id == Lead.id,
            Event.occurred_at <= at(now),
            Event.type.in_(list(spec.points)),
        )
        .scalar_subquery()
    )
    ctx = RuleContext(now=now)
    fit = sum(
        (
            case((compile_rule(r.when, ctx), literal(float(r.points))), else_=literal(0.0))
            for r in spec.fit
        ),
        start=literal(0.0),
    )
    grade_cases = [
        (Lead.fit_score >= float(threshold), literal(letter))
        for letter, threshold in sorted(spec.grades.items(), key=lambda kv: -kv[1])
    ]
    with session_scope(engine) as session:
        result = session.execute(
            update(Lead).values(behaviour_score=cast(behaviour, Float), fit_score=fit)
        )
        session.execute(update(Lead).values(grade=case(*grade_cases, else_=literal("F"))))
        _roll_up_accounts(session, spec)
        return affected(result)


def _roll_up_accounts(session: Session, spec: ScoringSpec) -> None:
    """Account score from its contacts' totals: sum, max, top N, or rank-weighted."""
    total = Lead.behaviour_score + Lead.fit_score
    rollup = spec.account
    ranked = (
        select(
            Lead.account_id.label("account_id"),
            total.label("total"),
            func.row_number()
            .over(partition_by=Lead.account_id, order_by=(total.desc(), Lead.id))
            .label("rank"),
        )
        .where(Lead.account_id.is_not(None))
        .subquery()
    )
    value: ColumnElement[Any]
    if rollup.method == "sum":
        value = func.sum(ranked.c.total)
    elif rollup.method == "max":
        value = func.max(ranked.c.total)
    else:
        weights = [1.0] * rollup.top if rollup.method == "top_n" else list(rollup.weights)
        weight = case(
            *((ranked.c.rank == i + 1, literal(w)) for i, w in enumerate(weights)),
            else_=literal(0.0),
        )
        value = func.sum(ranked.c.total * weight)
    agg = select(ranked.c.account_id, value.label("score")).group_by(ranked.c.account_id).subquery()
    session.execute(update(Account).values(score=0.0))
    session.execute(update(Account).where(Account.id == agg.c.account_id).values(score=agg.c.score))
