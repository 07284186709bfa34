"""The CRM connector contract and its registry (entry-point group ``nurture.connectors``).

A connector pushes promoted leads into a CRM and pulls stage changes back. It never touches
our database: :mod:`nurture.journey.pipeline` owns the promotion queue, links and transitions, so a
third-party connector shipped as its own package only has to speak its vendor's API.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

from nurture.errors import NurtureError

ENTRY_POINT_GROUP = "nurture.connectors"


class ConnectorError(NurtureError):
    """Base class of connector failures."""


class RetriableConnectorError(ConnectorError):
    """Worth retrying later: network trouble, 429, 5xx, a daily limit that will reset."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalConnectorError(ConnectorError):
    """Retrying will not help: bad credentials, validation errors, other 4xx."""


@dataclass(frozen=True)
class PromotionItem:
    """One lead to push, with what the CRM needs to create or update it."""

    promotion_id: int
    lead_id: int
    email: str
    stage: str
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None
    source: str | None = None
    behaviour_score: float = 0.0
    fit_score: float = 0.0
    grade: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    external_id: str | None = None  # the linked CRM id, when we already know it


@dataclass(frozen=True)
class PushResult:
    """The outcome for one item: ok with the CRM id, or an error classified for retry."""

    promotion_id: int
    ok: bool
    external_id: str | None = None
    object_type: str = "contact"
    error: str | None = None
    retryable: bool = False


@dataclass(frozen=True)
class StageChange:
    """A stage change made in the CRM, pulled back."""

    external_id: str
    object_type: str
    stage: str
    occurred_at: datetime
    email: str | None = None


@dataclass(frozen=True)
class ContactIn:
    """A contact (or lead) created in the CRM, pulled in as a new lead: intake."""

    external_id: str
    object_type: str
    email: str | None
    # When the CRM record was created: the lead's capture time. None when the CRM sent no
    # readable one: the lead is captured now, and the record does not move the mark.
    created_at: datetime | None
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None


@runtime_checkable
class ContactSource(Protocol):
    """A connector that can list the contacts created since a high-water mark."""

    name: str

    def pull_contacts(self, since: datetime | None, now: datetime) -> Iterator[list[ContactIn]]:
        """Contacts created since ``since`` (minus the connector's overlap), page by page,
        oldest first (ascending creation time), so each page can be stored before the next
        is asked for and a failure mid-way loses nothing already pulled."""
        ...


@runtime_checkable
class Connector(Protocol):
    """What every CRM connector implements."""

    name: str
    batch_size: int

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        """Create or update the CRM records for ``items``; one result per item."""
        ...

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        """Stage changes made in the CRM since the high-water mark ``since``."""
        ...


@runtime_checkable
class Eraser(Protocol):
    """A connector that can erase a person it created (GDPR art. 17); optional."""

    def delete(self, object_type: str, external_id: str) -> None:
        """Delete the CRM object; one already gone is not an error.

        Raises:
            RetriableConnectorError: worth trying again later.
            FatalConnectorError: retrying will not help (the item parks with the reason).
        """
        ...


@cache
def _registered() -> tuple[EntryPoint, ...]:
    """The group's entry points, read once per process (scanning every installed
    distribution's metadata costs tens of milliseconds, and a tick asks each time)."""
    return tuple(entry_points(group=ENTRY_POINT_GROUP))


def available_connectors() -> list[str]:
    """Names registered under the ``nurture.connectors`` entry-point group."""
    return sorted(ep.name for ep in _registered())


def load_connector(name: str, **options: Any) -> Connector:
    """Instantiate the connector registered as ``name``."""
    for ep in _registered():
        if ep.name == name:
            factory = ep.load()
            connector = factory(**options)
            if not isinstance(connector, Connector):
                raise TypeError(f"connector {name!r} does not implement nurture.crm.Connector")
            return connector
    raise LookupError(
        f"unknown connector {name!r}: installed connectors are "
        f"{', '.join(available_connectors()) or 'none'}"
    )
