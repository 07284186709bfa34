"""A webhook receiver that verifies signatures and drops copies by idempotency key."""

from __future__ import annotations

from typing import Any

from nurture.connectors.webhook import verify
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.base import FakeCrm, json_response


class FakeWebhookReceiver(FakeCrm):
    """Keeps one record per idempotency key; rejects bad signatures with 401."""

    def __init__(self, secret: str, now: float) -> None:
        super().__init__()
        self.secret = secret
        self.now = now  # the receiver's clock, in unix seconds
        self.records: dict[str, dict[str, Any]] = {}
        self.deliveries = 0  # accepted copies, duplicates included
        self.rejected = 0

    async def hook(self, request: Request) -> Response:
        """POST /hooks/nurture."""
        self.count(request)
        await self.maybe_hang()
        body = await request.body()
        if not verify(self.secret, request.headers.get("X-Nurture-Signature", ""), body, self.now):
            self.rejected += 1
            return json_response({"error": "bad signature"}, 401)
        with self.lock:
            kind = self.faults.draw()
        if kind == "429":
            return json_response({"error": "slow down"}, 429, {"Retry-After": "4"})
        if kind == "5xx-before":
            return json_response({"error": "down"}, 503)
        payload = await request.json()
        with self.lock:
            for lead in payload["leads"]:
                self.deliveries += 1
                self.records.setdefault(lead["idempotency_key"], lead)
        if kind == "5xx-after":
            return json_response({"error": "gateway"}, 502)
        return json_response({"accepted": len(payload["leads"])}, 202)

    def app(self) -> Starlette:
        """One route."""
        return Starlette(routes=[Route("/hooks/nurture", self.hook, methods=["POST"])])
