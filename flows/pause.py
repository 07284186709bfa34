"""The ``pause_campaign`` flow: the emergency stop (and its release) from the Prefect UI."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from nurture.flows.runtime import engine_for, parse_now
from nurture.journey.pauses import pause, resume
from nurture.store.db import session_scope

PAUSE_ARTIFACT = "campaign-pause"


@flow(name="pause_campaign", timeout_seconds=300)
def pause_campaign(
    campaign: str,
    reason: str = "",
    action: Literal["pause", "resume"] = "pause",
    operator: str | None = None,
    now: str | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Pause (or resume) one campaign at once: the claim stops taking its queued mail.

    Args:
        campaign: The campaign's name.
        reason: Why it is paused (required to pause; shown by ``campaigns list``).
        action: ``pause`` or ``resume``.
        operator: Who did it, stored with the pause.
        now: ISO 8601 instant (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).

    Raises:
        NurtureError: an unknown campaign, or a pause without a reason.
    """
    at = parse_now(now)
    with session_scope(engine_for(database_url)) as session:
        if action == "pause":
            info, new = pause(session, campaign, reason, at, by=operator)
            out: dict[str, Any] = {"paused": True, "new": new, **info.as_json()}
            text = f"**{campaign}** paused at {info.paused_at.isoformat()}: {info.reason}"
        else:
            ended = resume(session, campaign, at, by=operator)
            out = {"paused": False, "resumed": ended is not None, "campaign": campaign}
            text = (
                f"**{campaign}** resumed at {at.isoformat()}"
                if ended
                else f"**{campaign}** was not paused"
            )
    create_markdown_artifact(text.replace("|", "\\|"), key=PAUSE_ARTIFACT)
    get_run_logger().info("%s: %s", action, out)
    return out
