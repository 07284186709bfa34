"""Builders shared by tests: leads, programmes and mailers on real servers."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine

from nurture.config import PROJECT_ROOT
from nurture.message.rendering import TemplateStore
from nurture.outbox.delivery import Mailer
from nurture.outbox.smtp_transport import SmtpConfig, SmtpSender
from nurture.spec.programme import Programme
from nurture.spec.schema import CampaignSpec, PipelineSpec, ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Lead

TEMPLATES = PROJECT_ROOT / "templates" / "emails"
SECRET = "test-secret"


def add_leads(engine: Engine, now: datetime, *leads: dict[str, Any]) -> list[int]:
    """Insert leads (defaults filled in) and return their ids in order."""
    with session_scope(engine) as session:
        rows = []
        for spec in leads:
            row = Lead(
                email=spec["email"],
                first_name=spec.get("first_name"),
                last_name=spec.get("last_name"),
                source=spec.get("source", "website"),
                timezone=spec.get("timezone"),
                country=spec.get("country"),
                lifecycle_stage=spec.get("lifecycle_stage", "subscriber"),
                attributes=spec.get("attributes", {}),
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            rows.append(row)
        session.flush()
        return [r.id for r in rows]


def campaign(text: str) -> CampaignSpec:
    """A campaign spec from inline YAML."""
    return CampaignSpec.model_validate(yaml.safe_load(text))


def programme(*campaigns: CampaignSpec, scoring: ScoringSpec | None = None) -> Programme:
    """A programme of these campaigns over the shipped templates."""
    return Programme(
        campaigns=list(campaigns),
        scoring=scoring or ScoringSpec(),
        pipeline=PipelineSpec(),
        templates=TEMPLATES,
    )


def mailer(smtp_url: str, *, connections: int = 2, templates: Path = TEMPLATES) -> Mailer:
    """A mailer sending to ``smtp_url`` with tracking links under a test base URL."""
    sender = SmtpSender(SmtpConfig.from_url(smtp_url), connections=connections, backoff_base=0.01)
    return Mailer(
        store=TemplateStore(templates),
        sender=sender,
        from_address="Nurture Test <hello@nurture.test>",
        envelope_from="hello@nurture.test",
        secret=SECRET,
        tracking_url="http://track.nurture.test",
        unsubscribe_mailto="unsubscribe@nurture.test",
    )
