"""Webhook credentials as a Prefect Block (deployments); the CLI reads the environment."""

from __future__ import annotations

from typing import Any

from nurture.connectors.webhook.connector import WebhookConnector
from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class WebhookCredentials(Block):
    """Where to POST promoted leads and the HMAC secret that signs them."""

    _block_type_name = "Nurture Webhook"

    url: str = Field(description="The receiver's URL.")
    secret: SecretStr = Field(description="Shared HMAC-SHA256 signing secret.")

    def get_connector(self, **options: Any) -> WebhookConnector:
        """A connector posting to this URL with this secret."""
        return WebhookConnector(url=self.url, secret=self.secret, **options)
