"""Campaign, scoring and pipeline YAML -> validated pydantic models, with clear errors.

Every error names the file, the line, the key path and what was expected, and unknown
keys, operators, templates and step ids are caught here rather than at send time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nurture.errors import NurtureError
from nurture.spec.rules import AllRule, AnyRule, EventRule, NotRule, Rule, parse_duration
from nurture.spec.yamlfile import LocatedYaml, YamlError, load_yaml

M = TypeVar("M", bound=BaseModel)

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NEXT_WEEKDAY = re.compile(
    r"^\s*next\s+(mon|tue|wed|thu|fri|sat|sun)\w*\s+at\s+(\d{1,2}):(\d{2})\s*$"
)
_STEP_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_LOCAL_TIME = re.compile(r"^\s*(\d{4}-\d{2}-\d{2})[ T](\d{1,2}):(\d{2})\s*$")


def parse_local_time(value: str) -> datetime:
    """A step's ``send_at``: ``"YYYY-MM-DD HH:MM"``, a wall time with no zone (the lead's)."""
    match = _LOCAL_TIME.match(value)
    if not match:
        raise ValueError(
            f'expected a local time like "2026-12-10 09:00" (no zone: the lead\'s own), '
            f"got {value!r}"
        )
    day, hour, minute = match.groups()
    try:
        return datetime.combine(date.fromisoformat(day), time(int(hour), int(minute)))
    except ValueError as exc:
        raise ValueError(f"invalid local time {value!r}: {exc}") from None


def parse_instant(value: Any) -> datetime:
    """A campaign schedule time: ISO 8601 with or without an offset (none means UTC).

    Raises:
        ValueError: the value is not such a time.
    """
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):  # YAML reads a bare 2026-12-10 as a date: its midnight, UTC
        return datetime.combine(value, time(0), tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f'expected a time like "2026-12-10 09:00" (UTC) or "2026-12-10T09:00+01:00", '
                f"got {value!r}"
            ) from None
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f'expected a time like "2026-12-10 09:00", got {value!r}')


Loc = tuple[str | int, ...]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SpecProblems(NurtureError, ValueError):
    """Problems found by a model validator, each at its own key path below the model.

    Pydantic keeps the exception in the error's context, so the loader can report each
    problem at its own line instead of at the top of the model.
    """

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))


def _event_rules(rule: Rule, loc: Loc = ()) -> list[tuple[Loc, EventRule]]:
    """Every event rule inside ``rule``, with its key path."""
    if isinstance(rule, AllRule):
        return [x for i, r in enumerate(rule.all) for x in _event_rules(r, (*loc, "all", i))]
    if isinstance(rule, AnyRule):
        return [x for i, r in enumerate(rule.any) for x in _event_rules(r, (*loc, "any", i))]
    if isinstance(rule, NotRule):
        return _event_rules(rule.not_, (*loc, "not"))
    if isinstance(rule, EventRule):
        return [(loc, rule)]
    return []


def _since_refs(rule: Rule, loc: Loc) -> list[tuple[Loc, str]]:
    """Every ``since_step`` in ``rule`` with its key path."""
    return [
        ((*at, "since_step"), ev.since_step) for at, ev in _event_rules(rule, loc) if ev.since_step
    ]


def _outside_campaign(rule: Rule | None) -> Rule | None:
    """Reject event conditions that need a campaign run (scoring and pipeline rules)."""
    if rule is None:
        return None
    problems: list[tuple[Loc, str]] = []
    for loc, ev in _event_rules(rule):
        if ev.since_step:
            problems.append(((*loc, "since_step"), "since_step only works inside a campaign"))
        if ev.this_campaign:
            problems.append(((*loc, "this_campaign"), "this_campaign only works inside a campaign"))
    if problems:
        raise SpecProblems(problems)
    return rule


@dataclass(frozen=True)
class Wait:
    """A step's wait: a fixed delay, or the next given weekday at a local time."""

    delay: timedelta = timedelta(0)
    weekday: int | None = None  # 0 = Monday
    at: time | None = None

    @classmethod
    def parse(cls, text: str | int | float | None) -> Wait:
        """Parse ``0``, ``30m``, ``4h``, ``2d`` or ``next mon at 09:00``."""
        if text is None or text == 0 or text == "0":
            return cls()
        match = _NEXT_WEEKDAY.match(str(text).lower())
        if match:
            hour, minute = int(match.group(2)), int(match.group(3))
            if hour > 23 or minute > 59:
                raise ValueError(f"invalid time of day in {text!r}")
            return cls(weekday=WEEKDAYS.index(match.group(1)), at=time(hour, minute))
        try:
            return cls(delay=parse_duration(text))
        except ValueError:
            raise ValueError(
                f"expected a wait like 30m, 4h, 2d or 'next mon at 09:00', got {text!r}"
            ) from None


class Variant(_Strict):
    """One arm of an A/B test."""

    name: str | None = None
    template: str
    weight: float = Field(default=1, gt=0)


class Action(_Strict):
    """What a branch arm does: send a template (or variants), jump to a step, or end.

    ``suppress: true`` ends the run and adds the lead's address to the suppression list
    (reason ``sunset``): a re-engagement playbook's sunset for leads who never answered,
    which protects the sender's reputation.
    """

    template: str | None = None
    variants: list[Variant] | None = None
    goto: str | None = None
    end: bool = False
    suppress: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> Action:
        chosen = [k for k in ("template", "variants", "goto") if getattr(self, k)]
        if self.end:
            chosen.append("end")
        if self.suppress:
            chosen.append("suppress")
        if len(chosen) != 1:
            raise ValueError(
                "expected exactly one of template, variants, goto, end: true or suppress: true"
            )
        return self


class BranchArm(Action):
    """``when`` a rule holds, take this action. ``otherwise`` arms have no rule."""

    when: Rule | None = None


def _otherwise(value: Any) -> Any:
    if isinstance(value, dict) and "otherwise" in value:
        rest = {k: v for k, v in value.items() if k != "otherwise"}
        if rest:
            raise ValueError("an 'otherwise' arm takes no other keys")
        inner = value["otherwise"]
        if not isinstance(inner, dict):
            raise ValueError("expected otherwise: {template|goto|end|suppress: ...}")
        return {**inner, "when": None}
    return value


class Step(_Strict):
    """One step of a sequence: wait, then send one template, one of its variants, or branch."""

    id: str
    wait: str | int | None = None
    template: str | None = None
    variants: list[Variant] | None = None
    branch: list[BranchArm] | None = None
    subject: str | None = None
    # A broadcast-style anchor: this wall time in the lead's own zone ("2026-12-10 09:00").
    send_at: str | None = None

    @field_validator("send_at")
    @classmethod
    def _send_at(cls, value: str | None) -> str | None:
        if value is not None:
            parse_local_time(value)
        return value

    @property
    def send_at_local(self) -> datetime | None:
        """The parsed ``send_at`` (a naive local wall time), if the step has one."""
        return parse_local_time(self.send_at) if self.send_at else None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _STEP_ID.match(value):
            raise ValueError("expected a step id of lower-case letters, digits, - and _")
        return value

    @field_validator("wait")
    @classmethod
    def _wait(cls, value: str | int | None) -> str | int | None:
        Wait.parse(value)
        return value

    @field_validator("branch", mode="before")
    @classmethod
    def _arms(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [_otherwise(v) for v in value]
        return value

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        chosen = [k for k in ("template", "variants", "branch") if getattr(self, k)]
        if len(chosen) != 1:
            raise ValueError("a step needs exactly one of template, variants or branch")
        if self.branch and any(a.when is None for a in self.branch[:-1]):
            raise ValueError("only the last branch arm may be 'otherwise'")
        if self.send_at is not None and self.wait not in (None, 0, "0"):
            raise ValueError("a step takes a wait or a send_at anchor, not both")
        return self

    @property
    def wait_spec(self) -> Wait:
        """The parsed wait."""
        return Wait.parse(self.wait)

    def templates(self) -> set[str]:
        """Every template this step may send."""
        names: set[str] = set()
        actions: list[Step | BranchArm] = [self, *(self.branch or [])]
        for action in actions:
            if action.template:
                names.add(action.template)
            names.update(v.template for v in action.variants or [])
        return names


class SendWindow(_Strict):
    """Days and hours, in the lead's own time zone, when mail may go out."""

    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS))
    start: time = time(9, 0)
    end: time = time(17, 0)
    default_timezone: str = "UTC"

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        return _check_timezone(value)

    @field_validator("start", "end", mode="before")
    @classmethod
    def _sexagesimal(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted 17:30 as the base-60 number 1050 (09:00 stays a
        # string); pydantic would take that as seconds. Read it back as hours:minutes.
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < 24 * 60:
                raise ValueError(f'expected a time of day like "09:00", got {value!r}')
            return time(value // 60, value % 60)
        return value

    @model_validator(mode="after")
    def _order(self) -> SendWindow:
        if self.start >= self.end:
            raise ValueError("send window start must be before its end")
        if not self.days:
            raise ValueError("send window needs at least one day")
        return self


class Reentry(_Strict):
    """Whether a lead may enter the campaign again, and after how long."""

    after: str

    @field_validator("after")
    @classmethod
    def _dur(cls, value: str) -> str:
        parse_duration(value)
        return value


class PromoteTarget(_Strict):
    """Which connector and stage a promoted lead goes to."""

    connector: str = "local"
    stage: str = "mql"


class Promote(_Strict):
    """Promote leads that meet ``when`` into ``to``."""

    when: Rule
    to: PromoteTarget = PromoteTarget()


class CampaignSpec(_Strict):
    """One campaign playbook."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    active: bool = True
    audience: Rule
    reentry: Literal["never"] | Reentry = "never"
    send_window: SendWindow | None = None
    steps: list[Step] = Field(min_length=1)
    exit_when: Rule | None = None
    promote: Promote | None = None
    # The From header of this campaign's mail ("Name <addr>" or "addr"), also the domain of
    # its Message-IDs; without it, NURTURE_FROM (or the SMTP block's address).
    from_address: str | None = Field(default=None, alias="from")
    # The consent topic this campaign mails under (consent.yaml names the topics and the
    # lawful bases each accepts); without one, no consent check applies.
    topic: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)
    # The schedule: leads enter only in [starts_at, ends_at); nothing is sent from stop_at.
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    stop_at: datetime | None = None

    @field_validator("starts_at", "ends_at", "stop_at", mode="before")
    @classmethod
    def _schedule_time(cls, value: Any) -> Any:
        return None if value is None else parse_instant(value)

    @field_validator("from_address")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must be one line without control characters")
        from email_validator import EmailNotValidError, validate_email

        from nurture.message.mime import split_address

        try:
            _, addr = split_address(value)
            validate_email(addr, check_deliverability=False)
        except (ValueError, EmailNotValidError) as exc:
            raise ValueError(
                f"expected 'Name <address@domain>' or 'address@domain', got {value!r} ({exc})"
            ) from None
        return value.strip()

    @model_validator(mode="after")
    def _graph(self) -> CampaignSpec:
        problems: list[tuple[Loc, str]] = []
        first: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            if step.id in first:
                problems.append(
                    (
                        ("steps", i, "id"),
                        f"duplicate step id {step.id!r} (also steps.{first[step.id]})",
                    )
                )
            else:
                first[step.id] = i
        known = ", ".join(first)
        refs: list[tuple[Loc, str]] = []
        for i, step in enumerate(self.steps):
            for j, arm in enumerate(step.branch or []):
                if arm.goto and arm.goto not in first:
                    problems.append(
                        (
                            ("steps", i, "branch", j, "goto"),
                            f"goto names unknown step {arm.goto!r}: expected one of {known}",
                        )
                    )
                if arm.when is not None:
                    refs += _since_refs(arm.when, ("steps", i, "branch", j, "when"))
        if self.exit_when is not None:
            refs += _since_refs(self.exit_when, ("exit_when",))
        # Before enrolling (audience) or outside a run (promotion) there are no sent steps.
        early = _since_refs(self.audience, ("audience",))
        if self.promote is not None:
            early += _since_refs(self.promote.when, ("promote", "when"))
        problems += [
            (loc, "since_step only works in branch conditions and exit_when") for loc, _ in early
        ]
        problems += [
            (loc, f"since_step names unknown step {ref!r}: expected one of {known}")
            for loc, ref in refs
            if ref not in first
        ]
        problems += self._schedule_problems()
        if not problems:  # the walk below needs unique, known step ids
            problems = _graph_problems(self.steps)
        if problems:
            raise SpecProblems(problems)
        return self

    def _schedule_problems(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            problems.append((("ends_at",), "ends_at must be after starts_at"))
        if self.starts_at and self.stop_at and self.stop_at <= self.starts_at:
            problems.append((("stop_at",), "stop_at must be after starts_at"))
        previous: tuple[int, datetime] | None = None
        for i, step in enumerate(self.steps):
            anchor = step.send_at_local
            if anchor is None:
                continue
            # Time zones differ by at most 26 hours: an anchor past stop_at by more than
            # that is never sent in any zone.
            if self.stop_at and anchor - timedelta(hours=26) >= self.stop_at.replace(tzinfo=None):
                problems.append(
                    (("steps", i, "send_at"), "send_at is after stop_at: it would never be sent")
                )
            if previous is not None and anchor < previous[1]:
                problems.append(
                    (
                        ("steps", i, "send_at"),
                        f"send_at is before the send_at of steps.{previous[0]}: a lead reaches "
                        "it too late and it would always be skipped",
                    )
                )
            previous = (i, anchor)
        return problems

    def enrolling(self, now: datetime) -> bool:
        """Whether leads may enter at ``now`` (inside ``[starts_at, ends_at)``)."""
        if self.starts_at and now < self.starts_at:
            return False
        return not (self.ends_at and now >= self.ends_at)

    def stopped(self, now: datetime) -> bool:
        """Whether ``stop_at`` has come: nothing of the campaign is sent any more."""
        return self.stop_at is not None and now >= self.stop_at

    def step(self, step_id: str) -> Step:
        """The step with this id."""
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def next_step_id(self, step_id: str) -> str | None:
        """The step after ``step_id`` in file order, or None at the end."""
        ids = [s.id for s in self.steps]
        i = ids.index(step_id)
        return ids[i + 1] if i + 1 < len(ids) else None

    def templates(self) -> set[str]:
        """Every template the campaign may send."""
        return set().union(*(s.templates() for s in self.steps))

    def digest(self) -> str:
        """A stable hash of the spec, to tell versions apart."""
        # A campaign without a topic hashes as it did before topics existed: no version bump.
        skip = {"topic"} if self.topic is None else None
        raw = json.dumps(self.model_dump(mode="json", by_alias=True, exclude=skip), sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()


def _successors(steps: list[Step], index: int) -> list[str]:
    step = steps[index]
    following = steps[index + 1].id if index + 1 < len(steps) else None
    if not step.branch:
        return [following] if following else []
    out: list[str] = []
    has_otherwise = step.branch[-1].when is None
    for arm in step.branch:
        if arm.goto:
            out.append(arm.goto)
        elif not arm.end and not arm.suppress and following:
            out.append(following)
    if not has_otherwise and following:
        out.append(following)  # no arm matched: fall through to the next step
    return out


def _graph_problems(steps: list[Step]) -> list[tuple[Loc, str]]:
    """Unreachable steps, and cycles on which no step waits."""
    index = {s.id: i for i, s in enumerate(steps)}
    edges = {s.id: _successors(steps, i) for i, s in enumerate(steps)}
    seen: set[str] = set()
    stack = [steps[0].id]
    while stack:
        sid = stack.pop()
        if sid not in seen:
            seen.add(sid)
            stack.extend(edges[sid])
    problems: list[tuple[Loc, str]] = [
        (("steps", i), f"step {s.id!r} is unreachable: no step leads to it")
        for i, s in enumerate(steps)
        if s.id not in seen
    ]
    # A cycle is only dangerous when no step on it waits: it would spin within one tick.
    zero_wait = {s.id for s in steps if s.wait_spec == Wait()}
    state: dict[str, int] = {}

    def where(sid: str, nxt: str) -> Loc:
        i = index[sid]
        for j, arm in enumerate(steps[i].branch or []):
            if arm.goto == nxt:
                return ("steps", i, "branch", j, "goto")
        return ("steps", i)

    def visit(sid: str, path: list[str]) -> None:
        state[sid] = 1
        for nxt in edges[sid]:
            if nxt not in zero_wait:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [sid, nxt]
                problems.append(
                    (
                        where(sid, nxt),
                        f"goto cycle with no wait: {' -> '.join(cycle)} (give a step on it a wait)",
                    )
                )
            elif state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[sid] = 2

    for sid in sorted(zero_wait, key=index.__getitem__):
        if state.get(sid) is None:
            visit(sid, [sid])
    return problems


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}: expected an IANA name") from None
    return value


# --- scoring and pipeline --------------------------------------------------------------------


class FitRule(_Strict):
    """Points for leads whose fields match ``when``."""

    name: str | None = None
    when: Rule
    points: float

    @field_validator("when")
    @classmethod
    def _no_campaign_events(cls, value: Rule) -> Rule:
        _outside_campaign(value)
        return value


class AccountRollup(_Strict):
    """How contacts' scores roll up into their account's score."""

    method: Literal["sum", "top_n", "max", "weighted"] = "top_n"
    top: int = Field(default=3, ge=1)
    weights: list[float] = [1.0, 0.5, 0.25]


class StageThreshold(_Strict):
    """A lifecycle stage a lead reaches when ``when`` holds."""

    stage: str
    when: Rule

    @field_validator("when")
    @classmethod
    def _no_campaign_events(cls, value: Rule) -> Rule:
        _outside_campaign(value)
        return value


class ScoringSpec(_Strict):
    """Behaviour points with decay, fit rules and grades, account roll-up, stage thresholds."""

    points: dict[str, float] = {
        "opened": 2,
        "clicked": 5,
        "replied": 15,
        "page_view": 1,
        "form_submit": 10,
        "demo_request": 25,
        "unsubscribed": -20,
        "bounced": -10,
    }
    half_life: str | None = "30d"
    # Score machine opens and clicks too (security gateways, privacy proxies): off by default.
    count_machine_engagement: bool = False
    fit: list[FitRule] = []
    grades: dict[Literal["A", "B", "C", "D"], float] = {"A": 80, "B": 60, "C": 40, "D": 20}
    account: AccountRollup = AccountRollup()
    stages: list[StageThreshold] = []

    @field_validator("half_life")
    @classmethod
    def _hl(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) <= timedelta(0):
            raise ValueError("half_life must be positive")
        return value


class StageSpec(_Strict):
    """One stage of the sales pipeline."""

    id: str
    label: str | None = None
    exit_when: Rule | None = None
    terminal: bool = False

    @field_validator("exit_when")
    @classmethod
    def _no_campaign_events(cls, value: Rule | None) -> Rule | None:
        return _outside_campaign(value)


GoalMetric = Literal["stage_entered", "speed_to_lead_within_1h", "human_touch_within_1h"]
#: Metrics that are a share of the leads captured in the period (a rate, 0 to 1).
RATE_METRICS = frozenset({"speed_to_lead_within_1h", "human_touch_within_1h"})


class GoalSpec(_Strict):
    """A team goal, e.g. ``{metric: stage_entered, stage: sql, per: month, target: 20}``.

    ``stage_entered`` counts leads that entered ``stage`` in the calendar period (UTC);
    ``speed_to_lead_within_1h`` and ``human_touch_within_1h`` are the shares of the leads
    captured in the period whose first email, or first human touch (a stage change pulled
    back from the CRM), came within an hour: targets between 0 and 1.
    """

    metric: GoalMetric
    stage: str | None = None
    per: Literal["day", "week", "month", "quarter"] = "month"
    target: float = Field(gt=0)
    name: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> GoalSpec:
        if self.metric == "stage_entered" and not self.stage:
            raise ValueError("metric stage_entered needs a stage")
        if self.metric != "stage_entered" and self.stage:
            raise ValueError(f"metric {self.metric} takes no stage")
        if self.metric in RATE_METRICS and self.target > 1:
            raise ValueError(f"metric {self.metric} is a share: expected a target from 0 to 1")
        return self

    @property
    def label(self) -> str:
        """What the goal is called in reports."""
        if self.name:
            return self.name
        if self.metric == "stage_entered":
            return f"{self.stage} entered per {self.per}"
        return f"{self.metric.replace('_', ' ')} ({self.per})"


class AlertSpec(_Strict):
    """Tell sales when a lead reaches one of ``stages``: ``{stages: [mql], to: sales}``.

    ``to`` names a channel: a Prefect notification block (Slack, Microsoft Teams, email)
    in a deployment, or a webhook URL configured as ``NURTURE_ALERT_WEBHOOKS``.
    ``by_owner`` sends a lead with that owner to the owner's own channel instead.
    ``link`` is the CRM record's URL, with ``{external_id}`` and ``{connector}``.
    """

    stages: list[str] = Field(min_length=1)
    to: str = Field(min_length=1, max_length=255)
    by_owner: dict[str, str] = {}
    link: str | None = None

    @field_validator("link")
    @classmethod
    def _link(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"expected an http(s) URL with {{external_id}}, got {value!r}")
        return value


class PipelineSpec(_Strict):
    """The ordered pipeline stages, plus side stages such as lost and recycled, goals and
    sales alerts."""

    stages: list[StageSpec] = [
        StageSpec(id="subscriber"),
        StageSpec(id="lead"),
        StageSpec(id="mql", label="Marketing qualified"),
        StageSpec(id="sql", label="Sales accepted"),
        StageSpec(id="opportunity"),
        StageSpec(id="customer", terminal=True),
    ]
    side_stages: list[StageSpec] = [StageSpec(id="lost"), StageSpec(id="recycled")]
    goals: list[GoalSpec] = []
    alerts: list[AlertSpec] = []

    @model_validator(mode="after")
    def _goal_stages(self) -> PipelineSpec:
        known = [s.id for s in [*self.stages, *self.side_stages]]
        problems: list[tuple[Loc, str]] = [
            (
                ("goals", i, "stage"),
                f"unknown stage {goal.stage!r}: expected one of {', '.join(known)}",
            )
            for i, goal in enumerate(self.goals)
            if goal.stage is not None and goal.stage not in known
        ]
        problems += [
            (
                ("alerts", i, "stages", j),
                f"unknown stage {stage!r}: expected one of {', '.join(known)}",
            )
            for i, alert in enumerate(self.alerts)
            for j, stage in enumerate(alert.stages)
            if stage not in known
        ]
        if problems:
            raise SpecProblems(problems)
        return self

    def order(self) -> list[str]:
        """Stage ids in funnel order."""
        return [s.id for s in self.stages]


# --- loading with located errors --------------------------------------------------------------


@dataclass(frozen=True)
class SpecError:
    """One problem in one spec file."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key or '(top level)'}: {self.message}"


class SpecErrors(NurtureError):
    """Raised when one or more specs are invalid; ``errors`` lists them all."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


_TAGS = ("all", "any", "not", "field", "event", "score")


def _rule_tag(node: Any) -> str | None:
    """The union tag pydantic reports for a rule mapping (mirrors ``rules._rule_kind``)."""
    if isinstance(node, dict):
        for key in _TAGS:
            if key in node:
                return key
    return None


def _clean_loc(loc: Loc, data: Any, tagged: int | None = None) -> Loc:
    """Drop pydantic's union-tag segments so the path matches the YAML keys.

    A rule's location comes out as ``(..., "all", "all", 0, "field", "value")``: the first
    ``all`` and ``field`` are union tags, the second ``all`` is the key. A tag is dropped
    once per node, where it names the node's own rule kind. Only the first ``tagged``
    parts (default: all) come from pydantic; the rest are our own plain key paths.
    """
    out: list[str | int] = []
    node = data
    tag_dropped = False
    limit = len(loc) if tagged is None else tagged
    for n, part in enumerate(loc):
        from_pydantic = n < limit
        if (
            from_pydantic
            and isinstance(part, str)
            and part.startswith(("function-", "tagged-union"))
        ):
            continue
        if from_pydantic and not tag_dropped and isinstance(part, str) and part == _rule_tag(node):
            tag_dropped = True
            continue
        if isinstance(node, dict) and part not in node and isinstance(node.get("otherwise"), dict):
            # An "otherwise" arm is validated as its inner mapping.
            out.append("otherwise")
            node = node["otherwise"]
        out.append(part)
        tag_dropped = False
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _errors_from(exc: ValidationError, doc: LocatedYaml) -> list[SpecError]:
    located: list[tuple[Loc, int, str]] = []  # (path, how many parts came from pydantic, msg)
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, SpecProblems):
            located += [((*loc, *sub), len(loc), msg) for sub, msg in cause.problems]
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        located.append((loc, len(loc), msg))
    errors = []
    for raw, tagged, msg in located:
        loc = _clean_loc(raw, doc.data, tagged)
        errors.append(
            SpecError(
                file=str(doc.path),
                line=doc.line_of(loc),
                key=".".join(str(p) for p in loc),
                message=msg,
            )
        )
    return errors


def _validate(model: type[M], doc: LocatedYaml) -> M:
    if not isinstance(doc.data, dict):
        raise SpecErrors([SpecError(str(doc.path), 1, "", "expected a YAML mapping")])
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        raise SpecErrors(_errors_from(exc, doc)) from None


def template_exists(templates_dir: Path) -> Callable[[str], bool]:
    """A predicate telling whether a template name resolves under ``templates_dir``."""

    def exists(name: str) -> bool:
        return (templates_dir / f"{name}.html.j2").is_file()

    return exists


def _yaml_error(path: Path, exc: YamlError) -> SpecError:
    """A spec error for a file that is not valid YAML, at the line the parser stopped."""
    mark = getattr(exc.__cause__, "problem_mark", None)
    problem = getattr(exc.__cause__, "problem", None)
    if mark is not None:
        return SpecError(str(path), mark.line + 1, "", f"invalid YAML: {problem}")
    return SpecError(str(path), None, "", str(exc).removeprefix(f"{path}: "))


def _template_locs(step: Step, i: int) -> list[tuple[Loc, str]]:
    """Every template a step names, with its key path."""
    out: list[tuple[Loc, str]] = []
    actions: list[tuple[Loc, Step | BranchArm]] = [(("steps", i), step)]
    actions += [(("steps", i, "branch", j), arm) for j, arm in enumerate(step.branch or [])]
    for loc, action in actions:
        if action.template:
            out.append(((*loc, "template"), action.template))
        for k, variant in enumerate(action.variants or []):
            out.append(((*loc, "variants", k, "template"), variant.template))
    return out


def _load_campaign_doc(
    path: Path, template_ok: Callable[[str], bool] | None
) -> tuple[CampaignSpec, LocatedYaml]:
    try:
        doc = load_yaml(path)
    except YamlError as exc:
        raise SpecErrors([_yaml_error(path, exc)]) from None
    spec = _validate(CampaignSpec, doc)
    if template_ok is not None:
        missing = []
        for i, step in enumerate(spec.steps):
            for raw, name in _template_locs(step, i):
                if not template_ok(name):
                    loc = _clean_loc(raw, doc.data, 0)
                    missing.append(
                        SpecError(
                            str(path),
                            doc.line_of(loc),
                            ".".join(map(str, loc)),
                            f"template {name!r} not found (expected file {name}.html.j2)",
                        )
                    )
        if missing:
            raise SpecErrors(missing)
    return spec, doc


def load_campaign(path: Path, template_ok: Callable[[str], bool] | None = None) -> CampaignSpec:
    """Load and validate one campaign file; raise :class:`SpecErrors` listing every problem."""
    return _load_campaign_doc(path, template_ok)[0]


SPECIAL_FILES = {
    "scoring.yaml",
    "pipeline.yaml",
    "consent.yaml",
    "scoring.yml",
    "pipeline.yml",
    "consent.yml",
}


def campaign_files(paths: Iterable[Path]) -> list[Path]:
    """Expand folders to the campaign YAML files inside them (skipping scoring/pipeline)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(
                f
                for f in sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
                if f.name not in SPECIAL_FILES
            )
        else:
            out.append(p)
    return out


def check_campaigns(
    paths: Iterable[Path], template_ok: Callable[[str], bool] | None = None
) -> tuple[list[tuple[Path, CampaignSpec]], list[SpecError]]:
    """Validate every campaign file; return the good ones (with their file) and all errors.

    Unlike :func:`load_campaigns` this never raises, so a linter can report the good
    campaigns beside the bad ones.
    """
    good: list[tuple[Path, CampaignSpec]] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    for path in campaign_files(paths):
        try:
            spec, doc = _load_campaign_doc(path, template_ok)
        except SpecErrors as exc:
            errors.extend(exc.errors)
            continue
        if spec.name in seen:
            errors.append(
                SpecError(
                    str(path),
                    doc.line_of(("name",)),
                    "name",
                    f"duplicate campaign name {spec.name!r} (also in {seen[spec.name]})",
                )
            )
            continue
        seen[spec.name] = path
        good.append((path, spec))
    return good, errors


def load_campaigns(
    paths: Iterable[Path], template_ok: Callable[[str], bool] | None = None
) -> list[CampaignSpec]:
    """Load every campaign; collect the errors of all files before raising."""
    good, errors = check_campaigns(paths, template_ok)
    if errors:
        raise SpecErrors(errors)
    return [spec for _, spec in good]


def load_scoring(path: Path | None) -> ScoringSpec:
    """Load ``scoring.yaml``; a missing file gives the defaults."""
    if path is None or not path.exists():
        return ScoringSpec()
    try:
        doc = load_yaml(path)
    except YamlError as exc:
        raise SpecErrors([_yaml_error(path, exc)]) from None
    return _validate(ScoringSpec, doc)


def load_pipeline(path: Path | None) -> PipelineSpec:
    """Load ``pipeline.yaml``; a missing file gives the default stages."""
    if path is None or not path.exists():
        return PipelineSpec()
    try:
        doc = load_yaml(path)
    except YamlError as exc:
        raise SpecErrors([_yaml_error(path, exc)]) from None
    return _validate(PipelineSpec, doc)
