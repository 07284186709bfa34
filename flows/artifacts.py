"""What a tick, an import and a report show in the Prefect UI: tables and markdown.

The builders are pure functions over the core's result objects (tested without Prefect);
``publish_*`` hand them to Prefect. Artifact keys are stable, so the UI keeps a history
of every run under one name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from nurture.reporting.report import CampaignFunnel
from nurture.tick import TickResult

TICK_TABLE = "nurture-tick"
TICK_HEALTH = "nurture-tick-health"
TICK_PROGRESS = "nurture-tick-send"
FUNNEL = "campaign-funnel"
IMPORT_TABLE = "lead-import"
CRM_SYNC = "crm-sync"
INBOX_POLL = "inbox-poll"

ALL_STEPS = "(all steps)"
TICK_COLUMNS = (
    "campaign",
    "step",
    "queued",
    "enrolled",
    "exited",
    "deferred",
    "completed",
    "promotions_queued",
)


def tick_table(result: TickResult) -> list[dict[str, Any]]:
    """One row per campaign and step (messages queued), then one total row per campaign."""
    rows: list[dict[str, Any]] = []
    for name in sorted(result.campaigns):
        stats = result.campaigns[name]
        for step in sorted(stats.by_step):
            rows.append(
                dict.fromkeys(TICK_COLUMNS)
                | {"campaign": name, "step": step, "queued": stats.by_step[step]}
            )
        rows.append(
            {
                "campaign": name,
                "step": ALL_STEPS,
                "queued": stats.queued,
                "enrolled": stats.enrolled,
                "exited": stats.exited,
                "deferred": stats.deferred,
                "completed": stats.completed,
                "promotions_queued": stats.queued_promotions,
            }
        )
    return rows


def tick_health(result: TickResult) -> str:
    """Markdown: sending and promotion outcomes, with every failure class and parked reason."""
    send, promo = result.send, result.promotions
    unknown = send.unknown + send.recovered_unknown
    trouble = send.failed + unknown + promo.parked
    lines = [
        f"# Tick {result.now.isoformat()}",
        "",
        "**Needs attention.**" if trouble else "Nothing failed, nothing parked, nothing unknown.",
        "",
        "| outcome | count |",
        "|---|---:|",
        f"| sent | {send.sent} |",
        f"| failed | {send.failed} |",
        f"| retry later | {send.retry} |",
        f"| unknown (in flight when the connection or sender died; never resent) | {unknown} |",
        f"| skipped (suppressed or exited) | {send.skipped} |",
        f"| promotions pushed | {promo.pushed} |",
        f"| promotions to retry | {promo.retry} |",
        f"| promotions parked | {promo.parked} |",
        f"| leads scored | {result.scored} |",
    ]
    if send.errors:
        lines += ["", "## Delivery errors", "", "| class | count |", "|---|---:|"]
        lines += [f"| {_cell(k)} | {n} |" for k, n in sorted(send.errors.items())]
    if promo.errors:
        lines += ["", "## Promotion errors", ""]
        lines += [f"- {_cell(e)}" for e in _counted(promo.errors)]
    if result.stage_moves:
        lines += ["", "## Stage moves", "", "| stage | leads |", "|---|---:|"]
        lines += [f"| {_cell(k)} | {n} |" for k, n in sorted(result.stage_moves.items())]
    return "\n".join(lines) + "\n"


def funnel_markdown(funnels: Iterable[CampaignFunnel], title: str = "Campaign funnel") -> str:
    """Markdown table of each campaign's funnel, with rates against the enrolled count."""
    lines = [
        f"# {title}",
        "",
        "| campaign | enrolled | sent | opened | clicked | replied | MQL | promoted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in funnels:

        def pct(n: int, f: CampaignFunnel = f) -> str:
            return f"{n} ({100 * n / f.enrolled:.0f}%)" if f.enrolled else str(n)

        lines.append(
            f"| {_cell(f.campaign)} | {f.enrolled} | {f.sent} | {pct(f.opened)} | "
            f"{pct(f.clicked)} | {pct(f.replied)} | {pct(f.mql)} | {pct(f.promoted)} |"
        )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def _counted(items: list[str], limit: int = 20) -> list[str]:
    """Distinct messages with their counts, most frequent first (parked reasons repeat)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out = [f"{n} x {text}" for text, n in ranked[:limit]]
    if len(ranked) > limit:
        out.append(f"... and {len(ranked) - limit} more distinct errors")
    return out


def publish_tick(result: TickResult) -> None:
    """The per-campaign-and-step table and the health summary of one tick."""
    create_table_artifact(
        tick_table(result),
        key=TICK_TABLE,
        description=f"Tick at {result.now.isoformat()}: counts per campaign and step",
    )
    create_markdown_artifact(
        tick_health(result),
        key=TICK_HEALTH,
        description="Sent, failed, unknown and parked in this tick",
    )


class SendProgress:
    """A progress artifact for a long send, updated once per batch (never per message)."""

    def __init__(self, due: int, description: str) -> None:
        self.due = due
        self.done = 0
        self.artifact = cast(
            UUID, create_progress_artifact(0.0, key=TICK_PROGRESS, description=description)
        )

    def batch(self, claimed: int) -> None:
        """Account for one more batch."""
        self.done += claimed
        update_progress_artifact(self.artifact, min(100.0, 100.0 * self.done / max(1, self.due)))

    def finish(self) -> None:
        """Mark the send complete (other workers may have taken part of the due rows)."""
        update_progress_artifact(self.artifact, 100.0)
