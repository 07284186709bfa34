"""The emergency stop: pause and resume a campaign, stored with when, why and by whom.

A pause holds a campaign at once: the send loop's claim skips its queued mail (it stays
queued, nothing of it goes out), and ticks neither enroll into it nor advance it. Resuming
lets the next tick pick everything up where it stopped. ``stop_at`` in a campaign's spec
holds its mail the same way, for good.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from nurture.errors import NurtureError
from nurture.spec.schema import CampaignSpec, parse_instant
from nurture.store.models import Campaign, CampaignPause

MAX_REASON = 1000


@dataclass(frozen=True)
class PauseInfo:
    """One pause of one campaign."""

    campaign: str
    reason: str
    paused_at: datetime
    paused_by: str | None = None
    resumed_at: datetime | None = None
    resumed_by: str | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "campaign": self.campaign,
            "reason": self.reason,
            "paused_at": self.paused_at.isoformat(),
            "paused_by": self.paused_by,
            "resumed_at": self.resumed_at.isoformat() if self.resumed_at else None,
            "resumed_by": self.resumed_by,
        }


def _campaign_id(session: Session, name: str) -> int:
    found = session.scalar(select(Campaign.id).where(Campaign.name == name))
    if found is None:
        known = sorted(session.scalars(select(Campaign.name)))
        raise NurtureError(
            f"unknown campaign {name!r}: the database knows "
            f"{', '.join(known) if known else 'no campaign yet'} "
            "(a campaign is stored by its first tick)"
        )
    return found


def _info(name: str, row: CampaignPause) -> PauseInfo:
    return PauseInfo(
        campaign=name,
        reason=row.reason,
        paused_at=row.paused_at,
        paused_by=row.paused_by,
        resumed_at=row.resumed_at,
        resumed_by=row.resumed_by,
    )


def _open_pause(session: Session, campaign_id: int) -> CampaignPause | None:
    return session.scalars(
        select(CampaignPause)
        .where(CampaignPause.campaign_id == campaign_id, CampaignPause.resumed_at.is_(None))
        .order_by(CampaignPause.id)
        .limit(1)
    ).first()


def pause(
    session: Session, name: str, reason: str, now: datetime, *, by: str | None = None
) -> tuple[PauseInfo, bool]:
    """Pause campaign ``name``; returns the pause and whether it is new.

    Pausing a paused campaign changes nothing and returns the pause already in force, so
    an operator may press the button twice.

    Raises:
        NurtureError: the campaign is unknown, or the reason is empty or too long.
    """
    text = reason.strip()
    if not text:
        raise NurtureError("a pause needs a reason (--reason): say why, for whoever resumes it")
    if len(text) > MAX_REASON:
        raise NurtureError(f"the reason is {len(text)} characters long: at most {MAX_REASON}")
    cid = _campaign_id(session, name)
    existing = _open_pause(session, cid)
    if existing is not None:
        return _info(name, existing), False
    row = CampaignPause(campaign_id=cid, reason=text, paused_by=by, paused_at=now)
    session.add(row)
    session.flush()
    return _info(name, row), True


def resume(
    session: Session, name: str, now: datetime, *, by: str | None = None
) -> PauseInfo | None:
    """Resume campaign ``name``; returns the pause it ended, or None if it was not paused.

    Raises:
        NurtureError: the campaign is unknown.
    """
    cid = _campaign_id(session, name)
    row = _open_pause(session, cid)
    if row is None:
        return None
    row.resumed_at = now
    row.resumed_by = by
    session.flush()
    return _info(name, row)


def paused_campaigns(session: Session) -> dict[str, PauseInfo]:
    """Every campaign paused now, by name."""
    rows = session.execute(
        select(Campaign.name, CampaignPause)
        .join(CampaignPause, CampaignPause.campaign_id == Campaign.id)
        .where(CampaignPause.resumed_at.is_(None))
        .order_by(CampaignPause.id)
    ).all()
    out: dict[str, PauseInfo] = {}
    for name, row in rows:
        out.setdefault(name, _info(name, row))
    return out


def pause_history(session: Session, name: str) -> list[PauseInfo]:
    """Every pause of campaign ``name``, oldest first."""
    cid = _campaign_id(session, name)
    rows = session.scalars(
        select(CampaignPause).where(CampaignPause.campaign_id == cid).order_by(CampaignPause.id)
    )
    return [_info(name, row) for row in rows]


def is_paused(session: Session, campaign_id: int) -> bool:
    """Whether this campaign is paused now."""
    return _open_pause(session, campaign_id) is not None


def held_campaign_ids(session: Session, now: datetime) -> list[int]:
    """Campaigns whose mail must not go out at ``now``: paused, or past their ``stop_at``.

    Two small queries over the campaigns table (tens of rows), run once per claimed chunk,
    so a pause takes effect at the next chunk of a running tick.
    """
    held = set(
        session.scalars(select(CampaignPause.campaign_id).where(CampaignPause.resumed_at.is_(None)))
    )
    stops = session.execute(
        select(Campaign.id, Campaign.spec["stop_at"].as_string()).where(
            Campaign.spec["stop_at"].as_string().is_not(None)
        )
    ).all()
    for cid, stop in stops:
        try:
            when = parse_instant(stop)
        except ValueError:
            continue  # stored specs were validated when stored; this cannot be one of them
        if now >= when:
            held.add(cid)
    return sorted(held)


def campaign_state(spec: CampaignSpec, pause_info: PauseInfo | None, now: datetime) -> str:
    """One word for where a campaign stands at ``now``.

    ``paused`` (the emergency stop), ``stopped`` (past ``stop_at``), ``scheduled`` (before
    ``starts_at``), ``closed`` (past ``ends_at``: no new leads, the enrolled ones go on),
    ``inactive`` (``active: false``) or ``live``.
    """
    if pause_info is not None:
        return "paused"
    if spec.stopped(now):
        return "stopped"
    if not spec.active:
        return "inactive"
    if spec.starts_at and now < spec.starts_at:
        return "scheduled"
    if not spec.enrolling(now):
        return "closed"
    return "live"


def held_reasons(session: Session, specs: Iterable[CampaignSpec], now: datetime) -> dict[str, str]:
    """Campaigns of ``specs`` whose mail is held at ``now``, with why (for a tick's report)."""
    paused = paused_campaigns(session)
    out: dict[str, str] = {}
    for spec in specs:
        if spec.name in paused:
            p = paused[spec.name]
            out[spec.name] = f"paused since {p.paused_at.isoformat()}: {p.reason}"
        elif spec.stopped(now) and spec.stop_at is not None:
            out[spec.name] = f"stopped at {spec.stop_at.isoformat()} (stop_at)"
    return out
