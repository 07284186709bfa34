"""Signed, URL-safe tokens for the tracking links in every email.

A token is ``base64url(body) + base64url(mac)`` with no padding and no separator, where
``body`` is the payload as compact JSON and ``mac`` is HMAC-SHA256 truncated to 128 bits
(22 characters). The MAC covers a version tag, the token's *purpose* and the body *text*,
so:

- a token made for one purpose (``open``) is useless for another (``unsubscribe``);
- any change to any character is rejected. The MAC is checked over the text as sent,
  not over decoded bytes, because base64 has spare bits in its last character and a
  decoder would map two different texts to the same bytes.

Key rotation: every ``verify*`` function takes one key or a sequence of keys and accepts a
token signed with any of them, so links already in mailboxes keep working after a new key
is put first. Signing always uses one key.

Expiry: a payload may carry its issue time (``iat``, Unix seconds) and ``verify`` then
enforces ``max_age``. The delivery-bound tokens below (open, click, unsubscribe) carry
none and never expire. Emails sit in mailboxes for years; a dead click link is a broken
email, and an unsubscribe link must keep working (CAN-SPAM demands at least 30 days
after sending, and a recipient who unsubscribes from a two-year-old email is right to
expect it to work). Each token names one delivery, so the damage a leaked token can do
is bounded to recording events for, or unsubscribing, that one recipient.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from json.encoder import encode_basestring as _json_string
from urllib.parse import urlsplit

from nurture.errors import NurtureError

__all__ = [
    "MAX_TOKEN_LENGTH",
    "Secrets",
    "TokenError",
    "TrackingLinks",
    "click_token",
    "open_token",
    "sign",
    "tracking_links",
    "unsubscribe_token",
    "verify",
    "verify_click",
    "verify_open",
    "verify_unsubscribe",
]

_VERSION = b"nurture-token/v1"
_MAC_BYTES = 16  # 128-bit truncated HMAC-SHA256
_MAC_CHARS = 22  # base64url length of 16 bytes without padding
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_PURPOSE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A token longer than this is refused before any decoding: a click token holds a URL,
# and browsers and proxies stop at a few kB anyway.
MAX_TOKEN_LENGTH = 8192
# Tokens issued slightly in the future (clock skew between hosts) are still accepted.
_FUTURE_SKEW = timedelta(minutes=5)

# Delivery-bound tokens never expire, so "now" plays no part in verifying them.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

PURPOSE_OPEN = "open"
PURPOSE_CLICK = "click"
PURPOSE_UNSUBSCRIBE = "unsubscribe"


class TokenError(NurtureError, ValueError):
    """A token is malformed, forged, altered, made for another purpose, or expired."""


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64encode(data: bytes) -> str:
    # binascii directly: base64.urlsafe_b64encode is two Python calls around the same thing.
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_URLSAFE).decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, purpose: str, body: str) -> str:
    if not secret:
        raise ValueError("the signing secret is empty")
    msg = b"\x00".join((_VERSION, purpose.encode("ascii"), body.encode("ascii")))
    # A digest *name* takes OpenSSL's one-shot path; a constructor falls back to Python.
    digest = hmac.digest(secret.encode("utf-8"), msg, "sha256")
    return _b64encode(digest[:_MAC_BYTES])


def _check_purpose(purpose: str) -> None:
    if not _PURPOSE.match(purpose):
        raise ValueError(f"bad token purpose {purpose!r}: lowercase letters, digits, . _ -")


def sign(
    payload: Mapping[str, str | int],
    secret: str,
    *,
    purpose: str,
    issued_at: datetime | None = None,
) -> str:
    """Sign a small payload into a compact URL-safe token.

    Args:
        payload: String keys with ``str`` or ``int`` values. ``iat`` is reserved.
        secret: The HMAC key (``settings.secret_key``).
        purpose: Domain separation: a token verifies only for the same purpose.
        issued_at: Embed this issue time so ``verify`` can enforce a ``max_age``.

    Returns:
        The token: only ``A-Z a-z 0-9 - _`` characters.
    """
    _check_purpose(purpose)
    data: dict[str, str | int] = {}
    for key, value in payload.items():
        if not isinstance(key, str) or key == "iat":
            raise ValueError(f"bad payload key {key!r}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"payload value for {key!r} must be str or int, not {value!r}")
        data[key] = value
    if issued_at is not None:
        if issued_at.tzinfo is None:
            raise ValueError("issued_at must be an aware datetime")
        data["iat"] = int(issued_at.timestamp())
    return _seal(_compact_json(data), secret, purpose)


def _seal(raw: str, secret: str, purpose: str) -> str:
    """The token for the payload JSON ``raw``: its base64url text, then the MAC of that text."""
    body = _b64encode(raw.encode("utf-8"))
    return body + _mac(secret, purpose, body)


def _compact_json(data: Mapping[str, str | int]) -> str:
    """``json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False)``.

    Written out for flat str/int payloads: the send path signs five tokens per email, and
    json.dumps with options builds a new encoder on every call.
    """
    return (
        "{"
        + ",".join(
            f"{_json_string(key)}:{value if isinstance(value, int) else _json_string(value)}"
            for key, value in sorted(data.items())
        )
        + "}"
    )


Secrets = str | Sequence[str]


def _matches(mac: str, secrets: Secrets, purpose: str, body: str) -> bool:
    """Whether ``mac`` is the MAC of ``body`` under any of ``secrets``, compared in
    constant time against each key (no early exit that would tell which key matched)."""
    if isinstance(secrets, str):
        return hmac.compare_digest(mac, _mac(secrets, purpose, body))
    if not secrets:
        raise ValueError("no verification secret given")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(mac, _mac(secret, purpose, body))
    return matched


def verify(
    token: str,
    secret: Secrets,
    *,
    purpose: str,
    max_age: timedelta | None,
    now: datetime,
) -> dict[str, str | int]:
    """Check a token and return its payload.

    Args:
        token: The token text as received.
        secret: The HMAC key it was signed with, or several keys (rotation): any verifies.
        purpose: The purpose it must have been signed for.
        max_age: If set, the token must carry an issue time no older than this.
        now: The current instant (injected; never the wall clock).

    Returns:
        The payload, including ``iat`` (Unix seconds) when the token has one.

    Raises:
        TokenError: The token is malformed, forged, altered, for another purpose or expired.
    """
    _check_purpose(purpose)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token too long")
    if len(token) <= _MAC_CHARS or not _B64URL.match(token):
        raise TokenError("malformed token")
    body, mac = token[:-_MAC_CHARS], token[-_MAC_CHARS:]
    if not _matches(mac, secret, purpose, body):
        raise TokenError("bad token signature")
    try:
        data = json.loads(_b64decode(body).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        # Only reachable with a valid MAC, i.e. a signing bug, but never crash on it.
        raise TokenError("malformed token payload") from exc
    if not isinstance(data, dict) or not all(
        isinstance(v, str | int) and not isinstance(v, bool) for v in data.values()
    ):
        raise TokenError("malformed token payload")
    if max_age is not None:
        iat = data.get("iat")
        if not isinstance(iat, int):
            raise TokenError("token has no issue time")
        issued = datetime.fromtimestamp(iat, UTC)
        if now - issued > max_age:
            raise TokenError("token expired")
        if issued - now > _FUTURE_SKEW:
            raise TokenError("token issued in the future")
    return data


def _check_target(url: str) -> None:
    """A click target must be an absolute http(s) URL without control characters."""
    problem = _target_problem(url)
    if problem is not None:
        raise ValueError(problem)


@lru_cache(maxsize=4096)
def _target_problem(url: str) -> str | None:
    # Cached: one tick signs the same few template links for thousands of leads.
    if _CONTROL.search(url):
        return f"click target contains control characters: {url!r}"
    if not _is_web_url(url):
        return f"click target must be an absolute http(s) URL, got {url!r}"
    return None


@lru_cache(maxsize=4096)
def _is_web_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def click_token(delivery_id: int, url: str, secret: str) -> str:
    """A click token binding one delivery to the exact target URL (no open redirect).

    The payload is written URL first, ``{"u":"<url>",  "d":<id>}``, with the URL's part
    padded (JSON whitespace) to a multiple of three bytes. Its base64 text and the HMAC
    state after it are then the same for every delivery (:func:`_click_head`): per
    message only the delivery id is encoded and hashed. Verification is unchanged; the
    earlier layout (``{"d":..,"u":..}``) verifies as before.
    """
    _check_target(url)
    head, state = _click_head(url, secret)
    tail = _b64encode(b'"d":%d}' % int(delivery_id))
    mac = state.copy()
    mac.update(tail.encode("ascii"))
    return head + tail + _b64encode(mac.digest()[:_MAC_BYTES])


@lru_cache(maxsize=4096)
def _click_head(url: str, secret: str) -> tuple[str, hmac.HMAC]:
    """The base64 text of a click payload's URL part and the HMAC state after it."""
    if not secret:
        raise ValueError("the signing secret is empty")
    raw = b'{"u":' + _json_string(url).encode("utf-8") + b","
    raw += b" " * (-len(raw) % 3)  # whole base64 quanta: the tail's text simply follows
    head = _b64encode(raw)
    state = hmac.new(secret.encode("utf-8"), digestmod="sha256")
    state.update(b"\x00".join((_VERSION, PURPOSE_CLICK.encode("ascii"), head.encode("ascii"))))
    return head, state


def open_token(delivery_id: int, secret: str) -> str:
    """An open-pixel token for one delivery."""
    return _seal(f'{{"d":{int(delivery_id)}}}', secret, PURPOSE_OPEN)


def unsubscribe_token(delivery_id: int, lead_id: int, secret: str) -> str:
    """An unsubscribe token for one delivery and its lead. It never expires."""
    return _seal(f'{{"d":{int(delivery_id)},"l":{int(lead_id)}}}', secret, PURPOSE_UNSUBSCRIBE)


def verify_click(token: str, secret: Secrets) -> tuple[int, str]:
    """Return ``(delivery_id, url)`` from a click token; the URL is re-checked."""
    data = verify(token, secret, purpose=PURPOSE_CLICK, max_age=None, now=_EPOCH)
    delivery_id, url = data.get("d"), data.get("u")
    if not isinstance(delivery_id, int) or not isinstance(url, str):
        raise TokenError("malformed click token")
    try:
        _check_target(url)
    except ValueError as exc:
        raise TokenError(str(exc)) from exc
    return delivery_id, url


def verify_open(token: str, secret: Secrets) -> int:
    """Return the delivery id from an open-pixel token."""
    data = verify(token, secret, purpose=PURPOSE_OPEN, max_age=None, now=_EPOCH)
    delivery_id = data.get("d")
    if not isinstance(delivery_id, int):
        raise TokenError("malformed open token")
    return delivery_id


def verify_unsubscribe(token: str, secret: Secrets) -> tuple[int, int]:
    """Return ``(delivery_id, lead_id)`` from an unsubscribe token."""
    data = verify(token, secret, purpose=PURPOSE_UNSUBSCRIBE, max_age=None, now=_EPOCH)
    delivery_id, lead_id = data.get("d"), data.get("l")
    if not isinstance(delivery_id, int) or not isinstance(lead_id, int):
        raise TokenError("malformed unsubscribe token")
    return delivery_id, lead_id


@dataclass(frozen=True)
class TrackingLinks:
    """The tracking URLs for one delivery, for the renderer to put into the email."""

    base_url: str
    delivery_id: int
    lead_id: int
    secret: str = field(repr=False)

    @property
    def _base(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def open_pixel_url(self) -> str:
        """URL of the 1x1 open pixel."""
        return f"{self._base}/o/{open_token(self.delivery_id, self.secret)}.gif"

    @property
    def unsubscribe_url(self) -> str:
        """URL of the unsubscribe page; also the RFC 8058 one-click POST target."""
        token = unsubscribe_token(self.delivery_id, self.lead_id, self.secret)
        return f"{self._base}/u/{token}"

    def click_url(self, url: str) -> str:
        """The tracked redirect to ``url``, which must be an absolute http(s) URL.

        Raises:
            ValueError: ``url`` is not an absolute http(s) URL.
        """
        return f"{self._base}/c/{click_token(self.delivery_id, url, self.secret)}"

    def rewrite(self, url: str) -> str:
        """Like :meth:`click_url`, but leaves non-web links (mailto:, tel:, #anchors) alone."""
        target = url.strip()
        if not _is_web_url(target):
            return url
        return self.click_url(target)


def tracking_links(base_url: str, delivery_id: int, lead_id: int, secret: str) -> TrackingLinks:
    """The tracking links for one delivery, rooted at the tracking service's public URL."""
    return TrackingLinks(base_url, delivery_id, lead_id, secret)
