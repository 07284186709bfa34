"""Webhook: POST promoted leads as HMAC-signed JSON to any URL."""

from nurture.connectors.webhook.connector import WebhookConnector, idempotency_key, sign, verify

__all__ = ["WebhookConnector", "idempotency_key", "sign", "verify"]
