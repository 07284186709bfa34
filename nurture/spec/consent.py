"""``consent.yaml``: topics, double opt-in, capture forms, retention and the postal address.

Pure models: nothing here touches the database. A missing file gives the defaults, under
which nothing changes from a programme without consent rules (no topics, no forms).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from nurture.spec.rules import parse_duration
from nurture.spec.schema import SpecErrors, _Strict, _validate, _yaml_error
from nurture.spec.touchpoints import Touchpoint
from nurture.spec.yamlfile import YamlError, load_yaml

# The lawful bases of GDPR article 6(1), as stored in consent records.
Basis = Literal[
    "consent",
    "legitimate_interest",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
]
BASES: tuple[str, ...] = (
    "consent",
    "legitimate_interest",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
)
ALL_TOPICS = "*"  # a consent record for every topic (an import's per-file basis, say)
_NAME = r"^[a-z0-9][a-z0-9_-]*$"
# Lead fields a form may fill (email is required and always mapped).
FORM_FIELDS = frozenset(
    {"email", "first_name", "last_name", "company", "timezone", "country", "owner"}
)


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str) and value.strip().endswith("M"):  # months: 30 days each
        return timedelta(days=30 * int(value.strip()[:-1]))
    if isinstance(value, str | int | float):
        return parse_duration(value)
    raise ValueError(f"expected a duration like 7d or 24M, got {value!r}")


class TopicSpec(_Strict):
    """One subscription topic: what the preference centre shows, and what a campaign with
    this ``topic:`` needs from a lead before it may mail them."""

    label: str = ""
    description: str = ""
    # A lead may be mailed under this topic if it holds a granted record with one of these.
    bases: list[Basis] = Field(default_factory=lambda: list[Basis](["consent"]), min_length=1)


class FormSpec(_Strict):
    """A capture form: ``POST /forms/<name>`` on the tracking service."""

    touchpoint: str = Touchpoint.website.value
    # form field name -> lead field (email, first_name, ...) or ``attributes.<key>``
    fields: dict[str, str] = Field(default_factory=lambda: {"email": "email"})
    topics: list[str] = Field(default_factory=list)
    basis: Basis = "consent"
    consent_text: str = ""
    consent_version: str = "1"
    redirect: str | None = None  # the thank-you URL after a plain HTML post
    honeypot: str = "website"  # a hidden field people leave empty and bots fill

    @field_validator("touchpoint")
    @classmethod
    def _touchpoint(cls, value: str) -> str:
        if value not in {t.value for t in Touchpoint}:
            raise ValueError(f"unknown touchpoint {value!r}")
        return value

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: dict[str, str]) -> dict[str, str]:
        for target in value.values():
            if target not in FORM_FIELDS and not (
                target.startswith("attributes.") and len(target) > len("attributes.")
            ):
                raise ValueError(
                    f"unknown lead field {target!r}; expected one of {sorted(FORM_FIELDS)} "
                    "or attributes.<key>"
                )
        if "email" not in value.values():
            raise ValueError("no form field maps to email")
        return value


class Unconfirmed(_Strict):
    """What happens to double opt-in leads that never confirm."""

    after: timedelta = timedelta(days=7)
    action: Literal["purge", "keep"] = "keep"  # keep: kept, never mailed

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, value: object) -> timedelta:
        return _duration(value)


class Retention(_Strict):
    """How long raw events are kept (consent events are proof and are kept)."""

    events: timedelta | None = None

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, value: object) -> timedelta | None:
        return None if value is None else _duration(value)


class ConsentSpec(_Strict):
    """The programme's consent rules, from ``consent.yaml`` beside the campaigns."""

    topics: dict[str, TopicSpec] = Field(default_factory=dict)
    double_opt_in: list[str] = Field(default_factory=list)  # touchpoints
    unconfirmed: Unconfirmed = Field(default_factory=Unconfirmed)
    forms: dict[str, FormSpec] = Field(default_factory=dict)
    retention: Retention = Field(default_factory=Retention)
    postal_address: str | None = None  # CAN-SPAM: required in marketing mail when set

    @model_validator(mode="after")
    def _names(self) -> ConsentSpec:
        import re

        for name in [*self.topics, *self.forms]:
            if not re.match(_NAME, name) or len(name) > 64:
                raise ValueError(f"bad name {name!r}: lower-case letters, digits, - and _")
        touchpoints = {t.value for t in Touchpoint}
        for source in self.double_opt_in:
            if source not in touchpoints:
                raise ValueError(f"double_opt_in: unknown touchpoint {source!r}")
        for name, form in self.forms.items():
            for topic in form.topics:
                if topic not in self.topics:
                    raise ValueError(f"forms.{name}.topics: unknown topic {topic!r}")
        return self

    def topic_bases(self) -> dict[str, list[str]]:
        """Each topic with the lawful bases it accepts."""
        return {name: list(t.bases) for name, t in self.topics.items()}


def load_consent(path: Path | None) -> ConsentSpec:
    """Load ``consent.yaml``; a missing file gives the defaults (no topics, no forms)."""
    if path is None or not path.exists():
        return ConsentSpec()
    try:
        doc = load_yaml(path)
    except YamlError as exc:
        raise SpecErrors([_yaml_error(path, exc)]) from None
    return _validate(ConsentSpec, doc)
