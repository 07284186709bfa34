"""A team's nurture programme: its campaigns, scoring and pipeline, loaded from one folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nurture.spec.consent import ConsentSpec, load_consent
from nurture.spec.schema import (
    CampaignSpec,
    PipelineSpec,
    ScoringSpec,
    SpecError,
    SpecErrors,
    load_campaigns,
    load_pipeline,
    load_scoring,
    template_exists,
)


@dataclass(frozen=True)
class Programme:
    """Everything a tick needs from git: campaigns, scoring, pipeline and the templates root."""

    campaigns: list[CampaignSpec]
    scoring: ScoringSpec
    pipeline: PipelineSpec
    templates: Path
    consent: ConsentSpec = field(default_factory=ConsentSpec)

    @classmethod
    def load(cls, campaigns_dir: Path, templates_dir: Path) -> Programme:
        """Load and validate the folder; raises ``SpecErrors`` listing every problem."""
        programme = cls(
            campaigns=load_campaigns([campaigns_dir], template_exists(templates_dir)),
            scoring=load_scoring(_first(campaigns_dir, "scoring")),
            pipeline=load_pipeline(_first(campaigns_dir, "pipeline")),
            templates=templates_dir,
            consent=load_consent(_first(campaigns_dir, "consent")),
        )
        unknown = [
            SpecError(
                str(campaigns_dir / f"{c.name}.yaml"),
                None,
                "topic",
                f"unknown topic {c.topic!r} (not in consent.yaml)",
            )
            for c in programme.campaigns
            if c.topic is not None and c.topic not in programme.consent.topics
        ]
        if unknown:
            raise SpecErrors(unknown)
        return programme


def _first(folder: Path, stem: str) -> Path | None:
    for suffix in (".yaml", ".yml"):
        path = folder / f"{stem}{suffix}"
        if path.exists():
            return path
    return None
