"""The declarative rule language shared by audiences, branches, exits, scoring and promotion.

A rule is a small tree: ``all`` / ``any`` / ``not`` combinators over field, event and
score conditions. :mod:`nurture.journey.segments` compiles it to one SQL expression.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

FieldOp = Literal[
    "eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "contains", "starts_with", "exists"
]
CountOp = Literal["eq", "ne", "gt", "gte", "lt", "lte"]

#: Lead columns a field rule may name; ``attributes.<key>`` and ``account.<column>`` also work.
LEAD_FIELDS = frozenset(
    {
        "email",
        "first_name",
        "last_name",
        "source",
        "timezone",
        "country",
        "lifecycle_stage",
        "owner",
        "behaviour_score",
        "fit_score",
        "grade",
        "created_at",
        "updated_at",
    }
)
ACCOUNT_FIELDS = frozenset({"name", "domain", "timezone", "country", "score"})
#: Fields holding numbers and timestamps; every other column is text.
NUMBER_FIELDS = frozenset({"behaviour_score", "fit_score", "account.score"})
TIME_FIELDS = frozenset({"created_at", "updated_at"})
#: The engagement classes of opens and clicks; an event rule may ask for ``engagement: human``.
HUMAN = "human"
MACHINE = "machine"
#: The event types that are classified; every other type has no engagement class.
ENGAGEMENT_TYPES = ("opened", "clicked")
#: ``attributes.<key>``: keys are names, not JSON paths, so they stay safe in both dialects.
_ATTRIBUTE_KEY = re.compile(r"^[\w][\w -]*$")
SCORES = frozenset({"behaviour", "fit", "account", "total"})

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_AGO = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s+ago\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str | int | float) -> timedelta:
    """Parse ``90s``, ``30m``, ``4h``, ``2d`` or ``1w``; a bare number means days."""
    if isinstance(text, int | float):
        return timedelta(days=float(text))
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"expected a duration like 30m, 4h, 2d or 1w, got {text!r}")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_ago(value: Any) -> timedelta | None:
    """``"60d ago"`` (a time relative to the rule's instant) as a timedelta, else None."""
    if not isinstance(value, str):
        return None
    match = _AGO.match(value)
    if not match:
        return None
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FieldRule(_Strict):
    """Compare a lead column, ``attributes.<key>`` or ``account.<column>`` with a value."""

    field: str
    op: FieldOp = "eq"
    value: Any = Field(default=None, validate_default=True)

    @field_validator("field")
    @classmethod
    def _known_field(cls, name: str) -> str:
        if name in LEAD_FIELDS:
            return name
        if name.startswith("attributes."):
            if _ATTRIBUTE_KEY.match(name.split(".", 1)[1]):
                return name
            raise ValueError(
                f"bad attribute name in {name!r}: expected attributes.<key> where the key "
                "has letters, digits, _, - or spaces (no dots or quotes)"
            )
        if name.startswith("account.") and name.split(".", 1)[1] in ACCOUNT_FIELDS:
            return name
        known = ", ".join(sorted(LEAD_FIELDS))
        raise ValueError(
            f"unknown field {name!r}: expected one of {known}, attributes.<key> "
            f"or account.<{'|'.join(sorted(ACCOUNT_FIELDS))}>"
        )

    @field_validator("value")
    @classmethod
    def _value_shape(cls, value: Any, info: ValidationInfo) -> Any:
        # ``field`` and ``op`` are declared first, so they are already checked; if either
        # failed, its own error is the one worth reading.
        name, op = info.data.get("field"), info.data.get("op")
        if name is None or op is None:
            return value
        check_field_value(name, op, value)
        return value


def field_kind(name: str) -> Literal["text", "number", "time", "json"]:
    """What a field holds: text, number, time, or untyped JSON (``attributes.<key>``)."""
    if name.startswith("attributes."):
        return "json"
    if name in NUMBER_FIELDS:
        return "number"
    if name in TIME_FIELDS:
        return "time"
    return "text"


def parse_time(value: Any) -> datetime | None:
    """An ISO date or datetime (string or YAML date) as an aware UTC datetime, else None.

    A date means midnight UTC; a naive datetime is taken as UTC, like everything we store.
    """
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_scalar(name: str, kind: str, value: Any) -> None:
    if kind == "number" and not _is_number(value):
        raise ValueError(f"{name} holds numbers: expected a number, got {value!r}")
    if kind == "time" and parse_time(value) is None and parse_ago(value) is None:
        raise ValueError(
            f"{name} holds times: expected an ISO date or datetime, or a relative time "
            f"like '60d ago', got {value!r}"
        )
    if kind == "text" and not isinstance(value, str):
        raise ValueError(f"{name} holds text: expected a string, got {value!r}")
    if kind == "json" and not isinstance(value, str | int | float | bool | date):
        raise ValueError(f"expected a string, number, boolean or date, got {value!r}")


def check_field_value(name: str, op: str, value: Any) -> None:
    """Raise ValueError when ``value`` does not fit operator ``op`` on field ``name``."""
    kind = field_kind(name)
    if op == "exists":
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"exists takes true or false (or no value), got {value!r}")
    elif op in ("in", "not_in"):
        if not isinstance(value, list):
            raise ValueError(f"{op} needs a list of values, got {value!r}")
        for item in value:
            _check_scalar(name, kind, item)
    elif op in ("gt", "gte", "lt", "lte"):
        if kind == "text":
            raise ValueError(f"{name} holds text: {op} compares numbers or dates only")
        if kind == "json" and not _is_number(value) and parse_time(value) is None:
            raise ValueError(f"{op} needs a number or an ISO date, got {value!r}")
        if kind != "json":
            _check_scalar(name, kind, value)
    elif op in ("contains", "starts_with"):
        if kind in ("number", "time"):
            raise ValueError(f"{name} holds {kind}s: {op} works on text only")
        if not isinstance(value, str) or not value:
            raise ValueError(f"{op} needs a non-empty string, got {value!r}")
    else:  # eq, ne
        if value is None:
            raise ValueError(f"{op} needs a value; use op: exists to test for a missing one")
        _check_scalar(name, kind, value)


PayloadOp = Literal["eq", "in", "gt", "gte", "lt", "lte", "contains", "exists"]


class PayloadRule(_Strict):
    """A condition on one key of an event's payload, e.g. an NPS answer's ``score >= 9``."""

    key: str
    op: PayloadOp = "eq"
    value: Any = Field(default=None, validate_default=True)

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        if not _ATTRIBUTE_KEY.match(key):
            raise ValueError(
                f"bad payload key {key!r}: expected letters, digits, _, - or spaces "
                "(no dots or quotes)"
            )
        return key

    @field_validator("value")
    @classmethod
    def _value_shape(cls, value: Any, info: ValidationInfo) -> Any:
        key, op = info.data.get("key"), info.data.get("op")
        if key is None or op is None:
            return value
        # A payload value is untyped JSON, like an attribute: the same checks apply.
        check_field_value(f"attributes.{key}", op, value)
        return value


class EventRule(_Strict):
    """Count a lead's events: ``clicked at least N times within D`` or since a step was sent.

    ``payload`` keeps only the events whose payload matches, e.g. ``{key: score, op: gte,
    value: 9}`` for the promoters among NPS answers.
    """

    event: str
    op: CountOp = "gte"
    count: int = Field(default=1, ge=0)
    within: str | None = None
    since_step: str | None = None
    url_contains: str | None = None
    payload: PayloadRule | None = None
    this_campaign: bool = Field(default=False)
    # Opens and clicks: count only people's (the default) or machines' too.
    engagement: Literal["human", "any"] = "human"

    @field_validator("within")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def window(self) -> timedelta | None:
        """The look-back window as a timedelta, if any."""
        return parse_duration(self.within) if self.within else None


class ScoreRule(_Strict):
    """Compare one of a lead's scores: behaviour, fit, account or total."""

    score: Literal["behaviour", "fit", "account", "total"]
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte"] = "gte"
    value: float


class AllRule(_Strict):
    """True when every sub-rule is."""

    all: list[Rule] = Field(min_length=1)


class AnyRule(_Strict):
    """True when at least one sub-rule is."""

    any: list[Rule] = Field(min_length=1)


class NotRule(_Strict):
    """True when the sub-rule is false."""

    not_: Rule = Field(alias="not")


def _rule_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {
            AllRule: "all",
            AnyRule: "any",
            NotRule: "not",
            FieldRule: "field",
            EventRule: "event",
            ScoreRule: "score",
        }.get(type(value))
    if isinstance(value, dict):
        for key in ("all", "any", "not", "field", "event", "score"):
            if key in value:
                return key
    return None


Rule = Annotated[
    Annotated[AllRule, Tag("all")]
    | Annotated[AnyRule, Tag("any")]
    | Annotated[NotRule, Tag("not")]
    | Annotated[FieldRule, Tag("field")]
    | Annotated[EventRule, Tag("event")]
    | Annotated[ScoreRule, Tag("score")],
    Discriminator(
        _rule_kind,
        custom_error_type="invalid_rule",
        custom_error_message=(
            "expected a rule: a mapping with one of all, any, not, field, event or score"
        ),
    ),
]

AllRule.model_rebuild()
AnyRule.model_rebuild()
NotRule.model_rebuild()


def step_references(rule: Rule) -> set[str]:
    """Step ids named by ``since_step`` anywhere in the rule."""
    if isinstance(rule, AllRule):
        return set().union(*(step_references(r) for r in rule.all))
    if isinstance(rule, AnyRule):
        return set().union(*(step_references(r) for r in rule.any))
    if isinstance(rule, NotRule):
        return step_references(rule.not_)
    if isinstance(rule, EventRule) and rule.since_step:
        return {rule.since_step}
    return set()
