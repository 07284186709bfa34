"""Sales alerts: tell a lead's owner or team, once, when the lead reaches a configured stage.

``pipeline.yaml`` lists the rules (``alerts: [{stages: [mql], to: sales}]``). Each tick:

1. :func:`queue_alerts` turns every recent transition into such a stage into one row of
   the ``alerts`` outbox per rule, with one ``INSERT ... SELECT`` (a unique key on
   (transition, rule) keeps it to one, however often it runs);
2. :func:`send_alerts` claims the due rows in small batches, writes each message (who the
   lead is, why they qualified from the score breakdown, a link to the CRM record) and
   hands it to a :class:`Notifier`: a webhook here, a Prefect notification block in the
   flows. A retryable failure waits with backoff and parks after a long, configurable
   time; a fatal one parks at once. Parked rows stay listed, never dropped.
"""

from __future__ import annotations

import ssl
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, Protocol

import certifi
import httpx
from sqlalchemy import Engine, func, literal, select
from sqlalchemy.orm import Session

from nurture.engagement.scoring import (
    decay_factor_expr,
    fit_rule_exprs,
    grade_for,
    points_expr,
    scored_events_filter,
)
from nurture.spec.schema import AlertSpec, PipelineSpec, ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Account, Alert, CrmLink, Event, Lead, StageTransition
from nurture.store.sql import at, bulk_update, insert_for, inserted, is_postgres

__all__ = [
    "AlertError",
    "AlertMessage",
    "AlertReport",
    "Notifier",
    "WebhookNotifier",
    "alerts_for",
    "compose",
    "notifier_from_settings",
    "parse_webhooks",
    "pending",
    "queue_alerts",
    "send_alerts",
]

#: Transitions older than this when alerts are first configured are history, not news.
LOOKBACK = timedelta(days=1)
PARK_AFTER = timedelta(days=1)
#: Alerts sent per transaction: what a killed sender may send twice.
BATCH = 10
MAX_BACKOFF = timedelta(hours=1)
_MAX_ERROR = 500


class AlertError(Exception):
    """A notifier could not deliver; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class AlertMessage:
    """One alert: a title, a one-screen markdown body, and the facts as data."""

    title: str
    text: str
    data: dict[str, Any]


class Notifier(Protocol):
    """Delivers an alert to a named channel; raises :class:`AlertError` on failure."""

    def send(self, channel: str, message: AlertMessage) -> None:
        """Deliver ``message`` to ``channel``."""
        ...


def parse_webhooks(text: str) -> dict[str, str]:
    """``"sales=https://a,cs=https://b"`` -> by channel; a bare URL serves every channel (``*``).

    Raises:
        ValueError: an entry that is not ``name=http(s)://...`` or a URL.
    """
    out: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or name.startswith(("http://", "https://")):
            name, url = "*", item
        name, url = name.strip(), url.strip()
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"NURTURE_ALERT_WEBHOOKS: expected name=https://..., got {name!r}")
        out[name] = url
    return out


@cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process: building one loads the CA bundle (tens of
    milliseconds), and a notifier is made every tick."""
    return ssl.create_default_context(cafile=certifi.where())


class WebhookNotifier:
    """Posts ``{"text": ..., "title": ..., "alert": {...}}``: what Slack and Microsoft
    Teams incoming webhooks read (``text``), plus the facts for any other receiver."""

    def __init__(
        self, urls: Mapping[str, str], *, client: httpx.Client | None = None, timeout: float = 10
    ) -> None:
        self.urls = dict(urls)
        self.client = client or httpx.Client(timeout=timeout, verify=tls_context())

    def send(self, channel: str, message: AlertMessage) -> None:
        """POST the alert to the channel's URL (or the catch-all one)."""
        url = self.urls.get(channel) or self.urls.get("*")
        if url is None:
            raise AlertError(f"no webhook for channel {channel!r}", retryable=False)
        body = {"text": message.text, "title": message.title, "alert": message.data}
        try:
            response = self.client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise AlertError(f"{type(exc).__name__}: {exc}", retryable=True) from exc
        code = response.status_code
        if code == 429 or code >= 500:
            raise AlertError(f"HTTP {code} from the {channel!r} webhook", retryable=True)
        if code >= 400:
            raise AlertError(f"HTTP {code} from the {channel!r} webhook", retryable=False)


@dataclass
class AlertReport:
    """What one pass over the alert outbox did."""

    queued: int = 0
    sent: int = 0
    retry: int = 0
    parked: int = 0
    by_channel: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)


def queue_alerts(engine: Engine, pipeline: PipelineSpec, now: datetime) -> int:
    """Queue one alert per (recent transition into an alerted stage, rule); set-based."""
    total = 0
    with session_scope(engine) as session:
        for index, rule in enumerate(pipeline.alerts):
            query = select(
                StageTransition.id,
                literal(index),
                StageTransition.lead_id,
                StageTransition.to_stage,
                literal("queued"),
                literal(0),
                at(now),
                at(now),
            ).where(
                StageTransition.to_stage.in_(rule.stages),
                StageTransition.occurred_at > at(now - LOOKBACK),
                StageTransition.occurred_at <= at(now),
            )
            stmt = (
                insert_for(session, Alert)
                .from_select(
                    [
                        "transition_id",
                        "rule",
                        "lead_id",
                        "stage",
                        "status",
                        "attempts",
                        "created_at",
                        "next_attempt_at",
                    ],
                    query,
                )
                .on_conflict_do_nothing(index_elements=["transition_id", "rule"])
            )
            total += inserted(session, stmt, Alert.id)
    return total


def _claim(session: Session, now: datetime, limit: int) -> list[Any]:
    query = (
        select(
            Alert.id,
            Alert.lead_id,
            Alert.rule,
            Alert.stage,
            Alert.attempts,
            Alert.failing_since,
            Lead.email,
            Lead.first_name,
            Lead.last_name,
            Lead.owner,
            Lead.source,
            Lead.grade,
            Lead.behaviour_score,
            Lead.fit_score,
            Lead.attributes,
            Account.name.label("company"),
            StageTransition.cause,
        )
        .join(Lead, Lead.id == Alert.lead_id)
        .join(StageTransition, StageTransition.id == Alert.transition_id)
        .outerjoin(Account, Account.id == Lead.account_id)
        .where(Alert.status == "queued", Alert.next_attempt_at <= at(now))
        .order_by(Alert.next_attempt_at, Alert.id)
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True, of=Alert)
    return list(session.execute(query).all())


def _links(session: Session, emails: list[str]) -> dict[str, tuple[str, str]]:
    """email -> (connector, external id) of the lead's CRM record, one query."""
    rows = session.execute(
        select(Lead.email, CrmLink.connector, CrmLink.external_id)
        .join(CrmLink, CrmLink.lead_id == Lead.id)
        .where(Lead.email.in_(emails))
        .order_by(CrmLink.id)
    )
    return {email: (conn, ext) for email, conn, ext in rows}


def _why_all(
    session: Session, lead_ids: list[int], scoring: ScoringSpec, now: datetime
) -> dict[int, dict[str, Any]]:
    """The score breakdown of each lead (the explain view, short): two queries for the batch.

    Behaviour per event type (count and decayed points, with the same expressions as
    scoring and ``nurture leads explain``), and the fit rules each lead matches.
    """
    points = points_expr(scoring)
    decay = decay_factor_expr(scoring, now, session)
    decayed = points if scoring.half_life is None else points * decay
    events: dict[int, list[tuple[str, int, float]]] = defaultdict(list)
    for lid, etype, n, total in session.execute(
        select(Event.lead_id, Event.type, func.count(), func.sum(decayed))
        .where(Event.lead_id.in_(lead_ids), scored_events_filter(scoring, now))
        .group_by(Event.lead_id, Event.type)
    ):
        events[lid].append((etype, int(n), float(total or 0.0)))
    fits: dict[int, list[dict[str, Any]]] = defaultdict(list)
    exprs = fit_rule_exprs(scoring, now)
    if exprs:
        for lid, *values in session.execute(select(Lead.id, *exprs).where(Lead.id.in_(lead_ids))):
            for index, (rule, value) in enumerate(zip(scoring.fit, values, strict=True)):
                if float(value) != 0.0:
                    fits[lid].append({"name": rule.name or f"fit[{index}]", "points": float(value)})
    out: dict[int, dict[str, Any]] = {}
    for lid in lead_ids:
        mine = sorted(events.get(lid, []), key=lambda e: -e[2])
        fit = sum(f["points"] for f in fits.get(lid, []))
        out[lid] = {
            "behaviour": round(sum(e[2] for e in mine), 1),
            "fit": round(fit, 1),
            "grade": grade_for(scoring, fit),
            "events": [{"type": t, "count": n, "points": round(p, 1)} for t, n, p in mine[:4]],
            "fit_rules": fits.get(lid, []),
        }
    return out


def _md(text: object) -> str:
    """Lead-typed text, made inert in Slack/Teams markdown (no links, mentions or markup).

    Angle brackets go (Slack's ``<!channel>`` and ``<url|label>`` need them); markdown
    characters are escaped; whitespace is folded so a value cannot add lines.
    """
    value = str(text)
    for ch in "\\*_~`<>[]|":
        value = value.replace(ch, "\\" + ch if ch in "\\*_~`[]|" else " ")
    return " ".join(value.split())[:200]


def compose(
    row: Any, rule: AlertSpec, why: dict[str, Any], link: tuple[str, str] | None
) -> AlertMessage:
    """One screen: who the lead is, why they qualified, and where their CRM record is."""
    name = " ".join(p for p in (row.first_name, row.last_name) if p) or row.email
    company = f" at {_md(row.company)}" if row.company else ""
    title = f"{_md(name)}{company} reached {row.stage}"
    events = (
        ", ".join(f"{e['type']} x{e['count']} ({e['points']:+g})" for e in why["events"])
        or "no scored events"
    )
    fits = ", ".join(f"{_md(f['name'])} ({f['points']:+g})" for f in why["fit_rules"]) or "none"
    url = None
    if link is not None and rule.link:
        url = rule.link.format(connector=link[0], external_id=link[1])
    lines = [
        f"*{title}*",
        f"{_md(row.email)} | owner: {_md(row.owner or 'unassigned')} | source: {_md(row.source)}",
        f"Score: grade {why['grade']}, behaviour {why['behaviour']:g}, fit {why['fit']:g}"
        f" ({_md(row.cause)})",
        f"Why: {events}",
        f"Fit: {fits}",
        f"CRM: {url}" if url else f"CRM: {link[0]} record {link[1]}" if link else "CRM: not linked",
    ]
    data = {
        "email": row.email,
        "name": name,
        "company": row.company,
        "owner": row.owner,
        "stage": row.stage,
        "cause": row.cause,
        "score": why,
        "crm": {"connector": link[0], "external_id": link[1], "url": url} if link else None,
    }
    return AlertMessage(title=title, text="\n".join(lines), data=data)


def _backoff(attempts: int) -> timedelta:
    return min(timedelta(minutes=2**attempts), MAX_BACKOFF)


def send_alerts(
    engine: Engine,
    pipeline: PipelineSpec,
    scoring: ScoringSpec,
    notifier: Notifier,
    now: datetime,
    *,
    limit: int = 200,
    batch: int = BATCH,
    park_after: timedelta = PARK_AFTER,
) -> AlertReport:
    """Deliver the due alerts (at most ``limit`` per call) and record each outcome.

    Alerts go ``batch`` per transaction, each batch's outcomes committed before the next is
    claimed: a sender killed mid-way sends again at most the ``batch`` alerts of its open
    transaction (at least once: an alert is never lost, and rarely repeated).
    """
    report = AlertReport()
    done = 0
    while done < limit:
        claimed = _send_batch(
            engine, pipeline, scoring, notifier, now, min(batch, limit - done), park_after, report
        )
        if not claimed:
            break
        done += claimed
    return report


def _send_batch(
    engine: Engine,
    pipeline: PipelineSpec,
    scoring: ScoringSpec,
    notifier: Notifier,
    now: datetime,
    limit: int,
    park_after: timedelta,
    report: AlertReport,
) -> int:
    """Claim up to ``limit`` due alerts, send them, record the outcomes in ``report`` and in
    one transaction (every outcome moves the row out of the due set). Returns how many."""
    with session_scope(engine) as session:
        rows = _claim(session, now, limit)
        if not rows:
            return 0
        links = _links(session, sorted({r.email for r in rows}))
        why = _why_all(session, sorted({r.lead_id for r in rows}), scoring, now)
        updates: list[dict[str, Any]] = []
        for row in rows:
            if row.rule >= len(pipeline.alerts):  # the rule was removed: nothing to say
                updates.append({"id": row.id, "status": "parked", "last_error": "rule removed"})
                report.parked += 1
                continue
            rule = pipeline.alerts[row.rule]
            channel = rule.by_owner.get(row.owner or "", rule.to)
            try:
                message = compose(row, rule, why[row.lead_id], links.get(row.email))
                notifier.send(channel, message)
            except AlertError as exc:
                since = row.failing_since or now
                error = str(exc)[:_MAX_ERROR]
                parked = not exc.retryable or now - since >= park_after
                updates.append(
                    {
                        "id": row.id,
                        "channel": channel,
                        "attempts": row.attempts + 1,
                        "last_error": error,
                        "failing_since": since,
                        "status": "parked" if parked else "queued",
                        "next_attempt_at": now + _backoff(row.attempts + 1),
                    }
                )
                if parked:
                    report.parked += 1
                    report.errors.append(f"alert {row.id} to {channel}: {error}")
                else:
                    report.retry += 1
                continue
            updates.append(
                {
                    "id": row.id,
                    "channel": channel,
                    "attempts": row.attempts + 1,
                    "status": "sent",
                    "sent_at": now,
                    "last_error": None,
                    "failing_since": None,
                }
            )
            report.sent += 1
            report.by_channel[channel] += 1
        bulk_update(session, Alert, updates)
    return len(rows)


def alerts_for(
    engine: Engine,
    pipeline: PipelineSpec,
    scoring: ScoringSpec,
    notifier: Notifier | None,
    now: datetime,
) -> AlertReport:
    """Queue, then send when there is a notifier (without one, alerts wait in the outbox)."""
    if not pipeline.alerts:
        return AlertReport()
    queued = queue_alerts(engine, pipeline, now)
    report = send_alerts(engine, pipeline, scoring, notifier, now) if notifier else AlertReport()
    report.queued = queued
    return report


def notifier_from_settings(webhooks: str | None) -> WebhookNotifier | None:
    """A webhook notifier for ``NURTURE_ALERT_WEBHOOKS`` (its secret value), if set."""
    if not webhooks:
        return None
    return WebhookNotifier(parse_webhooks(webhooks))


def pending(engine: Engine) -> dict[str, int]:
    """Alerts by status (for doctor-style checks and tests)."""
    with session_scope(engine) as session:
        return dict(
            session.execute(select(Alert.status, func.count()).group_by(Alert.status)).all()
        )
