"""The errors a user can fix. ``NurtureError`` is their root; the CLI prints them in one line."""

from __future__ import annotations

__all__ = ["ConfigError", "NurtureError"]


class NurtureError(Exception):
    """A problem the user can fix: bad settings, bad input, a refused operation."""


class ConfigError(NurtureError):
    """A setting is missing, malformed or unsafe for this environment."""
