"""The errors a user can fix. ``NurtureError`` is their root; the CLI prints them in one line."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["ConfigError", "InputError", "NurtureError"]


class NurtureError(Exception):
    """A problem the user can fix: bad settings, bad input, a refused operation."""


class ConfigError(NurtureError):
    """A setting is missing, malformed or unsafe for this environment."""


class InputError(NurtureError, ValueError):
    """A value given on the command line or as a flow parameter is malformed."""


def parse_instant(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 value as an aware datetime (naive means UTC); None when empty.

    The CLI's ``--now``/``--since`` and the flows' ``now`` parameter all parse here.
    """
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(
            f"{name}: expected an ISO 8601 date or timestamp such as 2026-03-02 or "
            f"2026-03-02T09:00:00Z, got {value!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_now(name: str, value: str | None) -> datetime:
    """``value`` as an instant, else the current time: only the edges (CLI, flows) read
    the clock; the core always takes ``now``."""
    return parse_instant(name, value) or datetime.now(UTC)
