"""Intake from CRMs: contacts created in the CRM since a high-water mark become leads.

``nurture crm pull --contacts`` asks each connector that can (:class:`ContactSource`)
for the records created since its mark (``crm_cursors``, stream ``contacts``), then,
set-based:

- normalises and checks each email (a record without a valid one is counted, not lost
  silently: the report lists it);
- keeps one record per email (the earliest), and links an existing lead instead of
  creating a second one (deduplicated by email);
- inserts the new leads with ``created_at`` = the CRM's creation time, which is their
  capture time for speed to lead, and source ``sales``;
- links every lead to its CRM record (``crm_links``), so later pushes update it;
- moves the mark to the newest creation time stored, page by page: pages come oldest
  first and each is stored (with the mark) in its own transaction, so a CRM failing
  mid-way loses nothing and the next pull resumes past the last stored page. The
  connector's own overlap makes a pull repeat the edge, and the unique keys make the
  repeat a no-op.

New leads are then enrolled by the next first-touch pass, within minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Engine, select

from nurture.crm import ConnectorError, ContactIn, ContactSource
from nurture.store.db import session_scope
from nurture.store.models import CrmCursor, CrmLink, Lead, Touchpoint
from nurture.store.sql import bulk_update, insert_for

__all__ = ["STREAM", "IntakeReport", "intake_contacts"]

STREAM = "contacts"
# Where a record without a readable creation time sorts: after every dated one.
_UNDATED = datetime.max.replace(tzinfo=UTC)


@dataclass
class IntakeReport:
    """What one contact intake saw and did."""

    connector: str
    since: datetime | None = None
    pulled: int = 0
    created: int = 0
    existing: int = 0  # matched a lead we already had, by email
    duplicates: int = 0  # the same email twice in the pull
    invalid: list[str] = field(default_factory=list)  # "<external id>: <reason>"
    applied: bool = False
    error: str | None = None  # the CRM failed mid-way; what was stored before stays

    def summary(self) -> dict[str, Any]:
        """Counts for logs and ``--json``."""
        return {
            "connector": self.connector,
            "since": self.since.isoformat() if self.since else None,
            "pulled": self.pulled,
            "created": self.created,
            "existing": self.existing,
            "duplicates": self.duplicates,
            "invalid": self.invalid,
            "applied": self.applied,
            "error": self.error,
        }


def _cursor(engine: Engine, connector: str) -> datetime | None:
    with session_scope(engine) as session:
        return session.scalar(
            select(CrmCursor.high_water).where(
                CrmCursor.connector == connector, CrmCursor.stream == STREAM
            )
        )


def _clean(contacts: list[ContactIn], report: IntakeReport) -> dict[str, ContactIn]:
    """email -> the earliest valid record with it."""
    out: dict[str, ContactIn] = {}
    for c in sorted(contacts, key=lambda c: c.created_at or _UNDATED):
        raw = c.email.strip() if isinstance(c.email, str) else ""
        if not c.external_id:
            report.invalid.append(f"{raw or '(no email)'}: no record id")
            continue
        if not raw:
            report.invalid.append(f"{c.external_id}: no email")
            continue
        try:
            email = validate_email(raw, check_deliverability=False).normalized.lower()
        except EmailNotValidError as exc:
            report.invalid.append(f"{c.external_id}: {exc}")
            continue
        if email in out:
            report.duplicates += 1
            continue
        out[email] = c
    return out


def intake_contacts(
    engine: Engine, connector: ContactSource, now: datetime, *, dry_run: bool = False
) -> IntakeReport:
    """Pull the contacts created since the mark and make them leads, once each.

    Page by page: each page is stored in its own transaction, which also moves the mark
    to the newest creation time of that page. When the CRM fails mid-way, the pages
    already stored stay stored, the mark stops past them only, and the report carries the
    error (``report.error``) instead of raising: the next pull resumes there.
    """
    name = connector.name
    report = IntakeReport(connector=name, since=_cursor(engine, name))
    try:
        for page in connector.pull_contacts(report.since, now):
            report.pulled += len(page)
            _store_page(engine, name, page, now, report, dry_run=dry_run)
    except ConnectorError as exc:
        report.error = str(exc)
    report.applied = not dry_run and report.error is None
    return report


def _store_page(
    engine: Engine,
    name: str,
    contacts: list[ContactIn],
    now: datetime,
    report: IntakeReport,
    *,
    dry_run: bool,
) -> None:
    """One page: new leads, links and the mark, in one transaction."""
    by_email = _clean(contacts, report)
    emails = sorted(by_email)
    with session_scope(engine) as session:
        known: dict[str, int] = {}
        for start in range(0, len(emails), 500):
            known.update(
                session.execute(
                    select(Lead.email, Lead.id).where(Lead.email.in_(emails[start : start + 500]))
                ).all()
            )
        report.existing += len(known)
        new = [e for e in emails if e not in known]
        report.created += len(new)
        if dry_run:
            return
        if new:
            session.execute(
                insert_for(session, Lead).on_conflict_do_nothing(index_elements=["email"]),
                [
                    {
                        "email": e,
                        "first_name": by_email[e].first_name,
                        "last_name": by_email[e].last_name,
                        "source": Touchpoint.sales.value,
                        "lifecycle_stage": "subscriber",
                        "attributes": (
                            {"company": by_email[e].company} if by_email[e].company else {}
                        ),
                        "behaviour_score": 0.0,
                        "fit_score": 0.0,
                        "created_at": min(by_email[e].created_at or now, now),
                        "updated_at": now,
                    }
                    for e in new
                ],
            )
            for start in range(0, len(new), 500):
                known.update(
                    session.execute(
                        select(Lead.email, Lead.id).where(Lead.email.in_(new[start : start + 500]))
                    ).all()
                )
        links = [
            {
                "lead_id": known[e],
                "connector": name,
                "object_type": c.object_type,
                "external_id": c.external_id,
                "created_at": now,
                "updated_at": now,
            }
            for e, c in by_email.items()
            if e in known
        ]
        if links:
            # Either unique key (lead already linked, or record already linked) means done.
            session.execute(insert_for(session, CrmLink).on_conflict_do_nothing(), links)
        # The newest creation time read, never past now: a record dated in the future (a
        # hostile or skewed CRM) would otherwise stop intake until that date, and one with
        # no readable date (captured as now) could skip the records of later pages.
        dated = [c.created_at for c in contacts if c.created_at is not None]
        if dated:
            newest = min(max(dated), now)
            row = session.scalars(
                select(CrmCursor).where(CrmCursor.connector == name, CrmCursor.stream == STREAM)
            ).first()
            if row is None:
                session.add(
                    CrmCursor(connector=name, stream=STREAM, high_water=newest, updated_at=now)
                )
            elif newest > row.high_water:
                bulk_update(session, CrmCursor, [{"id": row.id, "high_water": newest}])
