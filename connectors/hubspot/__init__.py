"""HubSpot CRM v3: batch upsert contacts by email, optional deals, search for pull-back."""

from nurture.connectors.hubspot.connector import HubSpotClient, HubSpotConnector

__all__ = ["HubSpotClient", "HubSpotConnector"]
