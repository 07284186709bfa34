"""Prefect global concurrency limits shared by every flow run: one slot per batch.

Concurrent ticks, on one worker or many, share the provider's limits: ``smtp`` for the mail
server and ``crm-<connector>`` for each CRM. A slot is held around a whole batch (hundreds
of messages or one CRM push), never per message: acquiring a slot is an API round trip.
Create the limits once with ``prefect gcl create smtp --limit 2`` and so on; a limit that
does not exist costs one warning and no waiting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from prefect.concurrency.sync import concurrency

from nurture.crm import (
    Connector,
    Eraser,
    FatalConnectorError,
    PromotionItem,
    PushResult,
    StageChange,
)

SMTP_LIMIT = "smtp"
# How long a batch may wait for a slot before its task fails (and retries).
ACQUIRE_TIMEOUT = 600.0


def crm_limit(connector: str) -> str:
    """The global concurrency limit's name for one CRM connector."""
    return f"crm-{connector}"


@contextmanager
def slot(name: str | None) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``name`` (nothing when None)."""
    if not name:
        yield
        return
    with concurrency(name, occupy=1, timeout_seconds=ACQUIRE_TIMEOUT):
        yield


class LimitedConnector:
    """A connector whose every push batch (and pull) holds one slot of its CRM's limit."""

    def __init__(self, inner: Connector, limit: str | None) -> None:
        self.inner = inner
        self.limit = limit
        self.name = inner.name
        self.batch_size = inner.batch_size

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        """Push one batch while holding a slot."""
        with slot(self.limit):
            return self.inner.push(items)

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        """Pull stage changes while holding a slot."""
        with slot(self.limit):
            return self.inner.pull(since, now)

    def delete(self, object_type: str, external_id: str) -> None:
        """Erase a CRM object (GDPR) while holding a slot.

        Raises:
            FatalConnectorError: the connector cannot delete (the deletion parks).
        """
        if not isinstance(self.inner, Eraser):
            raise FatalConnectorError(f"connector {self.name!r} cannot delete")
        with slot(self.limit):
            self.inner.delete(object_type, external_id)
