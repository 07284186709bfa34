"""Engagement scoring, set-based: behaviour points with half-life decay, fit rules and grades,
and an account roll-up. A handful of statements over the whole table; no per-lead Python.

Behaviour score = sum over the lead's events of ``points[type] * 0.5 ** (age / half_life)``,
counting only events at or before ``now`` whose type has points. Opens and clicks count
once per delivery (clicks once per distinct link) and, by default, only when a person made
them (see :mod:`nurture.engagement.classify`); every occurrence of other types counts.
Fit score = sum of the points of the fit rules the lead matches; the grade is the highest
letter whose threshold the fit score reaches, else F.

A behaviour or account score is stored again only once it moved by ``SCORE_TOLERANCE``
(0.005 points) or more, so a stored score is the exact one to within that much. Fit scores
and grades are stored whenever they change.

The expressions are public so that :mod:`nurture.reporting.explain` computes each item with the very
same SQL, and its items add up to the exact scores.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Engine,
    Float,
    MetaData,
    Select,
    Table,
    and_,
    case,
    cast,
    column,
    func,
    insert,
    literal,
    or_,
    select,
    table,
    text,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from nurture.journey.segments import RuleContext, compile_rule
from nurture.spec.rules import parse_duration
from nurture.spec.schema import AccountRollup, ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Account, BigID, Event, Lead
from nurture.store.sql import at, is_postgres, seconds_between

__all__ = [
    "SCORE_TOLERANCE",
    "account_weights",
    "behaviour_points_expr",
    "counted_column",
    "decay_factor_expr",
    "fit_rule_exprs",
    "grade_expr",
    "points_expr",
    "score_all",
    "scored_events_filter",
]


_MIN_EXPONENT = -700.0

# A stored behaviour or account score is rewritten when its exact value has moved by at
# least this much: stored scores are always within 0.005 points of the exact ones. The
# decay moves every score a little on every tick (a score of 10 with a 30-day half-life
# loses 0.0024 in 15 minutes); writing each of those invisible steps rewrote every lead
# with events on every tick, which cost more than computing the scores (issue 19).
SCORE_TOLERANCE = 0.005

# The per-lead behaviour sums, materialised once per run on SQLite (see _score_leads).
# Temporary, so private to the connection; dropped at the end of the transaction.
_BEHAVIOUR = Table(
    "nurture_scoring_behaviour",
    MetaData(),
    Column("lead_id", BigID, primary_key=True, autoincrement=False),
    Column("score", Float, nullable=False),
    prefixes=["TEMPORARY"],
)


def points_expr(spec: ScoringSpec) -> ColumnElement[float]:
    """The undecayed points of one ``events`` row, by its type (0 for other types)."""
    if not spec.points:
        return literal(0.0)
    # ``CASE type WHEN ..`` reads the type once per row, not once per listed type.
    return case(
        {name: literal(float(value)) for name, value in spec.points.items()},
        value=Event.type,
        else_=literal(0.0),
    )


def decay_factor_expr(spec: ScoringSpec, now: datetime, bind: Engine | Session) -> Any:
    """``0.5 ** (age / half_life)`` of one ``events`` row as SQL (1.0 without a half-life)."""
    if spec.half_life is None:
        return literal(1.0)
    half_life = parse_duration(spec.half_life).total_seconds()
    age = seconds_between(bind, at(now), Event.occurred_at)
    # One multiplication by a constant folded in Python: this runs once per event.
    exponent = age * literal(-math.log(2) / half_life)
    if not is_postgres(bind):
        # SQLite's exp() underflows quietly to 0.0.
        return func.exp(exponent)
    # PostgreSQL's exp() raises an underflow error below about exp(-745) instead of
    # returning 0, so clamp the exponent (exp(-700) < 1e-304: nothing a score can show).
    # One scalar GREATEST keeps the age, the costly part, computed once per row.
    return func.exp(func.greatest(exponent, literal(_MIN_EXPONENT)))


def behaviour_points_expr(spec: ScoringSpec, now: datetime, bind: Engine | Session) -> Any:
    """The decayed points of one ``events`` row, as a SQL expression."""
    if spec.half_life is None:
        return points_expr(spec)
    return points_expr(spec) * decay_factor_expr(spec, now, bind)


def counted_column(spec: ScoringSpec) -> Any:
    """The flag of the events scoring counts: human engagement only, or all of it."""
    return Event.counted_any if spec.count_machine_engagement else Event.counted_human


def scored_events_filter(spec: ScoringSpec, now: datetime) -> ColumnElement[bool]:
    """The events that count: a type with points, not in the future, and counted.

    Counted (see :mod:`nurture.engagement.classify`): one open per delivery and one click per
    distinct link per delivery, human ones only unless ``count_machine_engagement``.
    Other event types count every occurrence.
    """
    return and_(
        Event.occurred_at <= at(now),
        Event.type.in_(list(spec.points)),
        counted_column(spec).is_(True),
    )


def fit_rule_exprs(spec: ScoringSpec, now: datetime) -> list[ColumnElement[float]]:
    """One SQL expression per fit rule over ``leads``: its points when matched, else 0."""
    ctx = RuleContext(now=now)
    return [
        case((compile_rule(r.when, ctx), literal(float(r.points))), else_=literal(0.0))
        for r in spec.fit
    ]


def grade_expr(spec: ScoringSpec, fit: Any) -> ColumnElement[str]:
    """The A-F letter for a fit score: the highest grade whose threshold it reaches."""
    ordered = sorted(spec.grades.items(), key=lambda kv: -kv[1])
    if not ordered:
        return literal("F")
    return case(
        *((fit >= float(threshold), literal(letter)) for letter, threshold in ordered),
        else_=literal("F"),
    )


def grade_for(spec: ScoringSpec, fit: float) -> str:
    """The A-F letter for a fit score, in Python (same rule as :func:`grade_expr`)."""
    for letter, threshold in sorted(spec.grades.items(), key=lambda kv: -kv[1]):
        if fit >= float(threshold):
            return letter
    return "F"


def account_weights(rollup: AccountRollup) -> list[float] | None:
    """Weights by rank (1st, 2nd, ...) for top_n/weighted; None for sum and max."""
    if rollup.method == "top_n":
        return [1.0] * rollup.top
    if rollup.method == "weighted":
        return list(rollup.weights)
    return None


def score_all(engine: Engine, spec: ScoringSpec, now: datetime) -> int:
    """Recompute behaviour, fit, grade and account scores for every lead. Returns leads scored.

    The behaviour sums are ONE ``SELECT lead_id, SUM(..) FROM events GROUP BY lead_id``: a
    single pass over the events in index order (no sort), never a subquery per lead. Every
    lead then gets its sum, or 0 when no scored event is left (deleted events, a changed
    spec), and its fit; the grade and the account roll-up follow. Each statement writes
    only changed rows (behaviour and account scores: moved by ``SCORE_TOLERANCE``). On
    PostgreSQL every lead's new scores go into a temporary table, made by CREATE TABLE AS
    (which may run in parallel), and one ``UPDATE ... FROM`` writes the changed ones (see
    :func:`_score_leads_postgres`). SQLite, which has no hash join, keeps the sums in a
    temporary rowid table (see :func:`_score_leads`).
    """
    with session_scope(engine) as session:
        scored = _score_leads(session, spec, now)
        _roll_up_accounts(session, spec)
        return scored


# PostgreSQL's new scores of every lead: a temporary table made by CREATE TABLE AS, dropped
# at commit (see _score_leads_postgres).
_NEW = table("nurture_scoring_new", column("id"), column("score"), column("fit"))


class _TemporaryTableAs(Executable, ClauseElement):
    """``CREATE TEMPORARY TABLE name ON COMMIT DROP AS query`` (PostgreSQL)."""

    inherit_cache = False

    def __init__(self, name: str, query: Select[Any, Any, Any]) -> None:
        self.name = name
        self.query = query


@compiles(_TemporaryTableAs, "postgresql")
def _temporary_table_as(element: _TemporaryTableAs, compiler: SQLCompiler, **kw: Any) -> str:
    query = compiler.process(element.query, **kw)
    return f"CREATE TEMPORARY TABLE {element.name} ON COMMIT DROP AS {query}"


def _moved(stored: Any, exact: Any) -> ColumnElement[bool]:
    """TRUE when a stored score is :data:`SCORE_TOLERANCE` or more away from its exact value."""
    return func.abs(stored - exact) >= SCORE_TOLERANCE


def _behaviour_sums(session: Session, spec: ScoringSpec, now: datetime) -> Select[Any]:
    """``(lead_id, score)`` for every lead with a scored event: one pass over the events."""
    return (
        select(
            Event.lead_id.label("lead_id"),
            cast(func.sum(behaviour_points_expr(spec, now, session)), Float).label("score"),
        )
        .where(scored_events_filter(spec, now))
        .group_by(Event.lead_id)
    )


def _score_leads(session: Session, spec: ScoringSpec, now: datetime) -> int:
    """Behaviour, fit and grade of every lead, written where changed. Returns the leads."""
    behaviour = _behaviour_sums(session, spec, now)
    fits = fit_rule_exprs(spec, now)
    fit: ColumnElement[float] = sum(fits, start=literal(0.0)) if fits else literal(0.0)
    if is_postgres(session):
        return _score_leads_postgres(session, spec, behaviour, fit)
    # SQLite joins by nested loops only: joined as a subquery, the aggregate would be
    # materialised and then indexed (a sort of every row) for the lookups. Instead the sums
    # go into a rowid table (inserted in lead_id order: appends) and a plain UPDATE looks
    # each lead's up by rowid. Leads without a scored event get 0.
    _BEHAVIOUR.create(session.connection(), checkfirst=True)
    session.execute(_BEHAVIOUR.delete())
    session.execute(insert(_BEHAVIOUR).from_select(["lead_id", "score"], behaviour))
    score = func.coalesce(
        select(_BEHAVIOUR.c.score).where(_BEHAVIOUR.c.lead_id == Lead.id).scalar_subquery(),
        0.0,
    )
    # Two UPDATEs, both OR FAIL. Without it SQLite keeps a statement journal: an UPDATE
    # that may abort halfway (a JSON function in a fit rule may) first copies every page it
    # changes to a temporary file, some 35 MB at 100k leads. OR FAIL keeps what a failed
    # statement did, which the session's rollback then undoes. Behaviour and fit stay
    # apart: in one statement a changed row evaluates both in WHERE and again in SET.
    session.execute(
        update(Lead)
        .prefix_with("OR FAIL")
        .where(_moved(Lead.behaviour_score, score))
        .values(behaviour_score=score)
        .execution_options(synchronize_session=False)
    )
    session.execute(_BEHAVIOUR.delete())
    # The fit rules run once per lead in WHERE; only the rare changed rows evaluate them
    # again in SET, once for the score and once per grade threshold. A grade is also
    # rewritten when the thresholds changed: the WHERE tests it against the stored fit.
    session.execute(
        update(Lead)
        .prefix_with("OR FAIL")
        .where(
            or_(
                Lead.fit_score != fit,
                Lead.grade.is_distinct_from(grade_expr(spec, Lead.fit_score)),
            )
        )
        .values(fit_score=fit, grade=grade_expr(spec, fit))
        .execution_options(synchronize_session=False)
    )
    return int(session.scalar(select(func.count()).select_from(Lead)) or 0)


def _score_leads_postgres(
    session: Session, spec: ScoringSpec, behaviour: Select[Any], fit: ColumnElement[float]
) -> int:
    """PostgreSQL: every lead's new scores into a temporary table, then ONE ``UPDATE``.

    ``CREATE TABLE AS`` may run in parallel workers: the aggregate, the join to the leads
    (behaviour 0 where no scored event is left: deleted events, a changed spec) and the fit
    rules. Inside an ``UPDATE`` none of it may: with only the sums in the table and the
    join and fit rules in the UPDATE, a tick took about 1.6 s, against 1.4 s this way
    (100k leads, 1M events, same run). Behaviour, fit and grade are set by one statement,
    so a changed lead gets one new row version: as separate statements, the second found
    row versions its own transaction had just made and PostgreSQL checked the account
    foreign key again for each (seconds at 100k leads).
    """
    sums = behaviour.subquery("behaviour")
    every = (
        select(
            Lead.id.label("id"),
            func.coalesce(sums.c.score, 0.0).label("score"),
            fit.label("fit"),
        )
        .select_from(Lead)
        .outerjoin(sums, sums.c.lead_id == Lead.id)
    )
    session.execute(_TemporaryTableAs(_NEW.name, every))
    session.execute(text(f"ANALYZE {_NEW.name}"))  # a temporary table has no statistics
    grade = grade_expr(spec, _NEW.c.fit)
    session.execute(
        update(Lead)
        .where(
            Lead.id == _NEW.c.id,
            or_(
                _moved(Lead.behaviour_score, _NEW.c.score),
                Lead.fit_score != _NEW.c.fit,
                Lead.grade.is_distinct_from(grade),
            ),
        )
        .values(behaviour_score=_NEW.c.score, fit_score=_NEW.c.fit, grade=grade)
        .execution_options(synchronize_session=False)
    )
    return int(session.scalar(select(func.count()).select_from(_NEW)) or 0)


def _roll_up_accounts(session: Session, spec: ScoringSpec) -> None:
    """Account score from its contacts' totals: sum, max, top N, or rank-weighted.

    Only changed rows are written; an account without contacts gets 0.
    """
    if is_postgres(session):
        _roll_up_accounts_ranked(session, spec)
        return
    # SQLite: a subquery per account over its contacts (the account_id index) costs about
    # a third less than ranking every contact in one window and joining the groups back.
    # PostgreSQL runs those subqueries ten times slower than the window (measured).
    # MATERIALIZED: computed once per account into a small table. In ``SET score = value
    # WHERE score != value`` SQLite ran the subquery twice for every changed account.
    new = (
        select(Account.id.label("id"), _account_score_expr(spec).label("score"))
        .cte("new_account")
        .prefix_with("MATERIALIZED")
    )
    # OR FAIL: no statement journal (see _score_leads); the session's rollback undoes it.
    session.execute(
        update(Account)
        .prefix_with("OR FAIL")
        .where(Account.id == new.c.id, _moved(Account.score, new.c.score))
        .values(score=new.c.score)
        .execution_options(synchronize_session=False)
    )


def _account_score_expr(spec: ScoringSpec) -> ColumnElement[float]:
    """The roll-up of the contacts of the ``accounts`` row being updated (0 without any)."""
    contact = aliased(Lead, name="contact")
    total = contact.behaviour_score + contact.fit_score
    mine = contact.account_id == Account.id
    rollup = spec.account
    weights = account_weights(rollup)
    if weights is None:
        agg = func.sum(total) if rollup.method == "sum" else func.max(total)
        value = select(agg).where(mine).correlate(Account).scalar_subquery()
        return func.coalesce(value, 0.0)
    order = (total.desc(), contact.id)
    if rollup.method == "top_n":
        best = select(total.label("total")).where(mine).order_by(*order).limit(len(weights))
        top = best.correlate(Account).subquery("top")
        value = select(func.sum(top.c.total)).scalar_subquery()
        return func.coalesce(value, 0.0)
    ranked = (
        select(
            total.label("total"),
            func.row_number().over(order_by=order).label("rank"),
        )
        .where(mine)
        .order_by(*order)
        .limit(len(weights))
        .correlate(Account)
        .subquery("ranked")
    )
    weight = case(
        *((ranked.c.rank == i + 1, literal(w)) for i, w in enumerate(weights)),
        else_=literal(0.0),
    )
    value = select(func.sum(ranked.c.total * weight)).scalar_subquery()
    return func.coalesce(value, 0.0)


def _roll_up_accounts_ranked(session: Session, spec: ScoringSpec) -> None:
    """The roll-up as one window over all contacts, joined back to every account."""
    total = Lead.behaviour_score + Lead.fit_score
    rollup = spec.account
    weights = account_weights(rollup)
    contacts = Lead.account_id.is_not(None)
    agg: Any
    if weights is None:
        # Sum and max need no ranking.
        value = func.sum(total) if rollup.method == "sum" else func.max(total)
        agg = (
            select(Lead.account_id.label("account_id"), value.label("score"))
            .where(contacts)
            .group_by(Lead.account_id)
            .subquery()
        )
    else:
        ranked = (
            select(
                Lead.account_id.label("account_id"),
                total.label("total"),
                func.row_number()
                .over(partition_by=Lead.account_id, order_by=(total.desc(), Lead.id))
                .label("rank"),
            )
            .where(contacts)
            .subquery()
        )
        weight = case(
            *((ranked.c.rank == i + 1, literal(w)) for i, w in enumerate(weights)),
            else_=literal(0.0),
        )
        # Ranks past the last weight count 0: leaving them out shrinks the GROUP BY.
        agg = (
            select(ranked.c.account_id, func.sum(ranked.c.total * weight).label("score"))
            .where(ranked.c.rank <= len(weights))
            .group_by(ranked.c.account_id)
            .subquery()
        )
    every = aliased(Account)
    new = (
        select(every.id.label("id"), func.coalesce(agg.c.score, 0.0).label("score"))
        .select_from(every)
        .outerjoin(agg, agg.c.account_id == every.id)
        .subquery("new_account")
    )
    session.execute(
        update(Account)
        .where(Account.id == new.c.id, _moved(Account.score, new.c.score))
        .values(score=new.c.score)
        .execution_options(synchronize_session=False)
    )
