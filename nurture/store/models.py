"""The data model: SQLAlchemy 2.0 typed ORM, the same schema on SQLite and PostgreSQL.

Times are stored as naive UTC and returned as aware UTC (:class:`UTCDateTime`), so both
databases compare them the same way and the Python side never sees a naive datetime.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import true

from nurture.spec.touchpoints import Touchpoint as Touchpoint  # re-exported: a column type

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigID = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and read back as an aware UTC datetime."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class DeliveryStatus(enum.StrEnum):
    """States of an outbox row: queued -> claimed -> sending -> sent | failed | unknown.

    ``claimed``: reserved by one sender, no byte sent, given back to the queue if that sender
    dies. ``sending``: bytes may be on the wire; if the sender dies, it becomes ``unknown``.
    """

    queued = "queued"
    claimed = "claimed"
    sending = "sending"
    sent = "sent"
    failed = "failed"
    unknown = "unknown"
    skipped = "skipped"  # suppressed or exited between queueing and sending


class EnrollmentStatus(enum.StrEnum):
    """Where an enrollment stands in its campaign."""

    active = "active"
    completed = "completed"
    exited = "exited"


class PromotionStatus(enum.StrEnum):
    """States of a promotion-queue row."""

    queued = "queued"
    done = "done"
    parked = "parked"


class Base(DeclarativeBase):
    """Declarative base with the shared type map."""

    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class Account(Base):
    """A company; leads at the same company roll up into an account score."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    domain: Mapped[str | None] = mapped_column(String(255), unique=True)
    timezone: Mapped[str | None] = mapped_column(String(64))
    country: Mapped[str | None] = mapped_column(String(2))
    score: Mapped[float] = mapped_column(Float, default=0.0)
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Lead(Base):
    """A person we nurture, keyed by normalised email."""

    __tablename__ = "leads"
    # Room on each page for the new versions of updated rows (migration 0011).
    __table_args__ = {"postgresql_with": {"fillfactor": 85}}

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    first_name: Mapped[str | None] = mapped_column(String(255))
    last_name: Mapped[str | None] = mapped_column(String(255))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"), index=True)
    source: Mapped[str] = mapped_column(String(32), default=Touchpoint.import_.value)
    timezone: Mapped[str | None] = mapped_column(String(64))
    country: Mapped[str | None] = mapped_column(String(2))
    lifecycle_stage: Mapped[str] = mapped_column(String(32), default="subscriber", index=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    behaviour_score: Mapped[float] = mapped_column(Float, default=0.0)
    fit_score: Mapped[float] = mapped_column(Float, default=0.0)
    grade: Mapped[str | None] = mapped_column(String(1))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    account: Mapped[Account | None] = relationship()


class Campaign(Base):
    """A campaign as last loaded from its YAML spec."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # The consent topic the campaign mails under (None: no consent check, as before topics).
    topic: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Enrollment(Base):
    """A lead's pass through a campaign. ``step_id`` is the next step; ``due_at`` its time."""

    __tablename__ = "enrollments"
    __table_args__ = (
        UniqueConstraint("campaign_id", "lead_id", "cycle", name="uq_enrollment_cycle"),
        Index("ix_enrollments_due", "status", "due_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"), index=True)
    cycle: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default=EnrollmentStatus.active.value)
    step_id: Mapped[str | None] = mapped_column(String(128))
    due_at: Mapped[datetime | None]
    enrolled_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    exit_reason: Mapped[str | None] = mapped_column(String(255))


class Delivery(Base):
    """The outbox: one row per (enrollment, step), so a lead never gets a step twice."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("enrollment_id", "step_id", name="uq_delivery_enrollment_step"),
        Index("ix_deliveries_status", "status", "due_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id"))
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"), index=True)
    step_id: Mapped[str] = mapped_column(String(128))
    template: Mapped[str] = mapped_column(String(255))
    variant: Mapped[str | None] = mapped_column(String(64))
    domain: Mapped[str] = mapped_column(String(255))  # recipient's domain, for throttles
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.queued.value)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    # Wall-clock lease time of the claim (not the simulated clock): crash recovery uses it.
    claimed_at: Mapped[datetime | None]
    due_at: Mapped[datetime]
    queued_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class Event(Base):
    """An engagement event: sent, opened, clicked, replied, bounced, page_view, ..."""

    __tablename__ = "events"
    # Scoring reads (lead_id, type, occurred_at, counted_*) from this index alone.
    __table_args__ = (
        Index(
            "ix_events_lead_type",
            "lead_id",
            "type",
            "occurred_at",
            "counted_human",
            "counted_any",
        ),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"))
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime]
    url: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # 'human' or 'machine' for opens and clicks (see nurture.engagement.classify); NULL for
    # other types.
    engagement: Mapped[str | None] = mapped_column(String(8))
    # Why an event is machine: comma-separated signals, e.g. 'honeypot,too-fast:0.4s'.
    engagement_reason: Mapped[str | None] = mapped_column(String(255))
    # Whether scoring counts this event when it counts human engagement only
    # (counted_human) or all engagement (counted_any): one open per delivery and one
    # click per distinct link per delivery. Always true for other event types.
    counted_human: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    counted_any: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


class ScoreSnapshot(Base):
    """A lead's scores at one instant, kept for history and back-tests."""

    __tablename__ = "score_snapshots"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"), index=True)
    computed_at: Mapped[datetime]
    behaviour: Mapped[float] = mapped_column(Float)
    fit: Mapped[float] = mapped_column(Float)
    grade: Mapped[str | None] = mapped_column(String(1))


class StageTransition(Base):
    """One change of a lead's lifecycle stage, with its time and cause."""

    __tablename__ = "stage_transitions"
    __table_args__ = (Index("ix_transitions_time", "occurred_at"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"), index=True)
    from_stage: Mapped[str | None] = mapped_column(String(32))
    to_stage: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime]
    cause: Mapped[str] = mapped_column(String(255))
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id"))


class Suppression(Base):
    """An address that must never get marketing mail: unsubscribed, bounced, complained."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    reason: Mapped[str] = mapped_column(String(32))
    source: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime]


class CrmLink(Base):
    """Which CRM object a lead became, so email is used to match only the first time."""

    __tablename__ = "crm_links"
    __table_args__ = (
        UniqueConstraint("connector", "object_type", "lead_id", name="uq_crm_link_lead"),
        UniqueConstraint("connector", "object_type", "external_id", name="uq_crm_link_ext"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"))
    connector: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(64))
    external_id: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Promotion(Base):
    """The promotion queue: an outbox of leads to push into a pipeline stage."""

    __tablename__ = "promotions"
    __table_args__ = (
        UniqueConstraint("lead_id", "connector", "stage", name="uq_promotion"),
        Index("ix_promotions_status", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"))
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id"))
    connector: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=PromotionStatus.queued.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    done_at: Mapped[datetime | None]
    # Since when every push failed retryably (cleared by a success or a requeue): a
    # promotion parks after a *time* of failures, never after a count of attempts.
    failing_since: Mapped[datetime | None]
    parked_at: Mapped[datetime | None]


class CampaignVersion(Base):
    """One version of a campaign's spec, live from ``created_at`` until ``retired_at``."""

    __tablename__ = "campaign_versions"
    __table_args__ = (UniqueConstraint("campaign_id", "version", name="uq_campaign_version"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    version: Mapped[int] = mapped_column(Integer)
    spec_hash: Mapped[str] = mapped_column(String(64))
    # The spec as it was (NULL for versions stored before specs were kept), so a replay
    # can run any past version.
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The template sources the version sends with, file -> source (layouts and partials it
    # uses included); NULL for versions stored before template sources were kept.
    templates: Mapped[dict[str, str] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]


class CampaignPause(Base):
    """An emergency stop of one campaign: when, why and by whom, until it is resumed.

    A campaign is paused while it has a row with ``resumed_at`` NULL; the rows stay as
    its pause history.
    """

    __tablename__ = "campaign_pauses"
    __table_args__ = (Index("ix_campaign_pauses_open", "campaign_id", "resumed_at"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    reason: Mapped[str] = mapped_column(Text)
    paused_by: Mapped[str | None] = mapped_column(String(255))
    paused_at: Mapped[datetime]
    resumed_at: Mapped[datetime | None]
    resumed_by: Mapped[str | None] = mapped_column(String(255))


class WebhookReceipt(Base):
    """A verified webhook signature, kept until its replay window closes: the same signed
    request sent again is refused (409), whichever serve process receives it."""

    __tablename__ = "webhook_receipts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    signature: Mapped[str] = mapped_column(String(64), unique=True)
    signed_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    received_at: Mapped[datetime]


class ConsentStatus(enum.StrEnum):
    """Where a lead's consent to one topic stands."""

    granted = "granted"
    withdrawn = "withdrawn"


class Consent(Base):
    """A lead's current consent to one topic (``*``: every topic), with its proof.

    Every change is also an event (``consent_granted`` / ``consent_withdrawn``) carrying the
    same fields, so the history stays provable while this row says what holds now.
    """

    __tablename__ = "consents"
    __table_args__ = (UniqueConstraint("lead_id", "topic", name="uq_consent_lead_topic"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"))
    topic: Mapped[str] = mapped_column(String(64))
    basis: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    # form, import, touchpoint, preferences, confirmation, unsubscribe
    source_kind: Mapped[str] = mapped_column(String(32))
    source: Mapped[str | None] = mapped_column(String(255))  # form name, file name, touchpoint
    text_version: Mapped[str | None] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    recorded_at: Mapped[datetime]


class TopicBasis(Base):
    """Which lawful bases a topic accepts, as last loaded from the programme's consent.yaml."""

    __tablename__ = "topic_bases"

    topic: Mapped[str] = mapped_column(String(64), primary_key=True)
    basis: Mapped[str] = mapped_column(String(32), primary_key=True)


class OptIn(Base):
    """A double opt-in in progress or done: until ``confirmed_at`` the lead gets nothing but
    its one confirmation email."""

    __tablename__ = "opt_ins"

    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"), primary_key=True)
    form: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))
    topics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what confirming grants
    requested_at: Mapped[datetime]
    confirmation_sent_at: Mapped[datetime | None] = mapped_column(index=True)
    # The confirmation email's outbox state: NULL while due, then claimed, sending (bytes
    # may be on the wire), sent, failed (the address refused it) or unknown (its sender
    # died while it was on the wire: never resent). See nurture.privacy.opt_in.
    confirmation_state: Mapped[str | None] = mapped_column(String(16), index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None]
    confirmed_at: Mapped[datetime | None]
    # Whether it keeps the lead out of every campaign until confirmed: true for a lead the
    # signup created, false for a known lead asking for more topics.
    holds: Mapped[bool] = mapped_column(Boolean, default=True)


class CrmDeletionStatus(enum.StrEnum):
    """States of a CRM deletion-queue row."""

    queued = "queued"
    done = "done"
    parked = "parked"


class CrmDeletion(Base):
    """The CRM deletion queue (erasure): the CRM object to delete, never the person's address.

    It has the promotion queue's guarantees: retried with backoff, parked only after a time
    of retryable failures or at once on a fatal one, and never dropped.
    """

    __tablename__ = "crm_deletions"
    __table_args__ = (
        UniqueConstraint("connector", "object_type", "external_id", name="uq_crm_deletion"),
        Index("ix_crm_deletions_status", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    connector: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(64))
    external_id: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=CrmDeletionStatus.queued.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    failing_since: Mapped[datetime | None]
    parked_at: Mapped[datetime | None]
    done_at: Mapped[datetime | None]


class Alert(Base):
    """The sales-alert outbox: one row per (stage transition, alert rule), sent once."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("transition_id", "rule", name="uq_alert_transition_rule"),
        Index("ix_alerts_status", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    transition_id: Mapped[int] = mapped_column(ForeignKey("stage_transitions.id"))
    rule: Mapped[int] = mapped_column(Integer)  # index of the rule in pipeline.yaml alerts
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    channel: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued | sent | parked
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    failing_since: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]


class CrmCursor(Base):
    """A high-water mark of one pull stream of one connector, e.g. contact intake."""

    __tablename__ = "crm_cursors"
    __table_args__ = (UniqueConstraint("connector", "stream", name="uq_crm_cursor"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    connector: Mapped[str] = mapped_column(String(64))
    stream: Mapped[str] = mapped_column(String(64))
    high_water: Mapped[datetime]
    updated_at: Mapped[datetime]
