"""Salesforce credentials as a Prefect Block (deployments); the CLI reads the environment."""

from __future__ import annotations

from typing import Any

from nurture.connectors.salesforce import settings
from nurture.connectors.salesforce.connector import SalesforceConnector
from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class SalesforceCredentials(Block):
    """A connected app's client credentials and the org's login URL."""

    _block_type_name = "Salesforce Credentials"

    client_id: str = Field(description="Connected app consumer key.")
    client_secret: SecretStr = Field(description="Connected app consumer secret.")
    login_url: str = Field(default=settings.LOGIN_URL, description="Login or My Domain URL.")

    def get_connector(self, **options: Any) -> SalesforceConnector:
        """A connector that authenticates with these credentials."""
        return SalesforceConnector(
            client_id=self.client_id,
            client_secret=self.client_secret,
            login_url=self.login_url,
            **options,
        )
