"""Sales alerts through Prefect notification blocks (Slack, Microsoft Teams, email, ...).

An alert rule's ``to`` names the channel. In a deployment that is a saved notification
block as ``prefect block ls`` shows it, ``<block type slug>/<name>``: ``slack-webhook/sales``,
``ms-teams-webhook/cs``, ``custom-webhook/crm-hook``, an email block. ``NURTURE_ALERT_WEBHOOKS``,
when set, takes precedence and posts JSON to the URLs it names, without Prefect.
"""

from __future__ import annotations

from typing import Any

from nurture.config import get_settings
from nurture.crm.alerts import AlertError, AlertMessage, Notifier, notifier_from_settings


class BlockNotifier:
    """Delivers each alert with the ``notify`` of the notification block named ``channel``."""

    def __init__(self) -> None:
        self._blocks: dict[str, Any] = {}

    def _block(self, channel: str) -> Any:
        if channel not in self._blocks:
            if "/" not in channel:
                raise AlertError(
                    f"channel {channel!r}: expected a notification block as "
                    "<block type slug>/<name>, e.g. slack-webhook/sales",
                    retryable=False,
                )
            from prefect.blocks.abstract import NotificationBlock
            from prefect.blocks.core import Block

            try:
                block = Block.load(channel, _sync=True)  # type: ignore[call-arg]
            except ValueError as exc:  # no such block document
                raise AlertError(
                    f"no notification block {channel!r}: {exc}", retryable=False
                ) from None
            if not isinstance(block, NotificationBlock):
                raise AlertError(
                    f"block {channel!r} is a {type(block).__name__}, not a notification block",
                    retryable=False,
                )
            self._blocks[channel] = block
        return self._blocks[channel]

    def send(self, channel: str, message: AlertMessage) -> None:
        """Notify through the block; any failure of the call is worth a retry later."""
        block = self._block(channel)
        try:
            block.notify(message.text, subject=message.title, _sync=True)
        except Exception as exc:  # the block's transport (apprise, SMTP, HTTP) failed
            raise AlertError(f"{type(exc).__name__}: {exc}", retryable=True) from exc


def notifier() -> Notifier:
    """The webhooks of ``NURTURE_ALERT_WEBHOOKS`` when set, else Prefect notification blocks."""
    hooks = get_settings().alert_webhooks
    direct = notifier_from_settings(hooks.get_secret_value() if hooks else None)
    return direct if direct is not None else BlockNotifier()
