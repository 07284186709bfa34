"""Erasure (GDPR art. 17) and export (arts. 15 and 20) of one person.

Erasing a person:

* keeps the rows that aggregate counts are made of (enrollments, deliveries, events that
  are not consent proof, stage transitions, promotions) but hangs them on an anonymous
  *tombstone* lead: its email becomes ``erased+<keyed hash>@erased.invalid`` and every
  personal field is cleared (names, owner, time zone, country, account, attributes,
  scores). Campaign and funnel counts stay right; nothing left names or reaches the person;
* removes the personal fields of deliveries (recipient domain, SMTP error text) and of
  events (payload with IP and user agent, external ids, URLs with a query string or ``@``),
  the consent records and consent events, the double opt-in, score snapshots and CRM links;
* keeps the keyed hash in the suppression list (the tombstone's address *is* the hash), so
  a later import or signup of the same address is suppressed again
  (:func:`nurture.store.suppression.resuppress`);
* queues one deletion per linked CRM object (``crm_deletions``), which
  :func:`process_crm_deletions` works off with the promotion queue's guarantees;
* on SQLite, runs with ``secure_delete`` on, then ``VACUUM`` and a WAL checkpoint
  (``TRUNCATE``), so the address is in none of the database's files, freed pages included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, or_, select, update
from sqlalchemy.orm import Session

from nurture.crm import ConnectorError, Eraser, FatalConnectorError, RetriableConnectorError
from nurture.crm.promotions import backoff
from nurture.store.consent import CONSENT_EVENTS, consents_of
from nurture.store.db import session_scope
from nurture.store.models import (
    Consent,
    CrmDeletion,
    CrmDeletionStatus,
    CrmLink,
    Delivery,
    Enrollment,
    Event,
    Lead,
    OptIn,
    Promotion,
    ScoreSnapshot,
    StageTransition,
    Suppression,
)
from nurture.store.sql import insert_for
from nurture.store.suppression import ERASED, TOMBSTONE_DOMAIN, erased_address, suppress

PARK_AFTER = timedelta(days=7)


@dataclass
class EraseResult:
    """What :func:`erase` did."""

    erased: list[str] = field(default_factory=list)  # addresses that had a lead
    not_found: list[str] = field(default_factory=list)  # suppressed by hash all the same
    crm_deletions: int = 0  # CRM objects queued for deletion
    checkpoint: str | None = None  # SQLite: the WAL checkpoint's answer

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts (never the addresses: the output may be logged)."""
        return {
            "erased": len(self.erased),
            "not_found": len(self.not_found),
            "crm_deletions": self.crm_deletions,
            "checkpoint": self.checkpoint,
        }


def erase(engine: Engine, emails: Iterable[str], now: datetime, *, key: str) -> EraseResult:
    """Erase each person in ``emails`` (see the module docstring); idempotent.

    Args:
        engine: the database.
        emails: the addresses to erase (normalised: trimmed, lower case).
        now: the instant stamped on the suppression and the queue.
        key: the hash key (the first ``NURTURE_SECRET_KEY``).
    """
    wanted = list(dict.fromkeys(e.strip().lower() for e in emails if e and e.strip()))
    result = EraseResult()
    sqlite = engine.dialect.name == "sqlite"
    with session_scope(engine) as session:
        if sqlite:
            # Deleted and rewritten cells are zeroed, not just unlinked.
            session.connection().exec_driver_sql("PRAGMA secure_delete=ON")
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            found: dict[str, int] = {
                email: lead_id
                for email, lead_id in session.execute(
                    select(Lead.email, Lead.id).where(Lead.email.in_(chunk))
                )
            }
            result.erased.extend(e for e in chunk if e in found)
            result.not_found.extend(e for e in chunk if e not in found)
            result.crm_deletions += _erase_leads(session, found, now, key)
            session.execute(delete(Suppression).where(Suppression.email.in_(chunk)))
            suppress(session, [erased_address(e, key) for e in chunk], ERASED, None, now)
    if sqlite:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("PRAGMA secure_delete=ON")
            # VACUUM rewrites every page, so no copy left in free space by an earlier
            # update survives; the checkpoint then empties the WAL that held the old pages.
            conn.exec_driver_sql("VACUUM")
            row = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
            result.checkpoint = "busy" if row[0] else "done"
    return result


def _erase_leads(session: Session, found: Mapping[str, int], now: datetime, key: str) -> int:
    if not found:
        return 0
    ids = list(found.values())
    queued = session.execute(
        insert_for(session, CrmDeletion)
        .from_select(
            [
                "connector",
                "object_type",
                "external_id",
                "status",
                "attempts",
                "created_at",
                "next_attempt_at",
            ],
            select(
                CrmLink.connector,
                CrmLink.object_type,
                CrmLink.external_id,
                _lit(CrmDeletionStatus.queued.value),
                _lit(0),
                _at(now),
                _at(now),
            ).where(CrmLink.lead_id.in_(ids)),
        )
        .on_conflict_do_nothing()
        .returning(CrmDeletion.id)
    ).all()
    session.execute(delete(CrmLink).where(CrmLink.lead_id.in_(ids)))
    session.execute(delete(Consent).where(Consent.lead_id.in_(ids)))
    session.execute(delete(OptIn).where(OptIn.lead_id.in_(ids)))
    session.execute(delete(ScoreSnapshot).where(ScoreSnapshot.lead_id.in_(ids)))
    session.execute(delete(Event).where(Event.lead_id.in_(ids), Event.type.in_(CONSENT_EVENTS)))
    session.execute(
        update(Event)
        .where(Event.lead_id.in_(ids))
        .values(payload={}, external_id=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Event)
        .where(Event.lead_id.in_(ids), or_(Event.url.contains("?"), Event.url.contains("@")))
        .values(url=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Delivery)
        .where(Delivery.lead_id.in_(ids))
        .values(domain=TOMBSTONE_DOMAIN, error=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Promotion)
        .where(Promotion.lead_id.in_(ids))
        .values(last_error=None)
        .execution_options(synchronize_session=False)
    )
    for email, lead_id in found.items():  # one row each: the address differs per lead
        session.execute(
            update(Lead)
            .where(Lead.id == lead_id)
            .values(
                email=erased_address(email, key),
                first_name=None,
                last_name=None,
                owner=None,
                timezone=None,
                country=None,
                account_id=None,
                attributes={},
                behaviour_score=0.0,
                fit_score=0.0,
                grade=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    suppress(session, [erased_address(e, key) for e in found], ERASED, None, now)
    return len(queued)


def _lit(value: Any) -> Any:
    from sqlalchemy import literal

    return literal(value)


def _at(value: datetime) -> Any:
    from nurture.store.sql import at

    return at(value)


# --------------------------------------------------------------------------- CRM queue


@dataclass
class DeletionReport:
    """What one pass of the CRM deletion queue did."""

    done: int = 0
    retry: int = 0
    parked: int = 0
    errors: list[str] = field(default_factory=list)


def process_crm_deletions(
    engine: Engine,
    connectors: Mapping[str, object],
    now: datetime,
    *,
    park_after: timedelta = PARK_AFTER,
    batch_size: int = 100,
) -> DeletionReport:
    """Ask each connected CRM to delete the queued objects, with retries and no loss.

    A retryable failure (network, 429, 5xx) waits a capped backoff and parks only after
    failing for ``park_after``; a fatal one (other 4xx, a connector that cannot delete)
    parks at once with its reason. Parked rows stay until requeued. Rows of connectors not
    given here wait for a tick that has them.
    """
    report = DeletionReport()
    for name, connector in connectors.items():
        while True:
            with session_scope(engine) as session:
                rows = session.execute(
                    select(
                        CrmDeletion.id,
                        CrmDeletion.object_type,
                        CrmDeletion.external_id,
                        CrmDeletion.attempts,
                        CrmDeletion.failing_since,
                    )
                    .where(
                        CrmDeletion.connector == name,
                        CrmDeletion.status == CrmDeletionStatus.queued.value,
                        CrmDeletion.next_attempt_at <= _at(now),
                    )
                    .order_by(CrmDeletion.id)
                    .limit(batch_size)
                ).all()
                if not rows:
                    break
                failed = 0
                for row in rows:
                    values = _attempt(connector, name, row, now, park_after, report)
                    failed += values["status"] != CrmDeletionStatus.done.value
                    session.execute(
                        update(CrmDeletion).where(CrmDeletion.id == row.id).values(**values)
                    )
            if failed == len(rows):
                break  # the CRM is failing: leave the rest for the next tick
    return report


def _attempt(
    connector: object,
    name: str,
    row: Any,
    now: datetime,
    park_after: timedelta,
    report: DeletionReport,
) -> dict[str, Any]:
    attempts = row.attempts + 1
    try:
        if not isinstance(connector, Eraser):
            raise FatalConnectorError(f"connector {name!r} cannot delete")
        connector.delete(row.object_type, row.external_id)
    except RetriableConnectorError as exc:
        since = row.failing_since or now
        if now - since >= park_after:
            report.parked += 1
            report.errors.append(f"{name}: parked after {now - since}: {exc}")
            return {
                "status": CrmDeletionStatus.parked.value,
                "attempts": attempts,
                "last_error": f"retryable for {now - since}: {exc}"[:2000],
                "failing_since": since,
                "parked_at": now,
            }
        report.retry += 1
        wait = backoff(attempts)
        if exc.retry_after is not None:
            wait = max(wait, timedelta(seconds=exc.retry_after))
        return {
            "status": CrmDeletionStatus.queued.value,
            "attempts": attempts,
            "last_error": str(exc)[:2000],
            "failing_since": since,
            "next_attempt_at": now + wait,
        }
    except ConnectorError as exc:
        report.parked += 1
        report.errors.append(f"{name}: {exc}")
        return {
            "status": CrmDeletionStatus.parked.value,
            "attempts": attempts,
            "last_error": str(exc)[:2000],
            "parked_at": now,
        }
    report.done += 1
    return {
        "status": CrmDeletionStatus.done.value,
        "attempts": attempts,
        "last_error": None,
        "failing_since": None,
        "done_at": now,
    }


@dataclass(frozen=True)
class PendingDeletion:
    """A CRM deletion not done yet: queued (with its next attempt) or parked."""

    id: int
    connector: str
    object_type: str
    external_id: str
    status: str
    attempts: int
    last_error: str
    created_at: datetime
    next_attempt_at: datetime
    parked_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form, with ISO 8601 instants."""
        return {
            "id": self.id,
            "connector": self.connector,
            "object_type": self.object_type,
            "external_id": self.external_id,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": self.created_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat(),
            "parked_at": self.parked_at.isoformat() if self.parked_at else None,
        }


def pending_crm_deletions(engine: Engine, connector: str | None = None) -> list[PendingDeletion]:
    """Every CRM deletion still to do (of one connector): parked first, then by due time."""
    where = [CrmDeletion.status != CrmDeletionStatus.done.value]
    if connector:
        where.append(CrmDeletion.connector == connector)
    with session_scope(engine) as session:
        rows = session.scalars(select(CrmDeletion).where(*where)).all()
        found = [
            PendingDeletion(
                r.id,
                r.connector,
                r.object_type,
                r.external_id,
                r.status,
                r.attempts,
                r.last_error or "",
                r.created_at,
                r.next_attempt_at,
                r.parked_at,
            )
            for r in rows
        ]
    parked = CrmDeletionStatus.parked.value
    return sorted(found, key=lambda d: (d.status != parked, d.next_attempt_at, d.id))


def requeue_crm_deletions(engine: Engine, now: datetime, connector: str | None = None) -> int:
    """Put parked CRM deletions back in the queue (after fixing credentials, say)."""
    with session_scope(engine) as session:
        where = [CrmDeletion.status == CrmDeletionStatus.parked.value]
        if connector:
            where.append(CrmDeletion.connector == connector)
        result = session.execute(
            update(CrmDeletion)
            .where(*where)
            .values(
                status=CrmDeletionStatus.queued.value,
                next_attempt_at=now,
                failing_since=None,
                parked_at=None,
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)


# --------------------------------------------------------------------------- export


class PersonNotFound(LookupError):
    """No lead has this address."""


def export(engine: Engine, email: str) -> dict[str, Any]:
    """Everything stored about the person with ``email``, JSON-ready (arts. 15 and 20).

    Raises:
        PersonNotFound: no lead has the address (suppression is still reported if any).
    """
    address = email.strip().lower()
    with session_scope(engine) as session:
        lead = session.scalars(select(Lead).where(Lead.email == address)).one_or_none()
        suppression = session.scalars(
            select(Suppression).where(Suppression.email == address)
        ).one_or_none()
        if lead is None:
            raise PersonNotFound(
                f"no lead with this address"
                f"{' (it is suppressed: ' + suppression.reason + ')' if suppression else ''}"
            )
        lid = lead.id
        account = lead.account
        out: dict[str, Any] = {
            "lead": {
                c: _json(getattr(lead, c))
                for c in (
                    "email",
                    "first_name",
                    "last_name",
                    "source",
                    "timezone",
                    "country",
                    "lifecycle_stage",
                    "owner",
                    "attributes",
                    "behaviour_score",
                    "fit_score",
                    "grade",
                    "created_at",
                    "updated_at",
                )
            },
            "account": None
            if account is None
            else {"name": account.name, "domain": account.domain, "country": account.country},
            "consents": consents_of(session, [lid]).get(lid, {}),
            "double_opt_in": _rows(session, select(OptIn).where(OptIn.lead_id == lid)),
            "suppression": None
            if suppression is None
            else {"reason": suppression.reason, "since": suppression.created_at.isoformat()},
            "enrollments": _rows(
                session, select(Enrollment).where(Enrollment.lead_id == lid).order_by(Enrollment.id)
            ),
            "deliveries": _rows(
                session, select(Delivery).where(Delivery.lead_id == lid).order_by(Delivery.id)
            ),
            "events": _rows(
                session,
                select(Event).where(Event.lead_id == lid).order_by(Event.occurred_at, Event.id),
            ),
            "scores": _rows(
                session,
                select(ScoreSnapshot)
                .where(ScoreSnapshot.lead_id == lid)
                .order_by(ScoreSnapshot.computed_at),
            ),
            "stage_transitions": _rows(
                session,
                select(StageTransition)
                .where(StageTransition.lead_id == lid)
                .order_by(StageTransition.occurred_at),
            ),
            "crm_links": _rows(session, select(CrmLink).where(CrmLink.lead_id == lid)),
            "promotions": _rows(session, select(Promotion).where(Promotion.lead_id == lid)),
        }
        out["counts"] = {
            k: len(v) for k, v in out.items() if isinstance(v, list)
        } | {"events_total": session.scalar(
            select(func.count()).select_from(Event).where(Event.lead_id == lid)
        )}  # fmt: skip
    return out


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _rows(session: Session, query: Any) -> list[dict[str, Any]]:
    out = []
    for obj in session.scalars(query):
        table = obj.__table__
        out.append(
            {c.name: _json(getattr(obj, c.name)) for c in table.columns if c.name != "lead_id"}
        )
    return out
