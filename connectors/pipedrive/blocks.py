"""Pipedrive credentials as a Prefect Block (deployments); the CLI reads the environment."""

from __future__ import annotations

from typing import Any

from nurture.connectors.pipedrive import settings
from nurture.connectors.pipedrive.connector import PipedriveConnector
from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class PipedriveCredentials(Block):
    """A Pipedrive API token and the company's base URL."""

    _block_type_name = "Pipedrive Credentials"

    token: SecretStr = Field(description="Personal API token.")
    base_url: str = Field(default=settings.BASE_URL, description="https://{company}.pipedrive.com")

    def get_connector(self, **options: Any) -> PipedriveConnector:
        """A connector authenticated with this token."""
        return PipedriveConnector(token=self.token, base_url=self.base_url, **options)
