"""Prefect blocks hold credentials as SecretStr and open connectors that never show them."""

from __future__ import annotations

from nurture.connectors.hubspot.blocks import HubSpotCredentials
from nurture.connectors.pipedrive.blocks import PipedriveCredentials
from nurture.connectors.salesforce.blocks import SalesforceCredentials
from nurture.connectors.webhook.blocks import WebhookCredentials


def test_blocks_open_connectors_without_leaking_secrets() -> None:
    blocks = [
        HubSpotCredentials(token="hs-SECRET", base_url="http://127.0.0.1:9"),
        PipedriveCredentials(token="pd-SECRET", base_url="http://127.0.0.1:9"),
        SalesforceCredentials(client_id="app", client_secret="sf-SECRET",
                              login_url="http://127.0.0.1:9"),
        WebhookCredentials(url="http://127.0.0.1:9/hook", secret="wh-SECRET"),
    ]  # fmt: skip
    names = []
    for block in blocks:
        assert "SECRET" not in repr(block) and "SECRET" not in str(block.model_dump())
        conn = block.get_connector()
        assert "SECRET" not in repr(conn)
        names.append(conn.name)
        conn.close()
    assert names == ["hubspot", "pipedrive", "salesforce", "webhook"]
