"""Pure time arithmetic for sequences: time zones, send windows, waits and A/B assignment.

Nothing here touches the database or the wall clock, so it is cheap to property-test.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from importlib import resources
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nurture.spec.schema import WEEKDAYS, SendWindow, Variant, Wait


@cache
def _country_zones() -> dict[str, str]:
    text = resources.files("nurture").joinpath("data/country_zones.json").read_text("utf-8")
    return dict(json.loads(text))


def country_zone(country: str | None) -> str | None:
    """The primary IANA zone of an ISO 3166 alpha-2 country code, if we know it."""
    if not country:
        return None
    return _country_zones().get(country.upper())


@cache
def zone(name: str) -> ZoneInfo | None:
    """A ZoneInfo for ``name``, or None when the name is not a valid zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def effective_zone(
    lead_tz: str | None, account_tz: str | None, country: str | None, default: str
) -> ZoneInfo:
    """The lead's zone, else the account's, else the country's primary zone, else ``default``."""
    for candidate in (lead_tz, account_tz, country_zone(country), default):
        if candidate:
            found = zone(candidate)
            if found is not None:
                return found
    return ZoneInfo("UTC")


def _local(day: date, at: time, tz: ZoneInfo) -> datetime:
    """Local wall time on ``day`` as UTC; a time skipped by DST maps to the transition."""
    naive = datetime.combine(day, at)
    early = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    late = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if early.astimezone(tz).replace(tzinfo=None) == naive:
        return min(early, late)  # an ambiguous (fall-back) time: take its first occurrence
    # In a spring-forward gap: ``early`` is before the jump and ``late`` after it. The
    # first valid local time at or after ``naive`` is the jump itself; find it by bisection.
    while late - early > timedelta(seconds=1):
        mid = early + (late - early) / 2
        if mid.astimezone(tz).replace(tzinfo=None) < naive:
            early = mid
        else:
            late = mid
    return late.replace(microsecond=0) if late.microsecond else late


def next_opening(now: datetime, tz: ZoneInfo, window: SendWindow | None) -> datetime:
    """The first instant at or after ``now`` inside the send window, in UTC."""
    if window is None:
        return now
    local = now.astimezone(tz)
    days = {WEEKDAYS.index(d) for d in window.days}
    for offset in range(8):
        day = local.date() + timedelta(days=offset)
        if day.weekday() not in days:
            continue
        start = _local(day, window.start, tz)
        end = _local(day, window.end, tz)
        if now < end:
            return max(now, start)
    raise AssertionError("a window with at least one day always opens within 8 days")


def in_window(now: datetime, tz: ZoneInfo, window: SendWindow | None) -> bool:
    """Whether ``now`` falls inside the window in zone ``tz``."""
    return next_opening(now, tz, window) == now


def due_after(now: datetime, wait: Wait, tz: ZoneInfo) -> datetime:
    """When a step with ``wait`` falls due, counted from ``now``."""
    if wait.weekday is None or wait.at is None:
        return now + wait.delay
    local = now.astimezone(tz)
    ahead = (wait.weekday - local.weekday()) % 7
    candidate = _local(local.date() + timedelta(days=ahead), wait.at, tz)
    if candidate <= now:
        candidate = _local(local.date() + timedelta(days=ahead + 7), wait.at, tz)
    return candidate


def choose_variant(lead_id: int, campaign: str, step_id: str, variants: list[Variant]) -> int:
    """A deterministic, weighted choice of variant index for one (lead, step)."""
    digest = hashlib.blake2b(f"{campaign}\x00{step_id}\x00{lead_id}".encode(), digest_size=8)
    point = int.from_bytes(digest.digest(), "big") / 2**64 * sum(v.weight for v in variants)
    for i, variant in enumerate(variants):
        point -= variant.weight
        if point < 0:
            return i
    return len(variants) - 1


def variant_label(index: int, variant: Variant) -> str:
    """The name recorded for a variant: its own name, else A, B, C..."""
    return variant.name or chr(ord("A") + index)
