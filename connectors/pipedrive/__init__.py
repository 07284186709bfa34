"""Pipedrive: v2 persons matched by email once, v2 deals, token-based rate limits."""

from nurture.connectors.pipedrive.connector import PipedriveClient, PipedriveConnector

__all__ = ["PipedriveClient", "PipedriveConnector"]
