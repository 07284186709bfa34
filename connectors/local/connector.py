"""The ``local`` connector: the built-in pipeline in nurture's own database.

Pushing succeeds at once with a stable id (``local-<lead id>``); :mod:`nurture.journey.pipeline`
records the stage change and the link, exactly as it does for a remote CRM.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from nurture.crm import PromotionItem, PushResult, StageChange


class LocalConnector:
    """Promotes into the built-in pipeline tables."""

    name = "local"

    def __init__(self, batch_size: int = 500) -> None:
        self.batch_size = batch_size

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        """Every item succeeds; the pipeline module writes the stage and link."""
        return [
            PushResult(
                promotion_id=i.promotion_id,
                ok=True,
                external_id=i.external_id or f"local-{i.lead_id}",
                object_type="lead",
            )
            for i in items
        ]

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        """Stage changes in the local pipeline are already in our tables: nothing to pull."""
        return []
