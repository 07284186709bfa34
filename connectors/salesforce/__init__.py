"""Salesforce REST: OAuth client credentials, composite Lead upsert by external id."""

from nurture.connectors.salesforce.connector import (
    SalesforceClient,
    SalesforceConnector,
    SessionExpired,
)

__all__ = ["SalesforceClient", "SalesforceConnector", "SessionExpired"]
