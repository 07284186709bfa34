"""Capture at the edge: ``POST /forms/{form}`` signups and ``/confirm/{token}`` double opt-ins.

The edge (:class:`FormEndpoint`) validates a submission as import validates a row, checks
the honeypot and the rate limits, writes one ``form_submit`` record to the tracking
service's durable spool and answers, the same way for every address, known or not: a 303
to the form's thank-you URL for an HTML form post, or ``202 {"status": "accepted"}`` for
JSON. Nothing is read from the database on the request path.

The spool writer then calls :func:`apply_captures` in the transaction that records the
batch. It creates the lead (an ordinary ``leads`` row with ``source`` = the form's
touchpoint and ``created_at`` = the submission time, so "speed to lead" finds it), and
records the consent, or, for a touchpoint under double opt-in, an ``opt_ins`` row that
holds a new lead out of every campaign until it confirms. A submission never changes the
stored fields of a lead that already exists: an unauthenticated form must not let anyone
rename a known person. Replays are harmless (the event's id dedups the event; the lead,
consent and opt-in writes are idempotent).

:mod:`nurture.privacy.opt_in` (a tick stage) sends each pending opt-in exactly one
confirmation email with a signed link; ``POST /confirm/{token}`` (:class:`ConfirmEndpoint`)
confirms (``GET`` only shows the button: mail scanners prefetch links), which records the
consent and lets the lead enter its campaigns on the next tick.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from email_validator import EmailNotValidError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from nurture.engagement.events import EventIn
from nurture.engagement.web import invalid_link_page, page, read_body, request_meta
from nurture.intake.leads import CHECKS, MAX_EMAIL, _Reject, _validate, upsert_lead_rows
from nurture.message.tokens import TokenError, sign, verify
from nurture.spec.consent import ConsentSpec, FormSpec
from nurture.store.consent import ConsentIn, record_consents
from nurture.store.models import (
    Lead,
    OptIn,
    Suppression,
)
from nurture.store.sql import insert_for
from nurture.store.suppression import ERASED, erased_address, suppress

if TYPE_CHECKING:
    pass

CAPTURED = "form_submit"  # the scoring spec's event for a signup (10 points by default)
CONFIRMED = "opt_in_confirmed"
PURPOSE_CONFIRM = "opt-in"
CONFIRM_MAX_AGE = timedelta(days=90)
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_FIELDS = 50


# --------------------------------------------------------------------------- rate limits


class RateLimiter:
    """At most ``limit`` hits per key within ``window`` seconds (a sliding log per key).

    In memory, per serve process: behind several workers each one counts on its own, so
    the effective limit is per process (document the number of workers with the limit).
    """

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str, now: float) -> float | None:
        """Count a hit; ``None`` if allowed, else the seconds until the next one is."""
        log = self._hits.get(key)
        if log is None:
            if len(self._hits) >= self.max_keys:  # a flood of new keys: forget the oldest
                self._hits.pop(next(iter(self._hits)))
            log = self._hits[key] = deque()
        while log and log[0] <= now - self.window:
            log.popleft()
        if len(log) >= self.limit:
            return max(1.0, log[0] + self.window - now)
        log.append(now)
        return None


# --------------------------------------------------------------------------- the edge

#: The capture routes in the tracking service's OpenAPI document (served when consent.yaml
#: has forms); the form fields are the form's own, so the body is any flat object.
OPENAPI_PATHS: dict[str, Any] = {
    "/forms/{form}": {"post": {
        "summary": "Form signup (the same answer for every address, known or not)",
        "parameters": [{"name": "form", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": {
                "type": "object", "additionalProperties": {"type": "string"}}},
            "application/json": {"schema": {
                "type": "object", "additionalProperties": {"type": "string"}}}}},
        "responses": {"202": {"description": "accepted (JSON)"},
                      "303": {"description": "accepted: to the form's thank-you page"},
                      "400": {"description": "not a form body"},
                      "404": {"description": "unknown form"},
                      "413": {"description": "body too large"},
                      "422": {"description": "invalid fields, by field"},
                      "429": {"description": "rate limited (Retry-After)"}}}},
    "/confirm/{token}": {
        "get": {"summary": "Double opt-in confirmation page (a button: scanners prefetch)",
                "parameters": [{"name": "token", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "page"},
                              "404": {"description": "bad or expired token"}}},
        "post": {"summary": "Confirm a double opt-in",
                 "parameters": [{"name": "token", "in": "path", "required": True,
                                 "schema": {"type": "string"}}],
                 "responses": {"200": {"description": "confirmed"},
                               "404": {"description": "bad or expired token"}}},
    },
}  # fmt: skip


class SubmissionError(ValueError):
    """A submission that cannot be accepted; ``errors`` lists (field, message)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))
        self.errors = errors


def clean_submission(form: FormSpec, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate a submission as import validates a row: the lead row and the topics.

    Raises:
        SubmissionError: every problem, by form field.
    """
    errors: list[tuple[str, str]] = []
    row: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    for name, target in form.fields.items():
        value = data.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            errors.append((name, f"expected text, found {type(value).__name__}"))
            continue
        value = value.strip()
        if "\x00" in value or _SURROGATE.search(value):
            # NUL no database stores; a lone surrogate (JSON "\ud800") is no text at all.
            errors.append((name, "contains a character that is not text"))
            continue
        if target == "email":
            if len(value) > MAX_EMAIL:
                errors.append((name, f"longer than {MAX_EMAIL} characters"))
                continue
            try:
                row["email"] = _validate(value, check_deliverability=False).normalized.lower()
            except EmailNotValidError as exc:
                errors.append((name, f"invalid email: {exc}"))
        elif target.startswith("attributes."):
            if len(value) > 2000:
                errors.append((name, "longer than 2000 characters"))
            else:
                attrs[target.split(".", 1)[1]] = value
        else:
            try:
                checked = CHECKS[target](value)
            except _Reject as exc:
                errors.append((name, exc.reason))
                continue
            if checked:
                row[target] = checked
    if "email" not in row and not any(f == name for f, _ in errors for name in form.fields):
        email_field = next(n for n, t in form.fields.items() if t == "email")
        errors.append((email_field, "missing email"))
    chosen = data.get("topics")
    if chosen is None:
        topics = list(form.topics)
    else:
        picked = chosen if isinstance(chosen, list) else [chosen]
        topics = [t for t in form.topics if t in picked]
    if errors:
        raise SubmissionError(errors)
    row["attributes"] = attrs
    return row, topics


class FormEndpoint:
    """``POST /forms/{form}``: answers first, records durably (see the module docstring)."""

    def __init__(
        self,
        spec: ConsentSpec,
        spool: Any,
        clock: Callable[[], datetime],
        keys: Sequence[str],
        max_body: int,
        *,
        per_ip: tuple[int, float] = (20, 3600.0),
        per_address: tuple[int, float] = (5, 3600.0),
    ) -> None:
        self.spec = spec
        self.spool = spool
        self.clock = clock
        self.keys = tuple(keys)
        self.max_body = max_body
        self.by_ip = RateLimiter(*per_ip)
        self.by_address = RateLimiter(*per_address)
        self.bot_hits = 0

    async def handle(self, request: Request) -> Response:
        """Handle one submission."""

        name = request.path_params["form"]
        form = self.spec.forms.get(name)
        if form is None:
            return JSONResponse({"error": "unknown form"}, 404)
        body = await read_body(request, self.max_body)
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        as_json = kind == "application/json"
        data = _parse(body, kind)
        if data is None:
            return JSONResponse(
                {"error": "expected application/json or application/x-www-form-urlencoded"},
                415
                if kind not in ("application/json", "application/x-www-form-urlencoded", "")
                else 400,
            )
        if len(data) > MAX_FIELDS:
            return JSONResponse({"error": f"more than {MAX_FIELDS} fields"}, 400)
        meta = request_meta(request)
        now = self.clock()
        wait = self.by_ip.hit(meta["ip"], now.timestamp())
        if wait is not None:
            return _too_many(wait)
        trap = data.get(form.honeypot)
        if trap not in (None, "", [], [""]):
            # A bot filled the hidden field: it gets the same answer and nothing is kept.
            self.bot_hits += 1
            return self._accepted(form, as_json)
        try:
            row, topics = clean_submission(form, data)
        except SubmissionError as exc:
            errors = [{"field": f, "message": m} for f, m in exc.errors]
            if as_json:
                return JSONResponse({"errors": errors}, 422)

            items = "".join(
                f"<li>{html.escape(e['field'])}: {html.escape(e['message'])}</li>" for e in errors
            )
            return page(
                "Please check the form",
                f"<h1>Please check the form</h1><ul>{items}</ul>"
                "<p>Go back, correct it and send it again.</p>",
                status=422,
            )
        wait = self.by_address.hit(row["email"], now.timestamp())
        if wait is not None:
            return _too_many(wait)
        record = {
            "type": CAPTURED,
            "at": now.timestamp(),
            "email": row["email"],
            "xid": "form:" + os.urandom(16).hex(),
            "payload": {
                "form": name,
                "touchpoint": form.touchpoint,
                "ip": meta["ip"],
                "user_agent": meta["user_agent"],
                "capture": {
                    "row": row,
                    "topics": topics,
                    "basis": form.basis,
                    "version": form.consent_version,
                    "double_opt_in": form.touchpoint in self.spec.double_opt_in,
                    # The erased-person check needs the key; the spool writer does not.
                    "erased": [erased_address(row["email"], k) for k in self.keys],
                },
            },
        }
        if not self.spool.try_append(record):
            return JSONResponse({"error": "please try again"}, 503, headers={"Retry-After": "60"})
        return self._accepted(form, as_json)

    def _accepted(self, form: FormSpec, as_json: bool) -> Response:
        # The same answer whether the address was known, new, suppressed or a bot's.
        if as_json:
            return JSONResponse({"status": "accepted"}, 202)
        if form.redirect:
            return RedirectResponse(form.redirect, 303)

        return page(
            "Thank you",
            "<h1>Thank you</h1><p>If you asked for a confirmation, please look for our "
            "email and click the link in it.</p>",
        )


def _too_many(wait: float) -> Response:
    return JSONResponse(
        {"error": "too many submissions; try again later"},
        429,
        headers={"Retry-After": str(int(wait) + 1)},
    )


def _parse(body: bytes, kind: str) -> dict[str, Any] | None:
    if kind == "application/json":
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None
    if kind in ("application/x-www-form-urlencoded", ""):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
        pairs = parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FIELDS * 4)
        return {k: (v if k == "topics" else v[0]) for k, v in pairs.items()}
    return None


class ConfirmEndpoint:
    """``/confirm/{token}``: GET shows a button, POST confirms (or, sent by a mail client's
    RFC 8058 one-click, declines: the address is unsubscribed)."""

    def __init__(self, spool: Any, clock: Callable[[], datetime], keys: Sequence[str]) -> None:
        self.spool = spool
        self.clock = clock
        self.keys = tuple(keys)

    async def handle(self, request: Request) -> Response:
        """Handle one request."""

        now = self.clock()
        try:
            data = verify(
                request.path_params["token"],
                self.keys,
                purpose=PURPOSE_CONFIRM,
                max_age=CONFIRM_MAX_AGE,
                now=now,
            )
        except TokenError:
            return invalid_link_page()
        lead_id = data.get("l")
        if not isinstance(lead_id, int):
            return invalid_link_page()
        if request.method != "POST":
            return page(
                "Confirm your subscription",
                "<h1>Confirm your subscription</h1><p>Press the button to confirm that you "
                'want to hear from us.</p><form method="post">'
                '<button type="submit" name="action" value="confirm">Confirm</button></form>',
            )
        body = await read_body(request, 4096)
        meta = request_meta(request)
        one_click = b"List-Unsubscribe" in body and b"One-Click" in body
        record = {
            "type": "unsubscribed" if one_click else CONFIRMED,
            "at": now.timestamp(),
            "lead": lead_id,
            "xid": f"{'decline' if one_click else 'confirm'}:{lead_id}:{data.get('iat')}",
            "payload": {"ip": meta["ip"], "user_agent": meta["user_agent"]}
            | ({"source": "one-click"} if one_click else {}),
        }
        if not self.spool.try_append(record):
            return page("Please try again", "<h1>Something went wrong</h1>", status=503)
        if one_click:
            return page("Unsubscribed", "<h1>You will get nothing more from us</h1>")
        return page("Confirmed", "<h1>Thank you</h1><p>Your subscription is confirmed.</p>")


# --------------------------------------------------------------------------- the writer


def apply_captures(session: Session, events: Sequence[EventIn], now: datetime) -> list[EventIn]:
    """Create leads, consents and opt-ins for the capture records in a spooled batch.

    Called by the spool writer in the batch's transaction, before the events are recorded.
    Returns the events with the capture details taken out of their payload.
    """
    from nurture.engagement.preferences import SAVED, apply_preferences

    if not any(e.type in (CAPTURED, CONFIRMED, SAVED) for e in events):
        return list(events)
    out: list[EventIn] = []
    for event in events:
        if event.type == CAPTURED and isinstance(event.payload.get("capture"), dict):
            out.append(_capture(session, event))
        elif event.type == SAVED and event.lead_id is not None:
            p = event.payload
            if isinstance(p.get("topics"), dict) and isinstance(p.get("bases"), dict):
                apply_preferences(
                    session, event.lead_id, p["topics"], event.occurred_at, p, p["bases"]
                )
            out.append(event)
        elif event.type == CONFIRMED and event.lead_id is not None:
            confirm(session, event.lead_id, event.occurred_at, dict(event.payload))
            out.append(event)
        else:
            out.append(event)
    return out


def _capture(session: Session, event: EventIn) -> EventIn:
    payload = dict(event.payload)
    cap = payload.pop("capture")
    row = dict(cap["row"])
    email = row["email"]
    at = event.occurred_at
    hashes = [h for h in cap.get("erased") or [] if isinstance(h, str)]
    if hashes and session.scalar(select(Suppression.id).where(Suppression.email.in_(hashes))):
        suppress(session, [email], ERASED, "returned after erasure", at)
    lead_id = session.scalar(select(Lead.id).where(Lead.email == email))
    new = lead_id is None
    if new:
        row["source"] = payload["touchpoint"]
        upsert_lead_rows(session, [row], at, default_source=payload["touchpoint"])
        lead_id = session.scalar(select(Lead.id).where(Lead.email == email))
    assert lead_id is not None
    topics = [t for t in cap.get("topics") or [] if isinstance(t, str)]
    proof = {
        "basis": cap["basis"],
        "version": cap.get("version"),
        "form": payload.get("form"),
        "ip": payload.get("ip"),
        "user_agent": payload.get("user_agent"),
        "at": at.isoformat(),
    }
    if cap.get("double_opt_in"):
        pending = session.get(OptIn, lead_id)
        if pending is None or pending.confirmed_at is not None:
            stmt = insert_for(session, OptIn).values(
                lead_id=lead_id,
                form=payload.get("form"),
                source=payload["touchpoint"],
                topics={"topics": topics, **proof},
                requested_at=at,
                holds=new,
            )
            if pending is not None:  # confirmed before: a new request for more topics
                stmt = stmt.on_conflict_do_update(
                    index_elements=["lead_id"],
                    set_={
                        "topics": stmt.excluded.topics,
                        "requested_at": at,
                        "confirmation_sent_at": None,
                        "confirmation_state": None,
                        "claimed_by": None,
                        "claimed_at": None,
                        "confirmed_at": None,
                        "holds": False,
                    },
                )
            else:
                stmt = stmt.on_conflict_do_nothing()
            session.execute(stmt)
        else:  # still pending: one request, one email; the topics add up
            merged = list(dict.fromkeys([*pending.topics.get("topics", []), *topics]))
            pending.topics = {**pending.topics, "topics": merged}
    elif topics:
        record_consents(
            session,
            [
                ConsentIn(
                    lead_id,
                    t,
                    cap["basis"],
                    "granted",
                    "form",
                    payload.get("form"),
                    cap.get("version"),
                    payload.get("ip"),
                    payload.get("user_agent"),
                    at,
                )
                for t in topics
            ],
            at,
        )
    return replace(event, email=None, lead_id=lead_id, payload=payload)


def confirm(session: Session, lead_id: int, at: datetime, meta: dict[str, Any]) -> bool:
    """Confirm a pending double opt-in: record its consents and release the lead.

    Returns:
        Whether there was a pending opt-in (a second confirmation changes nothing).
    """
    pending = session.get(OptIn, lead_id)
    if pending is None or pending.confirmed_at is not None:
        return False
    pending.confirmed_at = at
    proof = pending.topics
    record_consents(
        session,
        [
            ConsentIn(
                lead_id,
                t,
                str(proof.get("basis") or "consent"),
                "granted",
                "double_opt_in",
                proof.get("form") or pending.source,
                proof.get("version"),
                meta.get("ip") or proof.get("ip"),
                meta.get("user_agent") or proof.get("user_agent"),
                at,
            )
            for t in proof.get("topics") or []
        ],
        at,
    )
    return True


# --------------------------------------------------------------------------- confirmations


def confirm_token(lead_id: int, secret: str, now: datetime) -> str:
    """The signed token of a confirmation link (expires after :data:`CONFIRM_MAX_AGE`)."""
    return sign({"l": int(lead_id)}, secret, purpose=PURPOSE_CONFIRM, issued_at=now)


def verify_confirm(token: str, secrets: Sequence[str], now: datetime) -> int:
    """The lead id of a confirmation token.

    Raises:
        TokenError: forged, altered, for another purpose or expired.
    """
    data = verify(token, tuple(secrets), purpose=PURPOSE_CONFIRM, max_age=CONFIRM_MAX_AGE, now=now)
    lead_id = data.get("l")
    if not isinstance(lead_id, int):
        raise TokenError("malformed confirmation token")
    return lead_id
