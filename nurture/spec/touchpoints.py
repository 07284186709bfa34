"""The touchpoints a lead can come from: a word of the specs and a column of the store."""

from __future__ import annotations

import enum


class Touchpoint(enum.StrEnum):
    """Where a lead came from."""

    website = "website"
    social = "social"
    marketplace = "marketplace"
    partner = "partner"
    franchise = "franchise"
    sales = "sales"
    import_ = "import"
    other = "other"
