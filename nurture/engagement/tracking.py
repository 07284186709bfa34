"""The tracking service: open pixel, click redirect, unsubscribe, bounce webhook, event intake.

An ASGI app (Starlette) made by :func:`create_app` and run by ``nurture serve``.

The edge answers first and records durably (see :mod:`nurture.engagement.spool`): a click,
an open or an unsubscribe POST is answered from its verified token alone (no database), after one
``write()`` of the event to this process's spool file. A background writer drains the
spool into the database in batches through :func:`nurture.engagement.events.record_events`, exactly
once per request, and keeps retrying while the database is locked or down. A restart
(even after SIGKILL) replays what was not drained yet. Opens and clicks, HEAD requests
included, carry the request's ``user_agent``, ``ip``, ``method`` and ``prefetch`` flag in
their payload for the human/machine classification.

Security, in short:

- Open, click and unsubscribe URLs carry tokens from :mod:`nurture.message.tokens`. A bad token
  gets a 404 and records nothing. A click token holds the exact target URL under its MAC,
  so the redirect can only go where the rendered email pointed (no open redirect).
- ``GET /u/...`` never unsubscribes (mail scanners prefetch links); it shows a page whose
  form POSTs back. ``POST /u/...`` (the form, or RFC 8058 one-click) unsubscribes.
- The bounce webhook is signed Stripe-style (``X-Nurture-Signature: t=...,v1=...``) and
  refuses timestamps more than five minutes away from the injected clock. A malformed
  header gets 401. Each accepted signature is stored in ``webhook_receipts`` until its
  window closes, so the same signed request sent again gets 409 and records nothing, on
  any number of serve processes. Item ids make re-deliveries (freshly signed) idempotent.
- Batches (the webhook and ``POST /events``) are validated item by item: the valid items
  are recorded, the invalid ones are listed with index, field and reason (status 207);
  a batch with no valid item gets 422. Items that name no known lead are listed in
  ``unknown_indices``. These callers retry, so they are recorded in the request, and a
  database that is down gets 503 with ``Retry-After`` (never 500).
- ``POST /events`` needs ``Authorization: Bearer <key>``; the ``id`` of each event makes a
  resend idempotent.
- Bodies are read in chunks and refused with 413 as soon as they pass ``max_body``.
- Everything shown in HTML is escaped; pages carry a CSP that allows no script at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from sqlalchemy import Engine, Table, delete, select, text
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nurture.engagement.events import (
    EventError,
    EventIn,
    RecordResult,
    check_email,
    parse_datetime,
    parse_event,
    record_events,
)
from nurture.engagement.spool import Spool
from nurture.engagement.spool_recorder import RecorderProcess, is_operational
from nurture.engagement.web import (
    NO_CACHE,
    invalid_link_page,
    json_body,
    page,
    read_body,
    request_meta,
)
from nurture.message.tokens import (
    Secrets,
    TokenError,
    verify_click,
    verify_open,
    verify_unsubscribe,
)
from nurture.spec.consent import ConsentSpec
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Lead, Suppression, WebhookReceipt
from nurture.store.sql import insert_for

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "REPLAY_WINDOW",
    "SIGNATURE_HEADER",
    "create_app",
    "openapi_document",
    "webhook_signature",
]

SIGNATURE_HEADER = "X-Nurture-Signature"
REPLAY_WINDOW = timedelta(minutes=5)
MAX_ITEMS = 1000
# How long the unsubscribe page and /healthz wait for the database before answering without.
LOOKUP_TIMEOUT = 2.0
# How long a webhook or /events batch waits for a locked SQLite database before its 503.
BATCH_LOCK_WAIT = 3.0

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
HONEYPOT_HEADERS = {**NO_CACHE, "X-Robots-Tag": "noindex, nofollow"}
# Characters left as they are in a redirect Location: every reserved and unreserved URI
# character and '%', so an already-valid URL goes out byte for byte.
_URI_SAFE = ":/?#[]@!$&'()*+,;=-._~%"


def webhook_signature(body: bytes, secret: str, timestamp: int) -> str:
    """The ``X-Nurture-Signature`` header value for a webhook body (for senders and tests)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


_MAX_CANDIDATES = 8


def _check_webhook_signature(
    header: str | None, body: bytes, secret: str, now: datetime
) -> tuple[int, str]:
    """Verify the header; return its timestamp and the matching MAC (the request's identity).

    Anything malformed (non-ASCII digits, a huge timestamp, non-hex MACs, odd encodings)
    is a 401, like a wrong signature: the header is the sender's credential.
    """
    if not header:
        raise HTTPException(401, f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            # ASCII digits only (str.isdigit also accepts '١٢٣' and '²'), at most 12 of them.
            if not (value.isascii() and value.isdigit() and len(value) <= 12):
                raise HTTPException(401, f"malformed {SIGNATURE_HEADER} header")
            timestamp = int(value)
        elif key == "v1" and len(value) == 64 and value.isascii() and set(value) <= _HEX:
            candidates.append(value.lower())
    if timestamp is None or not candidates or len(candidates) > _MAX_CANDIDATES:
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
    return timestamp, expected


_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True)
class _Receipt:
    """A verified webhook signature, stored until its window closes (replay refusal)."""

    mac: str
    signed_at: datetime


def _bound_lock_wait(session: Session) -> None:
    """On SQLite, wait at most :data:`BATCH_LOCK_WAIT` for another writer's lock.

    A batch caller is answered 503 and retries; holding its request for the engine's
    30 s busy timeout helps nobody. (The pooled connection keeps the shorter wait, which
    suits the spool writer too: it retries on its own.)
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text(f"PRAGMA busy_timeout={int(BATCH_LOCK_WAIT * 1000)}"))


def _claim_receipt(session: Session, receipt: _Receipt, now: datetime) -> bool:
    """Store the receipt; ``False`` if it was already there (a replay). Expired ones go."""
    session.execute(delete(WebhookReceipt).where(WebhookReceipt.expires_at < now))
    table = WebhookReceipt.__table__
    assert isinstance(table, Table)
    stmt = (
        insert_for(session, table)
        .on_conflict_do_nothing(index_elements=["signature"])
        .returning(table.c.id)
    )
    row = {
        "signature": receipt.mac,
        "signed_at": receipt.signed_at,
        "expires_at": receipt.signed_at + REPLAY_WINDOW,
        "received_at": now,
    }
    return bool(session.execute(stmt, [row]).all())


def mask_email(email: str) -> str:
    """``jane.doe@example.com`` -> ``j***@example.com``: enough to recognise, not to harvest."""
    local, at, domain = email.partition("@")
    return f"{local[:1]}***{at}{domain}"


class _Service:
    """The request handlers, closed over the engine, secrets, clock and spool."""

    def __init__(
        self,
        engine: Engine,
        secret: Secrets,
        clock: Callable[[], datetime],
        webhook_secret: str | None,
        ingest_keys: Collection[str],
        max_body: int,
        spool: Spool,
    ) -> None:
        keys = (secret,) if isinstance(secret, str) else tuple(secret)
        if not keys or not all(keys):
            raise ValueError("the tracking secret is empty")
        self.engine = engine
        # The token keys live here and are used only by the verify calls below.
        self.secret = keys
        self.clock = clock
        self.webhook_secret = webhook_secret or None
        self.ingest_keys = tuple(k.encode() for k in ingest_keys if k)
        self.max_body = max_body
        self.spool = spool
        # With topics, the unsubscribe page is the preference centre
        # (nurture.engagement.preferences).
        self.consent: ConsentSpec | None = None
        # Reads for pages and health checks, apart from the spool writer's thread.
        self._lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nurture-lookup")

    # -- database reads, run on a worker thread -----------------------------------------

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

    async def _lead(self, lead_id: int) -> tuple[str, str | None, bool] | Exception | None:
        """The lead for the unsubscribe page, or the exception if the database cannot say
        within :data:`LOOKUP_TIMEOUT` (the page then degrades; it never waits 30 s)."""
        try:
            return await self._bounded(self._lead_sync, lead_id)
        except Exception as exc:  # locked, down, timed out: any of them means "not now"
            return exc

    async def _bounded(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn`` on the lookup threads, giving up after :data:`LOOKUP_TIMEOUT`.

        An executor future, unlike anyio's threadpool, can be abandoned on timeout (the
        thread finishes on its own), so a hung database cannot hold the request.
        """
        future = asyncio.get_running_loop().run_in_executor(self._lookups, fn, *args)
        return await asyncio.wait_for(future, LOOKUP_TIMEOUT)

    # -- endpoints --------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Database reachable, and the spool's counters."""

        def ping() -> None:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        spool = self.spool.stats()
        try:
            await self._bounded(ping)
        except Exception as exc:  # any database failure means "not healthy"
            doc = {"status": "error", "error": type(exc).__name__, "spool": spool}
            return JSONResponse(doc, 503)
        return JSONResponse({"status": "ok", "spool": spool})

    async def open_pixel(self, request: Request) -> Response:
        """The open pixel: answered from the token alone, the open spooled."""
        try:
            delivery_id = verify_open(request.path_params["token"], self.secret)
        except TokenError:
            return Response("not found", 404, media_type="text/plain")
        # A failed spool write (disk full) is counted and logged: the pixel still loads.
        self.spool.try_append(
            {
                "type": "opened",
                "at": self.clock().timestamp(),
                "delivery": delivery_id,
                "payload": request_meta(request),
            }
        )
        return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)

    async def click(self, request: Request) -> Response:
        """A tracked link: 302 to the signed URL, the click spooled."""
        try:
            delivery_id, url = verify_click(request.path_params["token"], self.secret)
        except TokenError:
            return Response("not found", 404, media_type="text/plain")
        # A failed spool write (disk full) is counted and logged: the reader still gets to
        # the page, which matters more than the click event.
        self.spool.try_append(
            {
                "type": "clicked",
                "at": self.clock().timestamp(),
                "delivery": delivery_id,
                "url": url,
                "payload": request_meta(request),
            }
        )
        return Response(
            status_code=302,
            headers={
                "Location": quote(url, safe=_URI_SAFE),
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def honeypot(self, request: Request) -> Response:
        """The target of the invisible link: an empty page (the click itself is the signal)."""
        return Response(b"", media_type="text/plain", headers=HONEYPOT_HEADERS)

    async def openapi(self, request: Request) -> Response:
        """This service's OpenAPI document (with the capture routes when they are served)."""
        return JSONResponse(openapi_document(with_capture=self.consent is not None))

    async def unsubscribe(self, request: Request) -> Response:
        """GET shows a confirmation page; POST (the form or RFC 8058) unsubscribes."""
        try:
            delivery_id, lead_id = verify_unsubscribe(request.path_params["token"], self.secret)
        except TokenError:
            return invalid_link_page()
        if request.method == "POST":
            body = await read_body(request, self.max_body)
            # RFC 8058 one-click sends "List-Unsubscribe=One-Click" (form-encoded or
            # multipart); any POST here is a deliberate unsubscribe, the body only labels it.
            one_click = b"List-Unsubscribe" in body and b"One-Click" in body
            if self.consent is not None and self.consent.topics and not one_click:
                saved = await self._save_preferences(request, body, delivery_id, lead_id)
                if saved is not None:
                    return saved
            written = self.spool.try_append(
                {
                    "type": "unsubscribed",
                    "at": self.clock().timestamp(),
                    "lead": lead_id,
                    "delivery": delivery_id,
                    # One unsubscribe event per delivery and lead, however often it is posted.
                    "xid": f"unsubscribe:{delivery_id}:{lead_id}",
                    "payload": {"source": "one-click" if one_click else "unsubscribe-page"},
                }
            )
            if not written:
                # Never confirm an unsubscribe that was not kept.
                return page(
                    "Please try again",
                    "<h1>Something went wrong</h1><p>Your request could not be saved. "
                    "Please try again in a few minutes.</p>",
                    status=503,
                )
            # Answered without the database: suppression takes effect when the spool drains.
            return page(
                "Unsubscribed",
                "<h1>You are unsubscribed</h1><p>This address will get no more marketing "
                "email from us.</p>"
                '<p class="muted">Unsubscribed by mistake? Reply to any of our emails and we '
                "will put it right.</p>",
            )

        lead = await self._lead(lead_id)
        if lead is None:
            return invalid_link_page()
        if isinstance(lead, Exception):
            # The database is busy or down: the page still works, without the address.
            who, hello, suppressed = "the address this email was sent to", "", False
        else:
            email, first_name, suppressed = lead
            who = f"<strong>{html.escape(mask_email(email))}</strong>"
            hello = f"<p>Hi {html.escape(first_name)},</p>" if first_name else ""
        if suppressed:
            return page(
                "Unsubscribed",
                f"<h1>You are unsubscribed</h1>{hello}"
                f"<p>{who} gets no marketing email from us.</p>",
            )
        if self.consent is not None and self.consent.topics:
            from nurture.engagement.preferences import page_body, topic_states

            try:
                states = await self._bounded(topic_states, self.engine, lead_id, self.consent)
            except Exception:  # the database cannot say now: the page works without
                states = None
            return page("Email preferences", page_body(self.consent, states, hello, who))
        return page(
            "Unsubscribe",
            f"<h1>Unsubscribe</h1>{hello}"
            f"<p>You are about to unsubscribe {who}.</p>"
            '<form method="post">'
            "<fieldset><legend>Your email preferences</legend><label>"
            '<input type="radio" name="scope" value="all" checked> '
            "Unsubscribe from all marketing email</label></fieldset>"
            '<button type="submit">Confirm unsubscribe</button></form>'
            '<p class="muted">You will still get messages you asked for, such as '
            "receipts and password resets.</p>",
        )

    async def _save_preferences(
        self, request: Request, body: bytes, delivery_id: int, lead_id: int
    ) -> Response | None:
        """Spool the topic toggles of a ``scope=topics`` post; ``None`` for other posts."""
        from nurture.engagement.preferences import SAVED, parse_choice

        assert self.consent is not None
        choices = parse_choice(body, self.consent)
        if choices is None:
            return None
        meta = request_meta(request)
        written = self.spool.try_append(
            {
                "type": SAVED,
                "at": self.clock().timestamp(),
                "lead": lead_id,
                "delivery": delivery_id,
                "payload": {
                    "topics": choices,
                    "bases": self.consent.topic_bases(),
                    "ip": meta["ip"],
                    "user_agent": meta["user_agent"],
                },
            }
        )
        if not written:
            return page(
                "Please try again",
                "<h1>Something went wrong</h1><p>Your choices could not be saved. "
                "Please try again in a few minutes.</p>",
                status=503,
            )
        kept = [self.consent.topics[t].label or t for t, on in choices.items() if on]
        listed = "".join(f"<li>{html.escape(t)}</li>" for t in kept)
        return page(
            "Preferences saved",
            "<h1>Your choices are saved</h1>"
            + (f"<p>You will get:</p><ul>{listed}</ul>" if kept else "<p>No topics.</p>"),
        )

    async def bounces(self, request: Request) -> Response:
        """The signed ESP webhook: per-item validation, replay refusal, 503 when the DB is down."""
        if self.webhook_secret is None:
            raise HTTPException(503, "webhook secret not configured")
        body = await read_body(request, self.max_body)
        now = self.clock()
        timestamp, mac = _check_webhook_signature(
            request.headers.get(SIGNATURE_HEADER), body, self.webhook_secret, now
        )
        batch = _parse_items(body, lambda item: _parse_bounce(item, now))
        if isinstance(batch, Response):
            return batch
        receipt = _Receipt(mac, datetime.fromtimestamp(timestamp, UTC))
        return await self._record_batch(batch, self._bounce_events, receipt)

    async def ingest(self, request: Request) -> Response:
        """``POST /events``: per-item validation, idempotent by ``id``."""
        if not self._authorised(request.headers.get("authorization", "")):
            return JSONResponse(
                {"error": "a valid 'Authorization: Bearer <key>' header is required"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        body = await read_body(request, self.max_body)
        batch = _parse_items(body, parse_event)
        if isinstance(batch, Response):
            return batch
        return await self._record_batch(batch, _as_events, None)

    def _authorised(self, header: str) -> bool:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        given = key.strip().encode("utf-8", "surrogateescape")
        ok = False
        for known in self.ingest_keys:
            ok |= hmac.compare_digest(given, known)
        return ok

    # -- batches: recorded in the request, 503 when the database cannot take them -------

    async def _record_batch(
        self,
        batch: _Batch[T],
        to_events: Callable[[Session, Sequence[T]], list[EventIn | None]],
        receipt: _Receipt | None,
    ) -> Response:
        if batch.errors and not batch.valid:
            return _unprocessable(batch.errors)
        try:
            result = await run_in_threadpool(self._record_sync, batch, to_events, receipt)
        except Exception as exc:
            if not is_operational(exc):
                raise
            # The sender retries on 503 (a webhook or an API client), so nothing is lost.
            return JSONResponse(
                {"error": "the database is unavailable; retry later", "detail": type(exc).__name__},
                503,
                headers={"Retry-After": "30"},
            )
        if result is None:
            return JSONResponse(
                {"error": "this signed request was already received; nothing was recorded"}, 409
            )
        recorded, store_errors = result
        errors = sorted(batch.errors + store_errors, key=lambda e: e["index"])
        doc = {**_result_doc(recorded), "errors": errors}
        return JSONResponse(doc, 207 if errors else 200)

    def _record_sync(
        self,
        batch: _Batch[T],
        to_events: Callable[[Session, Sequence[T]], list[EventIn | None]],
        receipt: _Receipt | None,
    ) -> tuple[RecordResult, list[dict[str, Any]]] | None:
        """Record the valid items in one transaction (with the receipt, if any); ``None``
        for a replayed receipt. On a non-operational failure, item by item."""
        now = self.clock()
        try:
            with session_scope(self.engine) as session:
                _bound_lock_wait(session)
                if receipt is not None and not _claim_receipt(session, receipt, now):
                    return None
                return _record_in(session, batch.valid, to_events, now), []
        except Exception as exc:
            if is_operational(exc):
                raise
            log.warning("batch failed (%s); recording item by item", type(exc).__name__)
        total = RecordResult()
        errors: list[dict[str, Any]] = []
        for index, item in batch.valid:
            try:
                with session_scope(self.engine) as session:
                    _bound_lock_wait(session)
                    total += _record_in(session, [(index, item)], to_events, now)
            except Exception as exc:
                if is_operational(exc):
                    raise
                message = f"could not be stored: {type(exc).__name__}"
                errors.append({"index": index, "field": "event", "message": message})
        if receipt is not None:
            with session_scope(self.engine) as session:
                _claim_receipt(session, receipt, now)
        return total, errors

    def _bounce_events(self, session: Session, items: Sequence[_Bounce]) -> list[EventIn | None]:
        """Bounces as events, tied to deliveries by Message-ID; ``None`` for an item that
        names neither a known Message-ID nor an email (nothing to tie it to)."""
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
        out: list[EventIn | None] = []
        for b in items:
            delivery = by_message.get((b.message_id or "").strip().strip("<>"))
            if b.email is None and delivery is None:
                out.append(None)
                continue
            out.append(
                EventIn(
                    b.type,
                    b.occurred_at,
                    email=b.email,
                    delivery_id=delivery,
                    external_id=b.external_id,
                    payload=b.payload,
                )
            )
        return out


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


def _check_text(name: str, value: object, low: int, high: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise EventError(name, f"must be a string of {low} to {high} characters")
    if "\x00" in value:
        raise EventError(name, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EventError(name, f"contains an unpaired surrogate at {exc.start}") from exc
    return value


def _parse_bounce(item: object, now: datetime) -> _Bounce:
    if not isinstance(item, Mapping):
        raise EventError("event", "must be a JSON object")
    unknown = sorted(str(k) for k in item if k not in _BOUNCE_FIELDS)
    if unknown:
        raise EventError(unknown[0], f"unknown field (expected: {', '.join(_BOUNCE_FIELDS)})")
    kind = item.get("type")
    if not isinstance(kind, str) or kind not in _BOUNCE_TYPES:
        raise EventError("type", f"must be 'bounce' or 'complaint', got {kind!r}")
    email, message_id = item.get("email"), item.get("message_id")
    if email is None and message_id is None:
        raise EventError("email", "give email or message_id")
    if email is not None:
        email = check_email(email)
    message_id = _check_text("message_id", message_id, 1, 255)
    hard = item.get("hard", False)
    if not isinstance(hard, bool):
        raise EventError("hard", f"must be true or false, got {hard!r}")
    ident = _check_text("id", item.get("id"), 1, 200)
    reason = _check_text("reason", item.get("reason"), 0, 1000)
    occurred_at = _parse_timestamp(item.get("timestamp"), now)
    payload: dict[str, Any] = {"hard": hard, "source": "webhook"}
    if message_id:
        payload["message_id"] = message_id
    if reason:
        payload["reason"] = reason
    bounce = _Bounce(
        _BOUNCE_TYPES[kind],
        occurred_at,
        email,
        message_id,
        # Namespaced so an ESP's ids cannot collide with ids from other sources.
        f"webhook:{ident}" if ident else None,
        payload,
    )
    # Every check EventIn makes (time range, storable text) now, as an item error, rather
    # than later inside the transaction; lead_id=1 only satisfies "names a lead".
    try:
        EventIn(bounce.type, occurred_at, lead_id=1, external_id=bounce.external_id,
                payload=payload)  # fmt: skip
    except EventError as exc:
        raise EventError("timestamp" if exc.field == "occurred_at" else exc.field,
                         exc.message) from exc  # fmt: skip
    return bounce


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


@dataclass
class _Batch(Generic[T]):
    """A request's items: the valid ones with their index, and an error per invalid one."""

    valid: list[tuple[int, T]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _parse_items(body: bytes, parse: Callable[[object], T]) -> _Batch[T] | Response:
    """``{"events": [...]}`` parsed item by item; a 400/422 only when the body itself is bad."""
    doc = json_body(body)
    items = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return _unprocessable([{"index": None, "field": "events", "message": "required list"}])
    if len(items) > MAX_ITEMS:
        return _too_many(len(items))
    batch: _Batch[T] = _Batch()
    for index, item in enumerate(items):
        try:
            batch.valid.append((index, parse(item)))
        except EventError as exc:
            batch.errors.append({"index": index, "field": exc.field, "message": exc.message})
        except (ValueError, TypeError, OverflowError) as exc:  # belt and braces: never a 500
            batch.errors.append({"index": index, "field": "event", "message": str(exc)[:300]})
    return batch


def _as_events(session: Session, items: Sequence[EventIn]) -> list[EventIn | None]:
    return list(items)


def _record_in(
    session: Session,
    indexed: Sequence[tuple[int, T]],
    to_events: Callable[[Session, Sequence[T]], list[EventIn | None]],
    now: datetime,
) -> RecordResult:
    """Record items in ``session``; ``unknown_indices`` are request indices."""
    events = to_events(session, [item for _, item in indexed])
    unresolved = [indexed[i][0] for i, e in enumerate(events) if e is None]
    known = [(indexed[i][0], e) for i, e in enumerate(events) if e is not None]
    result = record_events(session, [e for _, e in known], now=now)
    unknown = sorted(unresolved + [known[i][0] for i in result.unknown_indices])
    return RecordResult(
        result.inserted, result.duplicates, len(unknown), result.suppressed, tuple(unknown)
    )


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
    spool_dir: Path | str = Path(".nurture/spool"),
    record_in_process: bool = False,
    consent: ConsentSpec | None = None,
) -> Starlette:
    """Build the tracking service.

    The spool writer starts and stops with the app's lifespan (uvicorn runs it); its
    :class:`~nurture.engagement.spool.Spool` is ``app.state.spool``.

    Args:
        engine: A migrated database engine.
        secret: The token key (``settings.secret_keys()``): one key, or several during a
            rotation, any of which verifies; the renderer signs with the first.
        clock: Returns the current aware UTC instant; the app never reads the wall clock.
        webhook_secret: Shared secret of the bounce webhook; ``None`` disables it (503).
        ingest_keys: Bearer keys accepted by ``POST /events``; empty refuses everything.
        max_body: Largest request body in bytes; larger ones get 413.
        spool_dir: Folder of the durable event spool (``NURTURE_SPOOL_DIR``), which
            several processes may share; each writes its own files.
        record_in_process: Record the spool in a child process (``nurture serve`` does,
            unless ``NURTURE_SPOOL_RECORDER=thread``) instead of a thread of this one.
        consent: The programme's consent rules: with them the service takes signups
            (``POST /forms/{form}``) and opt-in confirmations (``/confirm/{token}``).

    Returns:
        The ASGI application.
    """
    recorder = (
        RecorderProcess(engine.url.render_as_string(hide_password=False))
        if record_in_process
        else None
    )
    spool = Spool(Path(spool_dir), engine, clock, recorder=recorder)
    svc = _Service(engine, secret, clock, webhook_secret, ingest_keys, max_body, spool)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await spool.start()
        try:
            yield
        finally:
            await spool.stop()

    routes = [
        Route("/healthz", svc.healthz, methods=["GET"]),
        # GET routes answer HEAD too; a HEAD on /o or /c is recorded (method "HEAD").
        Route("/o/{token}.gif", svc.open_pixel, methods=["GET"]),
        Route("/c/{token}", svc.click, methods=["GET"]),
        Route("/u/{token}", svc.unsubscribe, methods=["GET", "POST"]),
        Route("/_nurture/hp", svc.honeypot, methods=["GET"]),
        Route("/webhooks/bounces", svc.bounces, methods=["POST"]),
        Route("/events", svc.ingest, methods=["POST"]),
        Route("/openapi.json", svc.openapi, methods=["GET"]),
    ]
    if consent is not None:
        from nurture.engagement.capture import ConfirmEndpoint, FormEndpoint

        svc.consent = consent
        keys = svc.secret
        forms = FormEndpoint(consent, spool, clock, keys, max_body)
        routes.append(Route("/forms/{form}", forms.handle, methods=["POST"]))
        routes.append(
            Route(
                "/confirm/{token}",
                ConfirmEndpoint(spool, clock, keys).handle,
                methods=["GET", "POST"],
            )
        )
    app = Starlette(routes=routes, lifespan=lifespan)
    # A link with a slash added is not one we wrote: 404, not a redirect to a guess.
    app.router.redirect_slashes = False
    app.state.spool = spool
    return app


_ITEM_ERRORS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "index": {"type": ["integer", "null"]},
            "field": {"type": "string"},
            "message": {"type": "string"},
        },
    },
}
_BATCH_RESULT = {
    "type": "object",
    "properties": {
        "inserted": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "unknown_lead": {"type": "integer"},
        "suppressed": {"type": "integer"},
        "unknown_indices": {"type": "array", "items": {"type": "integer"}},
        "errors": _ITEM_ERRORS,
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _token(suffix: str = "") -> list[dict[str, Any]]:
    return [{"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}]


_BATCH_RESPONSES = {
    "200": {"description": "every item recorded (or a known duplicate)", **_json(_BATCH_RESULT)},
    "207": {"description": "valid items recorded; the others listed", **_json(_BATCH_RESULT)},
    "400": {"description": "the body is not JSON"},
    "413": {"description": "the body is too large"},
    "422": {"description": "no valid item; nothing recorded", **_json({"type": "object"})},
    "503": {"description": "the database is unavailable; retry"},
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "nurture tracking service", "version": "1"},
    "paths": {
        "/healthz": {"get": {"summary": "Health and spool counters",
                             "responses": {"200": {"description": "healthy"},
                                           "503": {"description": "database unavailable"}}}},
        "/o/{token}.gif": {"get": {"summary": "Open pixel", "parameters": _token(),
                                   "responses": {"200": {"description": "a 1x1 GIF"},
                                                 "404": {"description": "bad token"}}}},
        "/c/{token}": {"get": {"summary": "Tracked link", "parameters": _token(),
                               "responses": {"302": {"description": "to the signed URL"},
                                             "404": {"description": "bad token"}}}},
        "/u/{token}": {
            "get": {"summary": "Unsubscribe page", "parameters": _token(),
                    "responses": {"200": {"description": "page"},
                                  "404": {"description": "bad token"}}},
            "post": {"summary": "Unsubscribe (form or RFC 8058 one-click)",
                     "parameters": _token(),
                     "requestBody": {"content": {"application/x-www-form-urlencoded": {
                         "schema": {"type": "object",
                                    "properties": {"List-Unsubscribe": {"type": "string"}}}}}},
                     "responses": {"200": {"description": "unsubscribed"},
                                   "404": {"description": "bad token"},
                                   "413": {"description": "body too large"}}},
        },
        "/_nurture/hp": {"get": {"summary": "Honeypot target (empty page)",
                                 "responses": {"200": {"description": "empty"}}}},
        "/webhooks/bounces": {"post": {
            "summary": "Signed ESP bounce and complaint webhook",
            "parameters": [{"name": SIGNATURE_HEADER, "in": "header", "required": True,
                            "schema": {"type": "string"}}],
            "requestBody": {"required": True, **_json({
                "type": "object", "required": ["events"],
                "properties": {"events": {"type": "array", "maxItems": MAX_ITEMS, "items": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "enum": ["bounce", "complaint"]},
                        "email": {"type": "string"}, "message_id": {"type": "string"},
                        "hard": {"type": "boolean"}, "id": {"type": "string"},
                        "timestamp": {"oneOf": [{"type": "number"}, {"type": "string"}]},
                        "reason": {"type": "string"}}}}}})},
            "responses": {**_BATCH_RESPONSES, "401": {"description": "bad signature"},
                          "409": {"description": "replayed signed request"}},
        }},
        "/events": {"post": {
            "summary": "Event intake (bearer key)",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, **_json({
                "type": "object", "required": ["events"],
                "properties": {"events": {"type": "array", "maxItems": MAX_ITEMS, "items": {
                    "type": "object", "required": ["type", "occurred_at"],
                    "properties": {
                        "id": {"type": "string"}, "type": {"type": "string"},
                        "occurred_at": {"type": "string", "format": "date-time"},
                        "email": {"type": "string"}, "lead_id": {"type": "integer"},
                        "delivery_id": {"type": "integer"}, "url": {"type": "string"},
                        "payload": {"type": "object"}}}}}})},
            "responses": {**_BATCH_RESPONSES, "401": {"description": "no valid key"}},
        }},
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
}  # fmt: skip


def openapi_document(*, with_capture: bool) -> dict[str, Any]:
    """The service's OpenAPI document; ``with_capture`` adds ``/forms`` and ``/confirm``."""
    if not with_capture:
        return OPENAPI
    from nurture.engagement.capture import OPENAPI_PATHS

    return {**OPENAPI, "paths": {**OPENAPI["paths"], **OPENAPI_PATHS}}
