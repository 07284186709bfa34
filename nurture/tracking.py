"""The tracking service: open pixel, click redirect, unsubscribe, bounce webhook, event intake.

An ASGI app (Starlette) made by :func:`create_app` and run by ``nurture serve``. Every
engagement it sees goes through :func:`nurture.events.record_events` in one short
transaction per request, on a worker thread so the event loop never blocks on the database.

Security, in short:

- Open, click and unsubscribe URLs carry tokens from :mod:`nurture.tokens`. A bad token
  gets a 404 and records nothing. A click token holds the exact target URL under its MAC,
  so the redirect can only go where the rendered email pointed (no open redirect).
- ``GET /u/...`` never unsubscribes (mail scanners prefetch links); it shows a page whose
  form POSTs back. ``POST /u/...`` (the form, or RFC 8058 one-click) unsubscribes.
- The bounce webhook is signed Stripe-style (``X-Nurture-Signature: t=...,v1=...``) and
  refuses timestamps more than five minutes away from the injected clock; event ids make
  re-deliveries idempotent.
- ``POST /events`` needs ``Authorization: Bearer <key>``. A request with any invalid item
  is refused whole with 422 and records nothing, so a client can fix and resend the same
  batch; the ``id`` of each event makes that resend idempotent.
- Bodies are read in chunks and refused with 413 as soon as they pass ``max_body``.
- Everything shown in HTML is escaped; pages carry a CSP that allows no script at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import Engine, select, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from nurture.db import session_scope
from nurture.events import (
    EventError,
    EventIn,
    RecordResult,
    check_email,
    parse_datetime,
    parse_event,
    record_events,
)
from nurture.models import Delivery, Lead, Suppression
from nurture.tokens import Secrets, TokenError, verify_click, verify_open, verify_unsubscribe

__all__ = ["REPLAY_WINDOW", "SIGNATURE_HEADER", "create_app", "webhook_signature"]

SIGNATURE_HEADER = "X-Nurture-Signature"
REPLAY_WINDOW = timedelta(minutes=5)
MAX_ITEMS = 1000

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
_STYLE = (
    "body{margin:0;background:#f4f5f7;color:#1f2328;"
    "font:16px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif}"
    "main{max-width:34rem;margin:4rem auto;padding:2rem 2.25rem;background:#fff;"
    "border-radius:10px;box-shadow:0 1px 4px rgba(0,0,0,.08)}"
    "h1{font-size:1.35rem;margin:0 0 1rem}p{margin:.75rem 0}"
    "fieldset{border:1px solid #d0d7de;border-radius:8px;margin:1.25rem 0;padding:.75rem 1rem}"
    "legend{padding:0 .35rem;color:#57606a;font-size:.9rem}"
    "button{font:inherit;padding:.6rem 1.3rem;border:0;border-radius:6px;"
    "background:#0969da;color:#fff;cursor:pointer}button:hover{background:#0550ae}"
    ".muted{color:#57606a;font-size:.9rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
PAGE_HEADERS = {
    **NO_CACHE,
    # No script can run, nothing loads from elsewhere, the form posts only to us.
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
# Characters left as they are in a redirect Location: every reserved and unreserved URI
# character and '%', so an already-valid URL goes out byte for byte.
_URI_SAFE = ":/?#[]@!$&'()*+,;=-._~%"


def webhook_signature(body: bytes, secret: str, timestamp: int) -> str:
    """The ``X-Nurture-Signature`` header value for a webhook body (for senders and tests)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _check_webhook_signature(header: str | None, body: bytes, secret: str, now: datetime) -> None:
    if not header:
        raise HTTPException(401, f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise HTTPException(401, f"malformed {SIGNATURE_HEADER} header")
    expected = webhook_signature(body, secret, timestamp).rpartition("v1=")[2]
    # Compare against every candidate without stopping early (several v1 allow key rotation).
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise HTTPException(401, "bad signature")
    if abs(now.timestamp() - timestamp) > REPLAY_WINDOW.total_seconds():
        raise HTTPException(401, "signature timestamp outside the 5 minute window")


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body in chunks, refusing with 413 as soon as it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "bad Content-Length")
        if int(declared) > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise HTTPException(400, "body JSON is nested too deeply") from exc


def mask_email(email: str) -> str:
    """``jane.doe@example.com`` -> ``j***@example.com``: enough to recognise, not to harvest."""
    local, at, domain = email.partition("@")
    return f"{local[:1]}***{at}{domain}"


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
    return HTMLResponse(doc, status_code=status, headers=PAGE_HEADERS)


def _invalid_link_page() -> HTMLResponse:
    return _page(
        "Link not valid",
        "<h1>This link is not valid</h1><p>It may have been copied incompletely. "
        "Please use the unsubscribe link in the email you received.</p>",
        status=404,
    )


class _Service:
    """The request handlers, closed over the engine, secrets and clock."""

    def __init__(
        self,
        engine: Engine,
        secret: Secrets,
        clock: Callable[[], datetime],
        webhook_secret: str | None,
        ingest_keys: Collection[str],
        max_body: int,
    ) -> None:
        keys = (secret,) if isinstance(secret, str) else tuple(secret)
        if not keys or not all(keys):
            raise ValueError("the tracking secret is empty")
        self.engine = engine
        self.secret = keys
        self.clock = clock
        self.webhook_secret = webhook_secret or None
        self.ingest_keys = tuple(k.encode() for k in ingest_keys if k)
        self.max_body = max_body

    # -- database work, run on a worker thread --------------------------------------

    def _record_sync(self, events: Sequence[EventIn]) -> RecordResult:
        with session_scope(self.engine) as session:
            return record_events(session, events, now=self.clock())

    async def record(self, events: Sequence[EventIn]) -> RecordResult:
        """Record events in one short transaction off the event loop."""
        return await run_in_threadpool(self._record_sync, events)

    def _lead_sync(self, lead_id: int) -> tuple[str, str | None, bool] | None:
        with session_scope(self.engine) as session:
            row = session.execute(
                select(Lead.email, Lead.first_name, Suppression.id)
                .outerjoin(Suppression, Suppression.email == Lead.email)
                .where(Lead.id == lead_id)
            ).first()
        if row is None:
            return None
        return row[0], row[1], row[2] is not None

    # -- endpoints --------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        def ping() -> None:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(ping)
        except Exception as exc:  # any database failure means "not healthy"
            return JSONResponse({"status": "error", "error": type(exc).__name__}, 503)
        return JSONResponse({"status": "ok"})

    async def open_pixel(self, request: Request) -> Response:
        try:
            delivery_id = verify_open(request.path_params["token"], self.secret)
        except TokenError:
            return Response("not found", 404, media_type="text/plain")
        # HEAD is what link checkers send; only a real fetch counts as an open.
        if request.method == "GET":
            agent = request.headers.get("user-agent", "")[:255]
            payload = {"user_agent": agent} if agent else {}
            await self.record(
                [EventIn("opened", self.clock(), delivery_id=delivery_id, payload=payload)]
            )
        return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)

    async def click(self, request: Request) -> Response:
        try:
            delivery_id, url = verify_click(request.path_params["token"], self.secret)
        except TokenError:
            return Response("not found", 404, media_type="text/plain")
        if request.method == "GET":
            await self.record([EventIn("clicked", self.clock(), delivery_id=delivery_id, url=url)])
        location = quote(url, safe=_URI_SAFE)
        return Response(
            status_code=302,
            headers={
                "Location": location,
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def unsubscribe(self, request: Request) -> Response:
        try:
            delivery_id, lead_id = verify_unsubscribe(request.path_params["token"], self.secret)
        except TokenError:
            return _invalid_link_page()
        if request.method == "POST":
            body = await _read_body(request, self.max_body)
        lead = await run_in_threadpool(self._lead_sync, lead_id)
        if lead is None:
            return _invalid_link_page()
        email, first_name, suppressed = lead
        masked = html.escape(mask_email(email))
        hello = f"<p>Hi {html.escape(first_name)},</p>" if first_name else ""

        if request.method != "POST":
            if suppressed:
                return _page(
                    "Unsubscribed",
                    f"<h1>You are unsubscribed</h1>{hello}<p><strong>{masked}</strong> "
                    "gets no marketing email from us.</p>",
                )
            return _page(
                "Unsubscribe",
                f"<h1>Unsubscribe</h1>{hello}"
                f"<p>You are about to unsubscribe <strong>{masked}</strong>.</p>"
                '<form method="post">'
                "<fieldset><legend>Your email preferences</legend><label>"
                '<input type="radio" name="scope" value="all" checked> '
                "Unsubscribe from all marketing email</label></fieldset>"
                '<button type="submit">Confirm unsubscribe</button></form>'
                '<p class="muted">You will still get messages you asked for, such as '
                "receipts and password resets.</p>",
            )

        # RFC 8058 one-click sends "List-Unsubscribe=One-Click" (form-encoded or multipart);
        # any POST here is a deliberate unsubscribe, so the body only labels the source.
        one_click = b"List-Unsubscribe" in body and b"One-Click" in body
        source = "one-click" if one_click else "unsubscribe-page"
        await self.record(
            [
                EventIn(
                    "unsubscribed",
                    self.clock(),
                    lead_id=lead_id,
                    delivery_id=delivery_id,
                    external_id=f"unsubscribe:{delivery_id}:{lead_id}",
                    payload={"source": source},
                )
            ]
        )
        return _page(
            "Unsubscribed",
            f"<h1>You are unsubscribed</h1>{hello}<p><strong>{masked}</strong> will get no "
            "more marketing email from us.</p>"
            '<p class="muted">Unsubscribed by mistake? Reply to any of our emails and we '
            "will put it right.</p>",
        )

    async def bounces(self, request: Request) -> Response:
        if self.webhook_secret is None:
            raise HTTPException(503, "webhook secret not configured")
        body = await _read_body(request, self.max_body)
        now = self.clock()
        _check_webhook_signature(
            request.headers.get(SIGNATURE_HEADER), body, self.webhook_secret, now
        )
        parsed = _parse_events(body, lambda item: _parse_bounce(item, now))
        if isinstance(parsed, Response):
            return parsed
        result = await run_in_threadpool(self._record_bounces_sync, parsed)
        return JSONResponse(_result_doc(result))

    def _record_bounces_sync(self, items: Sequence[_Bounce]) -> RecordResult:
        with session_scope(self.engine) as session:
            wanted: set[str] = set()
            for b in items:
                if b.message_id:
                    core = b.message_id.strip().strip("<>")
                    wanted |= {core, f"<{core}>"}
            by_message: dict[str, int] = {}
            if wanted:
                for delivery_id, message_id in session.execute(
                    select(Delivery.id, Delivery.message_id).where(Delivery.message_id.in_(wanted))
                ):
                    by_message[message_id.strip("<>")] = delivery_id
            events = [
                EventIn(
                    b.type,
                    b.occurred_at,
                    email=b.email,
                    delivery_id=by_message.get((b.message_id or "").strip().strip("<>")),
                    external_id=b.external_id,
                    payload=b.payload,
                )
                for b in items
            ]
            # An unknown Message-ID and no email leaves nothing to tie the bounce to.
            known = [e for e in events if e.email or e.delivery_id]
            result = record_events(session, known, now=self.clock())
            return result + RecordResult(unknown_lead=len(events) - len(known))

    async def ingest(self, request: Request) -> Response:
        if not self._authorised(request.headers.get("authorization", "")):
            return JSONResponse(
                {"error": "a valid 'Authorization: Bearer <key>' header is required"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        body = await _read_body(request, self.max_body)
        events = _parse_events(body, parse_event)
        if isinstance(events, Response):
            return events
        result = await self.record(events)
        return JSONResponse(_result_doc(result))

    def _authorised(self, header: str) -> bool:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        given = key.strip().encode()
        ok = False
        for known in self.ingest_keys:
            ok |= hmac.compare_digest(given, known)
        return ok


@dataclass(frozen=True, slots=True)
class _Bounce:
    """One validated webhook item."""

    type: str
    occurred_at: datetime
    email: str | None
    message_id: str | None
    external_id: str | None
    payload: dict[str, Any]


_BOUNCE_TYPES = {"bounce": "bounced", "complaint": "complained"}
_BOUNCE_FIELDS = ("type", "email", "message_id", "hard", "id", "timestamp", "reason")


def _parse_bounce(item: object, now: datetime) -> _Bounce:
    if not isinstance(item, Mapping):
        raise EventError("event", "must be a JSON object")
    unknown = sorted(str(k) for k in item if k not in _BOUNCE_FIELDS)
    if unknown:
        raise EventError(unknown[0], f"unknown field (expected: {', '.join(_BOUNCE_FIELDS)})")
    kind = item.get("type")
    if kind not in _BOUNCE_TYPES:
        raise EventError("type", f"must be 'bounce' or 'complaint', got {kind!r}")
    email, message_id = item.get("email"), item.get("message_id")
    if email is None and message_id is None:
        raise EventError("email", "give email or message_id")
    if email is not None:
        email = check_email(email)
    if message_id is not None and (not isinstance(message_id, str) or len(message_id) > 255):
        raise EventError("message_id", "must be a string of at most 255 characters")
    hard = item.get("hard", False)
    if not isinstance(hard, bool):
        raise EventError("hard", f"must be true or false, got {hard!r}")
    ident = item.get("id")
    if ident is not None and (not isinstance(ident, str) or not 1 <= len(ident) <= 200):
        raise EventError("id", "must be a string of 1 to 200 characters")
    reason = item.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
        raise EventError("reason", "must be a string of at most 1000 characters")
    occurred_at = _parse_timestamp(item.get("timestamp"), now)
    payload: dict[str, Any] = {"hard": hard, "source": "webhook"}
    if message_id:
        payload["message_id"] = message_id
    if reason:
        payload["reason"] = reason
    return _Bounce(
        _BOUNCE_TYPES[kind],
        occurred_at,
        email,
        message_id,
        # Namespaced so an ESP's ids cannot collide with ids from other sources.
        f"webhook:{ident}" if ident else None,
        payload,
    )


def _parse_timestamp(value: object, now: datetime) -> datetime:
    if value is None:
        return now
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise EventError("timestamp", f"{value!r} is out of range") from exc
    if isinstance(value, str):
        return parse_datetime(value, "timestamp")
    raise EventError("timestamp", f"must be Unix seconds or ISO 8601, got {value!r}")


T = TypeVar("T")


def _parse_events(body: bytes, parse: Callable[[object], T]) -> list[T] | Response:
    """``{"events": [...]}`` parsed item by item: all of them, or a 422/413 naming each bad
    item (nothing from a request with a bad item is recorded)."""
    doc = _json_body(body)
    items = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return _unprocessable([{"index": None, "field": "events", "message": "required list"}])
    if len(items) > MAX_ITEMS:
        return _too_many(len(items))
    errors: list[dict[str, Any]] = []
    parsed: list[T] = []
    for index, item in enumerate(items):
        try:
            parsed.append(parse(item))
        except EventError as exc:
            errors.append({"index": index, "field": exc.field, "message": exc.message})
    return _unprocessable(errors) if errors else parsed


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"error": "invalid events; nothing was recorded", "errors": errors}, 422)


def _too_many(count: int) -> JSONResponse:
    return _unprocessable(
        [{"index": None, "field": "events", "message": f"{count} items; at most {MAX_ITEMS}"}]
    )


def _result_doc(result: RecordResult) -> dict[str, Any]:
    return {**result.as_dict(), "unknown_indices": list(result.unknown_indices)}


def create_app(
    engine: Engine,
    *,
    secret: Secrets,
    clock: Callable[[], datetime],
    webhook_secret: str | None,
    ingest_keys: Collection[str],
    max_body: int = 64_000,
) -> Starlette:
    """Build the tracking service.

    Args:
        engine: A migrated database engine.
        secret: The token key (``settings.secret_keys()``): one key, or several during a
            rotation, any of which verifies; the renderer signs with the first.
        clock: Returns the current aware UTC instant; the app never reads the wall clock.
        webhook_secret: Shared secret of the bounce webhook; ``None`` disables it (503).
        ingest_keys: Bearer keys accepted by ``POST /events``; empty refuses everything.
        max_body: Largest request body in bytes; larger ones get 413.

    Returns:
        The ASGI application.
    """
    svc = _Service(engine, secret, clock, webhook_secret, ingest_keys, max_body)
    routes = [
        Route("/healthz", svc.healthz, methods=["GET"]),
        Route("/o/{token}.gif", svc.open_pixel, methods=["GET"]),
        Route("/c/{token}", svc.click, methods=["GET"]),
        Route("/u/{token}", svc.unsubscribe, methods=["GET", "POST"]),
        Route("/webhooks/bounces", svc.bounces, methods=["POST"]),
        Route("/events", svc.ingest, methods=["POST"]),
    ]
    return Starlette(routes=routes)
