"""Webhook connector constants."""

from __future__ import annotations

BATCH_SIZE = 100
SIGNATURE_HEADER = "X-Nurture-Signature"  # "t=<unix seconds>,v1=<hex HMAC-SHA256>"
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT = "lead.promoted"
