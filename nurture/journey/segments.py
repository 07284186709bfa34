"""Compile the rule DSL (:mod:`nurture.spec.rules`) to one SQLAlchemy boolean over ``leads``.

Nothing here loops over leads: a rule becomes a single SQL expression (with correlated
sub-queries for accounts and events) that the caller puts in a ``WHERE``.

Semantics, chosen to match what a marketer expects:

- Every compiled condition is two-valued: it is TRUE or FALSE, never NULL, so ``not``
  is a plain complement and a lead is always on exactly one side of a rule.
- A missing value (a NULL column, an absent or ``null`` attribute, no account) matches
  no positive operator (``eq``, ``in``, ``gt``.., ``contains``, ``starts_with``), and
  matches ``ne`` and ``not_in``: the lead does not have that value.
- ``attributes.<key>`` are typed by the rule's value: a string matches only JSON strings,
  a number only JSON numbers (compared numerically), a boolean only JSON booleans. An
  attribute holding another type counts as missing for that comparison. Dates compare
  as ISO text.
- ``contains`` and ``starts_with`` are case-insensitive (LIKE wildcards in the value are
  literal). On an attribute holding a list, ``contains`` tests membership (exact).
- ``exists`` (or ``exists: true``) means "has a non-null value"; ``exists: false`` the
  opposite.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Select,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import aliased
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import Case
from sqlalchemy.sql.functions import FunctionElement

from nurture.spec.rules import (
    ENGAGEMENT_TYPES,
    MACHINE,
    AllRule,
    AnyRule,
    EventRule,
    FieldRule,
    NotRule,
    Rule,
    ScoreRule,
    field_kind,
    parse_ago,
    parse_time,
)
from nurture.store.models import Account, Delivery, DeliveryStatus, Event, Lead, UTCDateTime

__all__ = ["RuleContext", "compile_rule", "select_lead_ids"]


@dataclass(frozen=True)
class RuleContext:
    """What a rule is evaluated against besides the lead row.

    Attributes:
        now: The tick's instant (aware); ``within`` windows end here.
        campaign_id: The campaign for ``EventRule.this_campaign``.
        enrollment_id: A correlated enrollment id column (e.g. ``Enrollment.id`` of the
            enclosing query), for ``EventRule.since_step``.
    """

    now: datetime
    campaign_id: int | None = None
    enrollment_id: ColumnElement[int] | None = None


def compile_rule(rule: Rule, ctx: RuleContext) -> ColumnElement[bool]:
    """Compile ``rule`` to one boolean SQL expression over :class:`models.Lead`.

    Args:
        rule: A validated rule tree.
        ctx: The instant and, for campaign-scoped event rules, the campaign/enrollment.

    Returns:
        A TRUE/FALSE (never NULL) expression to use in a ``WHERE`` on ``leads``.

    Raises:
        ValueError: For a rule that needs context the caller did not give
            (``this_campaign`` without ``campaign_id``, ``since_step`` without
            ``enrollment_id``), or a naive ``now``.
    """
    if ctx.now.tzinfo is None:
        raise ValueError("RuleContext.now must be an aware datetime")
    if isinstance(rule, AllRule):
        return and_(*(compile_rule(r, ctx) for r in rule.all))
    if isinstance(rule, AnyRule):
        return or_(*(compile_rule(r, ctx) for r in rule.any))
    if isinstance(rule, NotRule):
        return not_(compile_rule(rule.not_, ctx))
    if isinstance(rule, FieldRule):
        return _field(rule, ctx.now)
    if isinstance(rule, EventRule):
        return _event(rule, ctx)
    if isinstance(rule, ScoreRule):
        return _compare(_score(rule.score), rule.op, rule.value)
    raise TypeError(f"not a rule: {rule!r}")


def select_lead_ids(rule: Rule, ctx: RuleContext) -> Select[int]:
    """``SELECT leads.id FROM leads WHERE <rule>`` (unordered; add ``order_by`` to page)."""
    return select(Lead.id).where(compile_rule(rule, ctx))


# --- comparisons ------------------------------------------------------------------------------


def _compare(left: Any, op: str, right: Any) -> ColumnElement[bool]:
    """``left <op> right`` for the six comparison operators."""
    if op == "eq":
        return left == right
    if op == "ne":
        return left != right
    if op == "gt":
        return left > right
    if op == "gte":
        return left >= right
    if op == "lt":
        return left < right
    if op == "lte":
        return left <= right
    raise ValueError(f"unknown comparison {op!r}")


def _known(value: ColumnElement[Any], condition: ColumnElement[bool]) -> ColumnElement[bool]:
    # SQL's NULL would make NOT(condition) NULL as well, dropping the lead from both a rule
    # and its negation; pinning NULL to FALSE keeps every rule two-valued.
    if isinstance(value, Case):
        # A JSON attribute (type guard + extraction): COALESCE evaluates it once, where
        # "IS NOT NULL AND" would parse the JSON twice per row. No index applies anyway.
        return func.coalesce(condition, false())
    # A column: this form keeps an index on it usable.
    return and_(value.is_not(None), condition)


def _positive(value: ColumnElement[Any], op: str, arg: Any) -> ColumnElement[bool]:
    """The two-valued test for a positive operator on a typed, possibly NULL, value."""
    if op == "exists":
        return value.is_not(None)
    if op == "in":
        if not arg:
            return false()
        return _known(value, value.in_(arg))
    if op == "contains":
        return _known(value, value.icontains(arg, autoescape=True))
    if op == "starts_with":
        return _known(value, value.istartswith(arg, autoescape=True))
    return _known(value, _compare(value, op, arg))


def _split(op: str, value: Any) -> tuple[str, bool]:
    """Map an operator to (positive operator, negate?): ne/not_in/exists:false are negations."""
    if op == "ne":
        return "eq", True
    if op == "not_in":
        return "in", True
    if op == "exists":
        return "exists", value is False
    return op, False


def _column_arg(kind: str, value: Any, now: datetime) -> Any:
    if kind == "time":
        ago = parse_ago(value)
        # "60d ago" is relative to the rule's instant (the tick's now), never the wall clock.
        return now - ago if ago is not None else parse_time(value)
    if kind == "number":
        return float(value)
    return value


def _field(rule: FieldRule, now: datetime) -> ColumnElement[bool]:
    op, negate = _split(rule.op, rule.value)
    kind = field_kind(rule.field)
    if rule.field.startswith("attributes."):
        expr = _attribute(Lead.attributes, rule.field.split(".", 1)[1], op, rule.value)
    else:
        if op == "in":
            arg: Any = [_column_arg(kind, v, now) for v in rule.value]
        elif op == "exists":
            arg = None
        else:
            arg = _column_arg(kind, rule.value, now)
        if rule.field.startswith("account."):
            account = aliased(Account)
            column = getattr(account, rule.field.split(".", 1)[1])
            # EXISTS on the account's primary key: a lead without an account has no value.
            expr = exists(
                select(literal(1)).where(account.id == Lead.account_id, _positive(column, op, arg))
            )
        else:
            expr = _positive(getattr(Lead, rule.field), op, arg)
    return not_(expr) if negate else expr


# --- JSON attributes --------------------------------------------------------------------------


class _JsonIs(FunctionElement[bool]):
    """TRUE when ``column[key]`` holds a JSON value of ``kind``; compiled per dialect.

    Only a value of the right type is read through ``as_float()`` and friends, so a string
    attribute never reaches a numeric cast (which PostgreSQL would reject).
    """

    type = Boolean()
    inherit_cache = True
    name = "json_is"
    kind: ClassVar[str] = "present"


class _JsonIsString(_JsonIs):
    inherit_cache = True
    kind = "string"


class _JsonIsNumber(_JsonIs):
    inherit_cache = True
    kind = "number"


class _JsonIsBoolean(_JsonIs):
    inherit_cache = True
    kind = "boolean"


class _JsonIsArray(_JsonIs):
    inherit_cache = True
    kind = "array"


_SQLITE_TYPES = {
    "string": "('text')",
    "number": "('integer', 'real')",
    "boolean": "('true', 'false')",
    "array": "('array')",
    "present": "('text', 'integer', 'real', 'true', 'false', 'array', 'object')",
}
_PG_TYPES = {
    "string": "('string')",
    "number": "('number')",
    "boolean": "('boolean')",
    "array": "('array')",
    "present": "('string', 'number', 'boolean', 'array', 'object')",
}


def _key_and_path(key: str) -> tuple[Any, Any]:
    """``key`` for PostgreSQL's ``->`` and its JSON path for SQLite, as two bound values.

    The path is shaped as SQLAlchemy's own ``col[key]`` and built here rather than by
    ``'$."' || key || '"'`` in SQL, which SQLite evaluated once per row (a fifth of a fit
    rule's cost). Both are clauses of the element, so a cached compilation binds each
    rule's own values.
    """
    return literal(key), literal(f'$."{key}"')


@compiles(_JsonIs, "sqlite")
def _json_is_sqlite(element: _JsonIs, compiler: SQLCompiler, **kw: Any) -> str:
    column, _, path = element.clauses.clauses
    kind = f"json_type({compiler.process(column, **kw)}, {compiler.process(path, **kw)})"
    # COALESCE: a missing key has no type, and NULL IN (...) would be NULL, not FALSE.
    return f"COALESCE({kind}, 'missing') IN {_SQLITE_TYPES[element.kind]}"


@compiles(_JsonIs, "postgresql")
def _json_is_pg(element: _JsonIs, compiler: SQLCompiler, **kw: Any) -> str:
    column, key, _ = element.clauses.clauses
    value = f"({compiler.process(column, **kw)} -> {compiler.process(key, **kw)})"
    return f"COALESCE(jsonb_typeof({value}), 'missing') IN {_PG_TYPES[element.kind]}"


@compiles(_JsonIs)
def _json_is_other(element: _JsonIs, compiler: SQLCompiler, **kw: Any) -> str:
    raise CompileError(
        f"JSON attribute rules support SQLite and PostgreSQL, not {compiler.dialect}"
    )


class _JsonArrayHas(FunctionElement[bool]):
    """TRUE when ``column[key]`` is a JSON array with the string ``value`` as an element."""

    type = Boolean()
    inherit_cache = True
    name = "json_array_has"


@compiles(_JsonArrayHas, "sqlite")
def _array_has_sqlite(element: _JsonArrayHas, compiler: SQLCompiler, **kw: Any) -> str:
    column_, _, path_, value_ = element.clauses.clauses
    column, path, value = (compiler.process(c, **kw) for c in (column_, path_, value_))
    return (
        f"(COALESCE(json_type({column}, {path}), '') = 'array' AND EXISTS (SELECT 1 FROM "
        f"json_each({column}, {path}) AS je WHERE je.type = 'text' AND je.value = {value}))"
    )


@compiles(_JsonArrayHas, "postgresql")
def _array_has_pg(element: _JsonArrayHas, compiler: SQLCompiler, **kw: Any) -> str:
    column_, key_, _, value_ = element.clauses.clauses
    column, key, value = (compiler.process(c, **kw) for c in (column_, key_, value_))
    # jsonb @> with a one-element array is membership (and uses a GIN index if present).
    return (
        f"(COALESCE(jsonb_typeof({column} -> {key}), '') = 'array' AND "
        f"COALESCE(({column} -> {key}) @> jsonb_build_array(CAST({value} AS TEXT)), false))"
    )


@compiles(_JsonArrayHas)
def _array_has_other(element: _JsonArrayHas, compiler: SQLCompiler, **kw: Any) -> str:
    raise CompileError(
        f"JSON attribute rules support SQLite and PostgreSQL, not {compiler.dialect}"
    )


def _typed(column: Any, key: str, kind: str) -> ColumnElement[Any]:
    """The attribute as a SQL value of ``kind``, or NULL when it holds anything else."""
    index = column[key]
    guards: dict[str, tuple[type[_JsonIs], Any]] = {
        "string": (_JsonIsString, index.as_string()),
        "number": (_JsonIsNumber, index.as_float()),
        "boolean": (_JsonIsBoolean, index.as_boolean()),
    }
    guard, value = guards[kind]
    # CASE, not AND: PostgreSQL may evaluate AND operands in any order, CASE in order.
    return case((guard(column, *_key_and_path(key)), value), else_=None)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string"


def _json_arg(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _attribute(column: Any, key: str, op: str, value: Any) -> ColumnElement[bool]:
    """A positive operator on ``attributes.<key>``."""
    if op == "exists":
        return _JsonIs(column, *_key_and_path(key))
    if op == "in":
        by_kind: dict[str, list[Any]] = {}
        for item in value:
            by_kind.setdefault(_json_kind(item), []).append(_json_arg(item))
        if not by_kind:
            return false()
        return or_(*(_positive(_typed(column, key, k), "in", v) for k, v in by_kind.items()))
    if op == "contains":
        return or_(
            _positive(_typed(column, key, "string"), "contains", value),
            _JsonArrayHas(column, *_key_and_path(key), literal(value)),
        )
    arg = _json_arg(value)
    return _positive(_typed(column, key, _json_kind(arg)), op, arg)


# --- events and scores ------------------------------------------------------------------------


def _event(rule: EventRule, ctx: RuleContext) -> ColumnElement[bool]:
    ev = aliased(Event)
    conditions: list[ColumnElement[bool]] = [ev.lead_id == Lead.id, ev.type == rule.event]
    own: list[Any] = [ev]
    window = rule.window
    if window is not None:
        conditions.append(ev.occurred_at >= literal(ctx.now - window, UTCDateTime()))
    if rule.url_contains:
        conditions.append(ev.url.icontains(rule.url_contains, autoescape=True))
    if rule.payload is not None:
        p = rule.payload
        conditions.append(_attribute(ev.payload, p.key, p.op, p.value))
    if rule.engagement == "human" and rule.event in ENGAGEMENT_TYPES:
        # Gateways and privacy proxies open and click everything: people only. Rows never
        # classified (written outside record_events) count as people's.
        conditions.append(ev.engagement.is_distinct_from(MACHINE))
    if rule.this_campaign:
        if ctx.campaign_id is None:
            raise ValueError("an event rule with this_campaign needs RuleContext.campaign_id")
        via = aliased(Delivery)
        own.append(via)
        conditions.append(
            exists(
                select(literal(1))
                .where(via.id == ev.delivery_id, via.campaign_id == ctx.campaign_id)
                .correlate_except(via)
            )
        )
    if rule.since_step:
        if ctx.enrollment_id is None:
            raise ValueError("an event rule with since_step needs RuleContext.enrollment_id")
        step = aliased(Delivery)
        sent_at = (
            select(step.sent_at)
            .where(
                step.enrollment_id == ctx.enrollment_id,
                step.step_id == rule.since_step,
                step.status == DeliveryStatus.sent.value,
            )
            .correlate_except(step)
            .scalar_subquery()
        )
        # Never sent: the subquery is NULL, the comparison NULL, and no event counts.
        conditions.append(ev.occurred_at >= sent_at)

    matching = select(literal(1)).where(*conditions).correlate_except(*own)
    op, n = rule.op, rule.count
    # The common shapes ("at least once", "never") as EXISTS: it stops at the first row.
    if (op == "gte" and n == 1) or (op == "gt" and n == 0) or (op == "ne" and n == 0):
        return exists(matching)
    if (op == "eq" and n == 0) or (op == "lt" and n == 1) or (op == "lte" and n == 0):
        return not_(exists(matching))
    if op == "gte" and n == 0:
        return true()
    if op == "lt" and n == 0:
        return false()
    count = (
        select(func.count()).select_from(ev).where(*conditions).correlate_except(*own)
    ).scalar_subquery()
    return _compare(count, op, n)


def _score(kind: str) -> ColumnElement[float]:
    if kind == "behaviour":
        return Lead.behaviour_score.expression
    if kind == "fit":
        return Lead.fit_score.expression
    if kind == "total":
        return Lead.behaviour_score + Lead.fit_score
    account = aliased(Account)
    score = (
        select(account.score)
        .where(account.id == Lead.account_id)
        .correlate_except(account)
        .scalar_subquery()
    )
    return func.coalesce(score, 0.0)
