"""HubSpot credentials as a Prefect Block (deployments); the CLI reads the environment."""

from __future__ import annotations

from typing import Any

from nurture.connectors.hubspot import settings
from nurture.connectors.hubspot.connector import HubSpotConnector
from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class HubSpotCredentials(Block):
    """A HubSpot private-app or OAuth token, and where to send calls."""

    _block_type_name = "HubSpot Credentials"

    token: SecretStr = Field(description="Private-app or OAuth access token.")
    base_url: str = Field(default=settings.BASE_URL, description="API root (sandbox, proxy).")

    def get_connector(self, **options: Any) -> HubSpotConnector:
        """A connector authenticated with these credentials."""
        return HubSpotConnector(token=self.token, base_url=self.base_url, **options)
