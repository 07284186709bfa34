"""The webhook connector: POST promoted leads as signed JSON to any URL.

The body is ``{"event": "lead.promoted", "leads": [...]}``; every lead carries its own
``idempotency_key`` (``lead-<id>-<stage>``) so a receiver can drop the copies a retry or a
re-run after a crash sends, and the request carries an ``Idempotency-Key`` header for the
batch. ``X-Nurture-Signature: t=<unix>,v1=<hex>`` is HMAC-SHA256 over ``"<t>.<body>"``
with the shared secret, as Stripe does it, so receivers can reject replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from nurture.connectors.base import HttpClient, env_setting, secret_value, split_invalid_emails
from nurture.connectors.webhook import settings
from pydantic import SecretStr

from nurture.crm import FatalConnectorError, PromotionItem, PushResult, StageChange
from nurture.crm.mapping import FieldRule, apply_mapping, load_mapping


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), header)


def idempotency_key(item: PromotionItem) -> str:
    """Stable per promotion: the same lead promoted to the same stage."""
    return f"lead-{item.lead_id}-{item.stage}"


class WebhookConnector:
    """POSTs promoted leads to ``url`` (``NURTURE_WEBHOOK_URL``), signed with ``secret``.

    Args:
        url: the receiver's URL.
        secret: the HMAC key (``NURTURE_WEBHOOK_SECRET``).
        batch_size: leads per request (``NURTURE_WEBHOOK_BATCH_SIZE``, default 100).
        mapping: field rules or a YAML file with a ``webhook`` section; by default every
            lead field is sent under its own name.
        clock: seconds since the epoch for the signature timestamp (tests inject one).
        client: options for :class:`~connectors.base.HttpClient`.
    """

    name = "webhook"

    def __init__(
        self,
        url: str | None = None,
        secret: SecretStr | str | None = None,
        batch_size: int | None = None,
        mapping: list[FieldRule] | Path | str | None = None,
        clock: Callable[[], float] = time.time,
        **client: Any,
    ) -> None:
        url = url or env_setting(self.name, "url")
        secret = secret or env_setting(self.name, "secret")
        if not url or not secret:
            raise FatalConnectorError("webhook: set NURTURE_WEBHOOK_URL and NURTURE_WEBHOOK_SECRET")
        self.url = url
        self._secret = SecretStr(secret_value(secret))
        self.batch_size = int(batch_size or env_setting(self.name, "batch_size", "100") or 100)
        self.clock = clock
        self.rules: list[FieldRule] | None = None
        source = mapping or env_setting("crm", "mapping")
        if isinstance(source, list):
            self.rules = source
        elif source:
            self.rules = load_mapping(Path(source), self.name)
        self.client = HttpClient("", **client)

    def __repr__(self) -> str:
        return f"WebhookConnector(url={self.url!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    def payload(self, item: PromotionItem) -> dict[str, Any]:
        """One lead as the receiver gets it."""
        if self.rules is not None:
            fields = apply_mapping(item, self.rules)
        else:
            fields = {
                "email": item.email,
                "first_name": item.first_name,
                "last_name": item.last_name,
                "company": item.company,
                "source": item.source,
                "behaviour_score": item.behaviour_score,
                "fit_score": item.fit_score,
                "grade": item.grade,
                "attributes": dict(item.attributes),
            }
        return {
            "idempotency_key": idempotency_key(item),
            "lead_id": item.lead_id,
            "stage": item.stage,
            "external_id": item.external_id,
            "fields": fields,
        }

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        """POST the valid items in batches; a 2xx accepts the whole batch."""
        good, results = split_invalid_emails(items)
        for start in range(0, len(good), self.batch_size):
            batch = good[start : start + self.batch_size]
            keys = [idempotency_key(i) for i in batch]
            body = json.dumps(
                {"event": settings.EVENT, "leads": [self.payload(i) for i in batch]},
                separators=(",", ":"),
                default=str,
            ).encode()
            batch_key = hashlib.sha256("\n".join(keys).encode()).hexdigest()
            self.client.request(
                "POST",
                self.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    settings.IDEMPOTENCY_HEADER: batch_key,
                    # Signed per attempt would need the hook inside the retry; a stale
                    # timestamp within the receiver's tolerance is fine for retries.
                    settings.SIGNATURE_HEADER: sign(
                        self._secret.get_secret_value(), int(self.clock()), body
                    ),
                },
            )
            for item in batch:
                results[item.promotion_id] = PushResult(
                    item.promotion_id,
                    True,
                    external_id=item.external_id or idempotency_key(item),
                    object_type="webhook",
                )
        return [results[i.promotion_id] for i in items]

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        """A webhook only pushes: there is nothing to pull."""
        return []
