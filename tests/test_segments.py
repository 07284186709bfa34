"""The rule compiler against real SQLite and PostgreSQL: every operator, NULLs, events, scores."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.orm import Session

from nurture.journey.segments import RuleContext, compile_rule, select_lead_ids
from nurture.spec.rules import Rule
from nurture.store.db import make_engine, upgrade
from nurture.store.models import Account, Campaign, Delivery, Enrollment, Event, Lead

RULE: TypeAdapter[Any] = TypeAdapter(Rule)
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)


def rule(data: dict[str, Any]) -> Any:
    return RULE.validate_python(data)


def matches(engine: Engine, data: dict[str, Any], ctx: RuleContext | None = None) -> set[str]:
    """The local parts of the emails of the leads matching ``data``."""
    query = select(Lead.email).where(compile_rule(rule(data), ctx or RuleContext(now=NOW)))
    with Session(engine) as session:
        return {e.split("@")[0] for e in session.scalars(query)}


def check_all(engine: Engine, cases: list[tuple[dict[str, Any], set[str]]]) -> None:
    """Run every case on one database and report every mismatch at once."""
    wrong = []
    for data, expected in cases:
        got = matches(engine, data)
        if got != expected:
            wrong.append(f"{data}: expected {sorted(expected)}, got {sorted(got)}")
    assert not wrong, "\n".join(wrong)


def _lead(email: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "email": email,
        "first_name": None,
        "country": None,
        "account_id": None,
        "source": "website",
        "lifecycle_stage": "lead",
        "attributes": {},
        "behaviour_score": 0.0,
        "fit_score": 0.0,
        "created_at": NOW - timedelta(days=1),
        "updated_at": NOW,
    }
    row.update(kw)
    return row


@pytest.fixture
def people(engine: Engine) -> Engine:
    """Five leads (ann, bob, cy, dee_x, deeyx) and two accounts (acme, beta)."""
    with Session(engine) as s, s.begin():
        acme, beta = s.scalars(
            insert(Account).returning(Account.id),
            [
                {"name": "Acme Inc", "domain": "acme.com", "country": "US", "score": 40.0,
                 "timezone": "America/New_York", "created_at": NOW, "updated_at": NOW},
                {"name": "Beta GmbH", "domain": None, "country": "DE", "score": 10.0,
                 "timezone": None, "created_at": NOW, "updated_at": NOW},
            ],
        ).all()  # fmt: skip
        s.execute(
            insert(Lead),
            [
                _lead("ann@acme.com", first_name="Ann", country="US", account_id=acme,
                      owner="sam", behaviour_score=30.0, fit_score=20.0,
                      created_at=NOW - timedelta(days=30),
                      attributes={"type": "b2b", "size": 250, "vip": True,
                                  "tags": ["vip", "beta"], "since": "2025-06-01"}),
                _lead("bob@shop.io", source="social", lifecycle_stage="subscriber",
                      behaviour_score=5.0,
                      attributes={"type": "retail", "size": "big", "vip": False, "tags": "a vip"}),
                _lead("cy@beta.org", first_name="100%_real", country="DE", account_id=beta,
                      source="partner", lifecycle_stage="mql", behaviour_score=50.0,
                      fit_score=45.0, created_at=NOW - timedelta(days=10),
                      attributes={"size": 12.5, "type": None, "employees": 10}),
                _lead("dee_x@acme.com", first_name="100xyreal", country="US", account_id=acme,
                      lifecycle_stage="customer", fit_score=60.0,
                      created_at=NOW - timedelta(days=100)),
                _lead("deeyx@other.net", first_name="Éva", source="import", behaviour_score=12.0,
                      fit_score=12.0, created_at=NOW - timedelta(days=5),
                      attributes={"size": 250.0, "type": "B2B"}),
            ],
        )  # fmt: skip
    return engine


EVERYONE = {"ann", "bob", "cy", "dee_x", "deeyx"}


def test_column_operators(people: Engine) -> None:
    check_all(
        people,
        [
            ({"field": "source", "op": "eq", "value": "website"}, {"ann", "dee_x"}),
            ({"field": "source", "value": "website"}, {"ann", "dee_x"}),  # eq is the default
            ({"field": "source", "op": "ne", "value": "website"}, {"bob", "cy", "deeyx"}),
            ({"field": "source", "op": "in", "value": ["social", "partner"]}, {"bob", "cy"}),
            ({"field": "source", "op": "not_in", "value": ["social", "partner"]},
             {"ann", "dee_x", "deeyx"}),
            # NULL country: not "US", so ne / not_in match it; eq / in never do.
            ({"field": "country", "op": "eq", "value": "US"}, {"ann", "dee_x"}),
            ({"field": "country", "op": "ne", "value": "US"}, {"bob", "cy", "deeyx"}),
            ({"field": "country", "op": "in", "value": ["US", "DE"]}, {"ann", "cy", "dee_x"}),
            ({"field": "country", "op": "not_in", "value": ["US"]}, {"bob", "cy", "deeyx"}),
            ({"field": "country", "op": "exists"}, {"ann", "cy", "dee_x"}),
            ({"field": "country", "op": "exists", "value": True}, {"ann", "cy", "dee_x"}),
            ({"field": "country", "op": "exists", "value": False}, {"bob", "deeyx"}),
            ({"field": "owner", "op": "exists"}, {"ann"}),
            ({"field": "lifecycle_stage", "op": "in", "value": []}, set()),
            ({"field": "lifecycle_stage", "op": "not_in", "value": []}, EVERYONE),
            # contains / starts_with are case-insensitive and NULL never contains anything.
            ({"field": "first_name", "op": "contains", "value": "NN"}, {"ann"}),
            ({"field": "first_name", "op": "starts_with", "value": "an"}, {"ann"}),
            ({"field": "email", "op": "contains", "value": "@acme."}, {"ann", "dee_x"}),
            ({"field": "behaviour_score", "op": "gt", "value": 12}, {"ann", "cy"}),
            ({"field": "behaviour_score", "op": "gte", "value": 12}, {"ann", "cy", "deeyx"}),
            ({"field": "behaviour_score", "op": "lt", "value": 5}, {"dee_x"}),
            ({"field": "behaviour_score", "op": "lte", "value": 5}, {"bob", "dee_x"}),
            ({"field": "behaviour_score", "op": "eq", "value": 12}, {"deeyx"}),
            ({"field": "behaviour_score", "op": "ne", "value": 12}, EVERYONE - {"deeyx"}),
            ({"field": "fit_score", "op": "gte", "value": 45.0}, {"cy", "dee_x"}),
            # Times: ISO strings, YAML dates and aware datetimes all compare in UTC.
            ({"field": "created_at", "op": "gt", "value": "2026-02-11"}, {"bob", "cy", "deeyx"}),
            ({"field": "created_at", "op": "lt", "value": date(2026, 2, 11)}, {"ann", "dee_x"}),
            ({"field": "created_at", "op": "gte", "value": "2026-02-21T10:00:00+00:00"},
             {"bob", "cy", "deeyx"}),
            ({"field": "created_at", "op": "gte", "value": "2026-02-21T11:00:00+01:00"},
             {"bob", "cy", "deeyx"}),
            ({"field": "created_at", "op": "gt", "value": "2026-02-21T10:00:00"},
             {"bob", "deeyx"}),
        ],
    )  # fmt: skip


def test_like_wildcards_in_values_are_literal(people: Engine) -> None:
    # Unescaped, "0%_r" would also match "100xyreal" and "dee_" would match "deeyx".
    check_all(
        people,
        [
            ({"field": "first_name", "op": "contains", "value": "0%_r"}, {"cy"}),
            ({"field": "first_name", "op": "starts_with", "value": "100%"}, {"cy"}),
            ({"field": "first_name", "op": "contains", "value": "%"}, {"cy"}),
            ({"field": "email", "op": "starts_with", "value": "dee_"}, {"dee_x"}),
            ({"field": "email", "op": "contains", "value": "_"}, {"dee_x"}),
            ({"field": "first_name", "op": "contains", "value": "/"}, set()),  # the escape char
        ],
    )


def test_attribute_operators(people: Engine) -> None:
    check_all(
        people,
        [
            # Strings: eq is exact, contains/starts_with are case-insensitive.
            ({"field": "attributes.type", "op": "eq", "value": "b2b"}, {"ann"}),
            ({"field": "attributes.type", "op": "ne", "value": "b2b"},
             {"bob", "cy", "dee_x", "deeyx"}),
            ({"field": "attributes.type", "op": "starts_with", "value": "B2"}, {"ann", "deeyx"}),
            ({"field": "attributes.type", "op": "in", "value": ["retail", "B2B"]},
             {"bob", "deeyx"}),
            # JSON null and a missing key both count as "not there".
            ({"field": "attributes.type", "op": "exists"}, {"ann", "bob", "deeyx"}),
            ({"field": "attributes.type", "op": "exists", "value": False}, {"cy", "dee_x"}),
            # Numbers compare numerically (250 == 250.0); a string "big" is not a number.
            ({"field": "attributes.size", "op": "gt", "value": 100}, {"ann", "deeyx"}),
            ({"field": "attributes.size", "op": "eq", "value": 250}, {"ann", "deeyx"}),
            ({"field": "attributes.size", "op": "lt", "value": 100}, {"cy"}),
            ({"field": "attributes.size", "op": "lte", "value": 12.5}, {"cy"}),
            ({"field": "attributes.size", "op": "gte", "value": 13}, {"ann", "deeyx"}),
            ({"field": "attributes.size", "op": "eq", "value": "big"}, {"bob"}),
            ({"field": "attributes.size", "op": "ne", "value": 250}, {"bob", "cy", "dee_x"}),
            ({"field": "attributes.size", "op": "in", "value": [250, "big"]},
             {"ann", "bob", "deeyx"}),
            ({"field": "attributes.size", "op": "not_in", "value": [250, "big"]},
             {"cy", "dee_x"}),
            ({"field": "attributes.employees", "op": "gte", "value": 10}, {"cy"}),
            # Booleans match JSON booleans only.
            ({"field": "attributes.vip", "op": "eq", "value": True}, {"ann"}),
            ({"field": "attributes.vip", "op": "eq", "value": False}, {"bob"}),
            ({"field": "attributes.vip", "op": "ne", "value": True},
             {"bob", "cy", "dee_x", "deeyx"}),
            ({"field": "attributes.vip", "op": "in", "value": [True, False]}, {"ann", "bob"}),
            # contains: membership in a list, substring in a string.
            ({"field": "attributes.tags", "op": "contains", "value": "vip"}, {"ann", "bob"}),
            ({"field": "attributes.tags", "op": "contains", "value": "beta"}, {"ann"}),
            ({"field": "attributes.tags", "op": "contains", "value": "bet"}, set()),
            # ISO dates in attributes compare as text.
            ({"field": "attributes.since", "op": "gte", "value": "2025-01-01"}, {"ann"}),
            ({"field": "attributes.since", "op": "lt", "value": date(2025, 1, 1)}, set()),
            # A key nobody has.
            ({"field": "attributes.nope", "op": "exists"}, set()),
            ({"field": "attributes.nope", "op": "ne", "value": "x"}, EVERYONE),
            ({"field": "attributes.nope", "op": "not_in", "value": [1, "x"]}, EVERYONE),
            ({"field": "attributes.nope", "op": "gt", "value": 0}, set()),
        ],
    )  # fmt: skip


def test_account_fields(people: Engine) -> None:
    check_all(
        people,
        [
            ({"field": "account.domain", "op": "eq", "value": "acme.com"}, {"ann", "dee_x"}),
            # No account, or an account without a domain: "not acme.com".
            ({"field": "account.domain", "op": "ne", "value": "acme.com"},
             {"bob", "cy", "deeyx"}),
            ({"field": "account.domain", "op": "exists"}, {"ann", "dee_x"}),
            ({"field": "account.domain", "op": "exists", "value": False}, {"bob", "cy", "deeyx"}),
            ({"field": "account.country", "op": "in", "value": ["DE"]}, {"cy"}),
            ({"field": "account.country", "op": "not_in", "value": ["DE"]},
             {"ann", "bob", "dee_x", "deeyx"}),
            ({"field": "account.score", "op": "gt", "value": 20}, {"ann", "dee_x"}),
            ({"field": "account.score", "op": "lte", "value": 10}, {"cy"}),
            ({"field": "account.name", "op": "starts_with", "value": "beta"}, {"cy"}),
            ({"field": "account.name", "op": "contains", "value": "INC"}, {"ann", "dee_x"}),
            ({"field": "account.timezone", "op": "exists"}, {"ann", "dee_x"}),
        ],
    )  # fmt: skip


def test_combinators(people: Engine) -> None:
    us = {"field": "country", "op": "eq", "value": "US"}
    check_all(
        people,
        [
            ({"all": [{"field": "source", "value": "website"},
                      {"field": "account.score", "op": "gt", "value": 20}]}, {"ann", "dee_x"}),
            ({"all": [us, {"field": "attributes.vip", "value": True}]}, {"ann"}),
            ({"any": [{"field": "country", "value": "DE"},
                      {"field": "attributes.vip", "value": False}]}, {"bob", "cy"}),
            # not is a true complement: leads with a NULL country are "not US".
            ({"not": us}, {"bob", "cy", "deeyx"}),
            ({"not": {"not": us}}, {"ann", "dee_x"}),
            ({"not": {"field": "attributes.size", "op": "gt", "value": 100}},
             {"bob", "cy", "dee_x"}),
            ({"not": {"any": [us, {"field": "source", "value": "social"}]}}, {"cy", "deeyx"}),
            ({"all": [{"any": [us, {"not": us}]}]}, EVERYONE),
        ],
    )  # fmt: skip


def test_score_rules(people: Engine) -> None:
    check_all(
        people,
        [
            ({"score": "behaviour", "op": "gte", "value": 30}, {"ann", "cy"}),
            ({"score": "behaviour", "value": 30}, {"ann", "cy"}),  # gte is the default
            ({"score": "fit", "op": "gt", "value": 40}, {"cy", "dee_x"}),
            ({"score": "total", "op": "gte", "value": 50}, {"ann", "cy", "dee_x"}),
            ({"score": "total", "op": "eq", "value": 24}, {"deeyx"}),
            ({"score": "account", "op": "gte", "value": 10}, {"ann", "cy", "dee_x"}),
            # No account scores 0.
            ({"score": "account", "op": "eq", "value": 0}, {"bob", "deeyx"}),
            ({"score": "account", "op": "lt", "value": 40}, {"bob", "cy", "deeyx"}),
            ({"score": "account", "op": "ne", "value": 40}, {"bob", "cy", "deeyx"}),
        ],
    )


def test_select_lead_ids(people: Engine) -> None:
    with Session(people) as s:
        ids = set(s.scalars(select_lead_ids(rule({"field": "source", "value": "website"}),
                                            RuleContext(now=NOW))))  # fmt: skip
        expected = set(s.scalars(select(Lead.id).where(Lead.source == "website")))
    assert ids == expected and len(ids) == 2


# --- events -----------------------------------------------------------------------------------


class Journey:
    """Two campaigns, three enrollments, their deliveries and a few clicks, built by hand."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with Session(engine) as s, s.begin():
            self.c1, self.c2 = s.scalars(
                insert(Campaign).returning(Campaign.id),
                [{"name": n, "spec": {}, "spec_hash": n, "created_at": NOW, "updated_at": NOW}
                 for n in ("one", "two")],
            ).all()  # fmt: skip
            self.ann, self.bob, self.cy = s.scalars(
                insert(Lead).returning(Lead.id),
                [_lead("ann@x.com"), _lead("bob@x.com"), _lead("cy@x.com")],
            ).all()
            # ann in both campaigns, bob in one, cy in none.
            self.e1, self.e2, self.e3 = s.scalars(
                insert(Enrollment).returning(Enrollment.id),
                [
                    {"campaign_id": self.c1, "lead_id": self.ann, "enrolled_at": NOW},
                    {"campaign_id": self.c2, "lead_id": self.ann, "enrolled_at": NOW},
                    {"campaign_id": self.c1, "lead_id": self.bob, "enrolled_at": NOW},
                ],
            ).all()
            d = self._delivery
            self.ann_welcome = d(s, self.e1, self.c1, self.ann, "welcome", NOW - timedelta(days=5))
            self.ann_case = d(s, self.e1, self.c1, self.ann, "case", NOW - timedelta(days=2))
            d(s, self.e2, self.c2, self.ann, "case", None)  # queued, never sent
            d(s, self.e2, self.c2, self.ann, "welcome", NOW - timedelta(days=1), "failed")
            self.bob_case = d(s, self.e3, self.c1, self.bob, "case", NOW - timedelta(days=10))
            s.execute(
                insert(Event),
                [
                    self._event(self.ann, "clicked", 3, self.ann_welcome, "https://x.io/pricing"),
                    self._event(self.ann, "clicked", 1, self.ann_case, "https://x.io/Demo"),
                    self._event(self.ann, "clicked", 1 / 24, None, "https://x.io/blog"),
                    self._event(self.ann, "opened", 1, self.ann_case, None),
                    self._event(self.bob, "clicked", 9, self.bob_case, "https://x.io/100%_off"),
                    self._event(self.bob, "clicked", 7, None, "https://x.io/100xyoff"),
                    self._event(self.cy, "replied", 0, None, None),
                ],
            )

    @staticmethod
    def _delivery(
        s: Session, enr: int, camp: int, lead: int, step: str, sent: datetime | None,
        status: str | None = None,
    ) -> int:  # fmt: skip
        row = {
            "enrollment_id": enr, "campaign_id": camp, "lead_id": lead, "step_id": step,
            "template": step, "domain": "x.com",
            "status": status or ("sent" if sent else "queued"),
            "message_id": f"<{enr}.{step}@x>", "due_at": NOW - timedelta(days=20),
            "queued_at": NOW - timedelta(days=20), "sent_at": sent, "updated_at": NOW,
        }  # fmt: skip
        return s.scalars(insert(Delivery).returning(Delivery.id), [row]).one()

    @staticmethod
    def _event(
        lead: int, kind: str, days_ago: float, delivery: int | None, url: str | None
    ) -> dict[str, Any]:
        return {
            "lead_id": lead,
            "type": kind,
            "occurred_at": NOW - timedelta(days=days_ago),
            "delivery_id": delivery,
            "url": url,
        }

    def leads(self, data: dict[str, Any], campaign: int | None = None) -> set[str]:
        return matches(self.engine, data, RuleContext(now=NOW, campaign_id=campaign))

    def enrollments(self, data: dict[str, Any], campaign: int | None = None) -> set[int]:
        """Enrollment ids matching ``data``, with since_step correlated to each enrollment."""
        ctx = RuleContext(now=NOW, campaign_id=campaign, enrollment_id=Enrollment.id)
        query = (
            select(Enrollment.id)
            .join(Lead, Lead.id == Enrollment.lead_id)
            .where(compile_rule(rule(data), ctx))
        )
        with Session(self.engine) as s:
            return set(s.scalars(query))


@pytest.fixture
def journey(engine: Engine) -> Journey:
    return Journey(engine)


def test_event_counts_and_windows(journey: Journey) -> None:
    j = journey
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"event": "clicked"}, {"ann", "bob"}),
        ({"event": "clicked", "op": "gte", "count": 3}, {"ann"}),
        ({"event": "clicked", "op": "eq", "count": 2}, {"bob"}),
        ({"event": "clicked", "op": "eq", "count": 0}, {"cy"}),
        ({"event": "clicked", "op": "lt", "count": 1}, {"cy"}),
        ({"event": "clicked", "op": "lt", "count": 3}, {"bob", "cy"}),
        ({"event": "clicked", "op": "lte", "count": 2}, {"bob", "cy"}),
        ({"event": "clicked", "op": "gt", "count": 0}, {"ann", "bob"}),
        ({"event": "clicked", "op": "gt", "count": 2}, {"ann"}),
        ({"event": "clicked", "op": "ne", "count": 2}, {"ann", "cy"}),
        ({"event": "clicked", "op": "ne", "count": 0}, {"ann", "bob"}),
        ({"event": "clicked", "op": "gte", "count": 0}, {"ann", "bob", "cy"}),
        ({"event": "clicked", "op": "lt", "count": 0}, set()),
        ({"event": "replied"}, {"cy"}),
        ({"event": "bounced"}, set()),
        # within: clicks in the last 2 days (ann: 1d and 1h ago).
        ({"event": "clicked", "within": "2d"}, {"ann"}),
        ({"event": "clicked", "within": "2d", "count": 2}, {"ann"}),
        ({"event": "clicked", "within": "2h"}, {"ann"}),
        ({"event": "clicked", "within": "30m"}, set()),
        # The window includes its start: bob's click exactly 7 days ago counts.
        ({"event": "clicked", "within": "1w"}, {"ann", "bob"}),
        ({"event": "clicked", "within": "1w", "op": "eq", "count": 1}, {"bob"}),
        ({"event": "clicked", "within": "6d"}, {"ann"}),
        ({"event": "replied", "within": "1h"}, {"cy"}),
        # url_contains is case-insensitive and escapes LIKE wildcards.
        ({"event": "clicked", "url_contains": "demo"}, {"ann"}),
        ({"event": "clicked", "url_contains": "100%_"}, {"bob"}),
        ({"event": "clicked", "url_contains": "100%_", "op": "eq", "count": 1}, {"bob"}),
        ({"event": "clicked", "url_contains": "x.io", "count": 2}, {"ann", "bob"}),
        # Combined with other rules.
        ({"all": [{"event": "clicked"}, {"not": {"event": "clicked", "within": "2d"}}]},
         {"bob"}),
    ]  # fmt: skip
    wrong = [
        f"{data}: expected {sorted(exp)}, got {sorted(got)}"
        for data, exp in cases
        if (got := j.leads(data)) != exp
    ]
    assert not wrong, "\n".join(wrong)


def test_this_campaign(journey: Journey) -> None:
    j = journey
    clicked_here = {"event": "clicked", "this_campaign": True}
    assert j.leads(clicked_here, j.c1) == {"ann", "bob"}
    assert j.leads({**clicked_here, "count": 2}, j.c1) == {"ann"}  # not the blog click
    assert j.leads(clicked_here, j.c2) == set()
    assert j.leads({"event": "opened", "this_campaign": True}, j.c1) == {"ann"}
    assert j.leads({"event": "opened", "this_campaign": True}, j.c2) == set()
    with pytest.raises(ValueError, match="campaign_id"):
        j.leads(clicked_here)


def test_since_step(journey: Journey) -> None:
    j = journey
    case = {"event": "clicked", "since_step": "case"}
    welcome = {"event": "clicked", "since_step": "welcome"}
    # ann/one: case sent 2d ago, clicked 1d and 1h ago; ann/two: case never sent;
    # bob/one: case sent 10d ago, clicked 9d and 7d ago.
    assert j.enrollments(case) == {j.e1, j.e3}
    assert j.enrollments({**case, "count": 2}) == {j.e1, j.e3}
    assert j.enrollments({**case, "within": "3d"}) == {j.e1}
    # welcome: sent 5d ago in ann/one (all 3 clicks after), failed in ann/two (never sent).
    assert j.enrollments({**welcome, "count": 3}) == {j.e1}
    assert j.enrollments(welcome) == {j.e1}
    # A step never sent counts 0 clicks, so "no click since" holds for it.
    assert j.enrollments({**case, "op": "eq", "count": 0}) == {j.e2}
    assert j.enrollments({"not": case}) == {j.e2}
    # With this_campaign only clicks on this campaign's mail count: each lead's second
    # click since the step was on the web.
    assert j.enrollments({**case, "this_campaign": True}, j.c1) == {j.e1, j.e3}
    assert j.enrollments({**case, "this_campaign": True, "count": 2}, j.c1) == set()
    with pytest.raises(ValueError, match="enrollment_id"):
        j.leads(case)


def test_since_step_ignores_outer_deliveries(journey: Journey) -> None:
    """The compiled subqueries alias their tables, so an outer query on deliveries works."""
    j = journey
    ctx = RuleContext(now=NOW, enrollment_id=Delivery.enrollment_id)
    query = (
        select(Delivery.id)
        .join(Lead, Lead.id == Delivery.lead_id)
        .where(Delivery.step_id == "case", compile_rule(rule({"event": "clicked",
                                                               "since_step": "welcome"}), ctx))
    )  # fmt: skip
    with Session(j.engine) as s:
        assert set(s.scalars(query)) == {j.ann_case}


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"field": "source", "op": "in", "value": "website"}, "in needs a list"),
        ({"field": "source", "op": "not_in", "value": 3}, "not_in needs a list"),
        ({"field": "behaviour_score", "op": "gt", "value": "high"}, "expected a number"),
        ({"field": "attributes.size", "op": "gt", "value": "big"}, "number or an ISO date"),
        ({"field": "country", "op": "gt", "value": 3}, "country holds text"),
        ({"field": "created_at", "op": "lt", "value": "last week"}, "ISO date"),
        ({"field": "fit_score", "op": "contains", "value": "1"}, "works on text only"),
        ({"field": "first_name", "op": "contains", "value": ""}, "non-empty string"),
        ({"field": "first_name", "op": "starts_with", "value": 3}, "non-empty string"),
        ({"field": "country", "op": "exists", "value": "yes"}, "true or false"),
        ({"field": "country", "op": "eq"}, "use op: exists"),
        ({"field": "country", "op": "eq", "value": 49}, "expected a string"),
        ({"field": "attributes.x", "op": "eq", "value": {"a": 1}}, "expected a string, number"),
        ({"field": "attributes.x", "op": "in", "value": [[1]]}, "expected a string, number"),
        ({"field": "attributes.a.b", "value": 1}, "bad attribute name"),
        ({"field": 'attributes.a"b', "value": 1}, "bad attribute name"),
        ({"field": "account.owner", "value": "x"}, "unknown field"),
        ({"field": "source", "op": "like", "value": "x"}, "Input should be"),
        ({"event": "clicked", "within": "soon"}, "duration"),
        ({"score": "karma", "value": 1}, "Input should be"),
        ({"bogus": 1}, "expected a rule"),
    ],
)
def test_bad_rules_are_rejected(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        rule(data)


def test_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="aware"):
        compile_rule(rule({"field": "source", "value": "x"}), RuleContext(now=datetime(2026, 1, 1)))


# --- property: SQL == a pure-Python reference -------------------------------------------------

TEXTS = ["x", "X", "xy", "a%b", "a_b", "axb", "b"]
JSON_VALUES: list[Any] = [*TEXTS, 0, 1, 2.5, -3, True, False, None]
MISSING = object()


def _json_eq(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(b, int | float):
        return isinstance(a, int | float) and float(a) == float(b)
    return isinstance(a, str) and a == b


def reference(data: dict[str, Any], lead: dict[str, Any]) -> bool:
    """What the rule means, in plain Python: the semantics documented in nurture.journey.segments."""
    if "all" in data:
        return all(reference(r, lead) for r in data["all"])
    if "any" in data:
        return any(reference(r, lead) for r in data["any"])
    if "not" in data:
        return not reference(data["not"], lead)
    if "score" in data:
        score = {"behaviour": lead["behaviour_score"], "fit": lead["fit_score"],
                 "total": lead["behaviour_score"] + lead["fit_score"]}[data["score"]]  # fmt: skip
        return _cmp(score, data["op"], data["value"])
    name, op, value = data["field"], data["op"], data.get("value")
    if name.startswith("attributes."):
        have = lead["attributes"].get(name.split(".", 1)[1], MISSING)
        if have is None:
            have = MISSING
    else:
        have = lead[name]
        if have is None:
            have = MISSING
    if op == "exists":
        return (have is not MISSING) == (value is not False)
    if op in ("ne", "not_in"):
        positive = {"ne": "eq", "not_in": "in"}[op]
        return not reference({**data, "op": positive}, lead)
    if have is MISSING:
        return False
    if op == "eq":
        return _json_eq(have, value)
    if op == "in":
        return any(_json_eq(have, v) for v in value)
    if op in ("contains", "starts_with"):
        if isinstance(have, list):
            return op == "contains" and any(isinstance(v, str) and v == value for v in have)
        if not isinstance(have, str):
            return False
        if op == "contains":
            return value.lower() in have.lower()
        return have.lower().startswith(value.lower())
    # gt/gte/lt/lte with a number: only numbers compare.
    if isinstance(have, bool) or not isinstance(have, int | float):
        return False
    return _cmp(float(have), op, float(value))


def _cmp(a: float, op: str, b: float) -> bool:
    return {"eq": a == b, "ne": a != b, "gt": a > b, "gte": a >= b, "lt": a < b,
            "lte": a <= b}[op]  # fmt: skip


_text = st.sampled_from(TEXTS)
_number = st.sampled_from([0, 1, 2.5, -3])
_scalar = st.one_of(_text, _number, st.booleans())


def _field_rules() -> st.SearchStrategy[dict[str, Any]]:
    def f(name: str, ops: list[str], values: st.SearchStrategy[Any]) -> Any:
        return st.builds(lambda op, v: {"field": name, "op": op, "value": v},
                         st.sampled_from(ops), values)  # fmt: skip

    eq_ops = ["eq", "ne"]
    list_ops = ["in", "not_in"]
    text_ops = ["contains", "starts_with"]
    order_ops = ["gt", "gte", "lt", "lte"]
    exists = st.builds(
        lambda name, v: {"field": name, "op": "exists", "value": v},
        st.sampled_from(["country", "attributes.a", "attributes.b"]),
        st.sampled_from([True, False]),
    )
    attrs = st.sampled_from(["attributes.a", "attributes.b"])
    return st.one_of(
        f("source", eq_ops + text_ops, _text),
        f("source", list_ops, st.lists(_text, max_size=3)),
        f("country", eq_ops + text_ops, _text),
        f("country", list_ops, st.lists(_text, max_size=3)),
        f("behaviour_score", eq_ops + order_ops, _number),
        f("behaviour_score", list_ops, st.lists(_number, max_size=3)),
        attrs.flatmap(lambda a: f(a, eq_ops, _scalar)),
        attrs.flatmap(lambda a: f(a, list_ops, st.lists(_scalar, max_size=3))),
        attrs.flatmap(lambda a: f(a, text_ops, _text)),
        attrs.flatmap(lambda a: f(a, order_ops, _number)),
        st.builds(lambda s, op, v: {"score": s, "op": op, "value": v},
                  st.sampled_from(["behaviour", "fit", "total"]),
                  st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]), _number),
        exists,
    )  # fmt: skip


rules_strategy = st.recursive(
    _field_rules(),
    lambda inner: st.one_of(
        st.builds(lambda rs: {"all": rs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda rs: {"any": rs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda r: {"not": r}, inner),
    ),
    max_leaves=6,
)

_attr_value = st.one_of(
    st.sampled_from(JSON_VALUES), st.lists(st.sampled_from([*TEXTS, 1]), max_size=3)
)
leads_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "source": _text,
            "country": st.one_of(st.none(), _text),
            "behaviour_score": _number.map(float),
            "fit_score": _number.map(float),
            "attributes": st.dictionaries(st.sampled_from(["a", "b"]), _attr_value, max_size=2),
        }
    ),
    min_size=1,
    max_size=8,
)


@pytest.fixture(scope="module")
def prop_engine() -> Iterator[Engine]:
    """One in-memory SQLite database for every example (rows are replaced per example)."""
    eng = make_engine("sqlite://")
    upgrade(eng)
    yield eng
    eng.dispose()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rules_strategy, leads=leads_strategy)
def test_sql_matches_python_reference(
    prop_engine: Engine, data: dict[str, Any], leads: list[dict[str, Any]]
) -> None:
    rows = [_lead(f"l{i}@x.com", **lead) for i, lead in enumerate(leads)]
    with Session(prop_engine) as s, s.begin():
        s.execute(delete(Lead))
        s.execute(insert(Lead), rows)
    got = matches(prop_engine, data)
    expected = {f"l{i}" for i, lead in enumerate(leads) if reference(data, lead)}
    assert got == expected
