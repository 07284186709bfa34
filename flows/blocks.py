"""Prefect blocks for nurture's credentials: ``prefect block register -m flows.blocks``.

Registering this module registers :class:`NurtureSmtp` and every CRM connector's blocks
(``connectors/<crm>/blocks.py``), so one command makes them all appear in the Prefect UI.
Secrets are ``SecretStr`` fields: the UI and the API show them masked, and reprs and logs
never contain them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from nurture.outbox.smtp_transport import SmtpConfig, SmtpSender

__all__ = ["NurtureSmtp", "connector_blocks", "smtp_settings"]


class NurtureSmtp(Block):
    """The SMTP server nurture sends through, and the From address it sends as.

    Example:
        ``NurtureSmtp(url="smtp+starttls://user:pass@smtp.example.com:587").save("smtp")``,
        then run a flow with ``smtp_block="smtp"``.
    """

    _block_type_name = "Nurture SMTP"
    _block_type_slug = "nurture-smtp"
    _description = "SMTP server URL (with credentials) and From address for nurture's mail."

    url: SecretStr = Field(
        description="smtp://user:pass@host:port, smtp+starttls://... or smtps://...",
    )
    from_address: str | None = Field(
        default=None, description="From header; NURTURE_FROM when empty."
    )
    connections: int = Field(default=4, ge=1, le=64, description="Parallel SMTP connections.")

    def config(self) -> SmtpConfig:
        """The parsed server settings (raises ValueError naming the bad part, password hidden)."""
        return SmtpConfig.from_url(self.url)

    def sender(self) -> SmtpSender:
        """An :class:`SmtpSender` for this server; close it (or use ``with``) when done."""
        return SmtpSender(self.config(), connections=self.connections)


def smtp_settings(block_name: str | None) -> tuple[SecretStr | None, str | None]:
    """The SMTP URL and From address saved in block ``block_name`` (None, None: settings)."""
    if not block_name:
        return None, None
    block = NurtureSmtp.load(block_name)
    if inspect.isawaitable(block):  # load() is sync here; the guard keeps mypy honest
        raise TypeError("NurtureSmtp.load returned an awaitable in a sync context")
    return block.url, block.from_address


def connector_blocks() -> dict[str, type[Block]]:
    """The Block classes each connector package declares in its ``blocks`` module."""
    found: dict[str, type[Block]] = {}
    for info in pkgutil.iter_modules(connectors.__path__):
        if not info.ispkg:
            continue
        name = f"connectors.{info.name}.blocks"
        if importlib.util.find_spec(name) is None:
            continue
        module: Any = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, Block)
                and value is not Block
                and value.__module__ == name
            ):
                found[attr] = value
    return found


# `prefect block register -m flows.blocks` registers the Block classes it finds in this
# module's namespace, so the connectors' blocks are exposed here too.
globals().update(connector_blocks())
