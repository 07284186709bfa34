"""A team's nurture programme: its campaigns, scoring and pipeline, loaded from one folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nurture.spec.schema import (
    CampaignSpec,
    PipelineSpec,
    ScoringSpec,
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

    @classmethod
    def load(cls, campaigns_dir: Path, templates_dir: Path) -> Programme:
        """Load and validate the folder; raises ``SpecErrors`` listing every problem."""
        return cls(
            campaigns=load_campaigns([campaigns_dir], template_exists(templates_dir)),
            scoring=load_scoring(_first(campaigns_dir, "scoring")),
            pipeline=load_pipeline(_first(campaigns_dir, "pipeline")),
            templates=templates_dir,
        )


def _first(folder: Path, stem: str) -> Path | None:
    for suffix in (".yaml", ".yml"):
        path = folder / f"{stem}{suffix}"
        if path.exists():
            return path
    return None
