"""A thin httpx client shared by the HTTP connectors (after meltano's ``RESTStream``).

Every call has a timeout and a classified retry policy: network errors, 429 and 5xx are
:class:`~nurture.crm.RetriableConnectorError` and are retried with backoff (``Retry-After``
and the vendor's rate-limit headers win over the backoff); other 4xx are
:class:`~nurture.crm.FatalConnectorError` and are raised at once. A connector subclasses
:class:`HttpClient` and overrides the hooks it needs: :meth:`classify` (error
classification), :meth:`validate_response`, :meth:`throttle_delay` (vendor headers) and
:meth:`next_page` (pagination).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from nurture.crm import FatalConnectorError, PromotionItem, PushResult, RetriableConnectorError

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class DailyLimitExceeded(RetriableConnectorError):
    """The vendor's daily quota is spent: stop calling until the next day (never loop)."""

    pause_until_next_day = True


class NotFound(FatalConnectorError):
    """HTTP 404: the object is not there (for a deletion, already gone: done)."""


def _worth_retrying(exc: BaseException) -> bool:
    # A spent daily quota will not come back within a call's retries.
    return isinstance(exc, RetriableConnectorError) and not isinstance(exc, DailyLimitExceeded)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; HTTP dates are rare here)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_text(response: httpx.Response, limit: int = 300) -> str:
    """A short description of an error response, for logs and ``last_error`` (no secrets)."""
    body = response.text[:limit].replace("\n", " ")
    return (
        f"HTTP {response.status_code} {response.request.method} {response.request.url.path}: {body}"
    )


class HttpClient:
    """One vendor's HTTP API: base URL, auth headers, timeouts, retries and call counting.

    Args:
        base_url: the API root; overridable for sandboxes, proxies and test servers.
        headers: sent on every request (auth); never logged.
        timeout: seconds for connect, read, write and pool each.
        max_attempts: tries per call before the error is raised to the caller.
        backoff_base: first backoff in seconds, doubled per attempt with jitter.
        backoff_max: cap on one wait, including a server's ``Retry-After``.
        sleep: the sleep function (tests inject one that records and returns at once).
        transport: an httpx transport (tests may inject one).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.sleep = sleep
        self.calls = 0
        self._pending_delay = 0.0
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=dict(headers or {}),
            timeout=httpx.Timeout(timeout),
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    # --- hooks --------------------------------------------------------------------------

    def classify(self, response: httpx.Response) -> None:
        """Raise the right connector error for a failed response; return if it succeeded."""
        status = response.status_code
        if status < 400:
            return
        if status in RETRYABLE_STATUS:
            raise RetriableConnectorError(
                error_text(response), retry_after=self.retry_after(response)
            )
        if status == 404:
            raise NotFound(error_text(response))
        raise FatalConnectorError(error_text(response))

    def retry_after(self, response: httpx.Response) -> float | None:
        """Seconds the server asked us to wait, from ``Retry-After`` or vendor headers."""
        return parse_retry_after(response.headers.get("Retry-After"))

    def throttle_delay(self, response: httpx.Response) -> float:
        """Seconds to wait before the next call, read from the vendor's rate-limit headers."""
        return 0.0

    def validate_response(self, response: httpx.Response) -> None:
        """Check a successful response's shape; raise a connector error if it is wrong."""

    def next_page(self, response: httpx.Response) -> dict[str, Any] | None:
        """Request changes (params or JSON body) for the next page, or None on the last."""
        return None

    # --- calls --------------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        if asked is not None:
            return float(min(asked, self.backoff_max))
        backoff = self.backoff_base * 2 ** (state.attempt_number - 1)
        return float(min(backoff * (0.5 + random.random() / 2), self.backoff_max))

    def _send_once(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        if self._pending_delay > 0:
            delay, self._pending_delay = self._pending_delay, 0.0
            self.sleep(delay)
        self.calls += 1
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:  # timeouts, refused and reset connections
            raise RetriableConnectorError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        self._pending_delay = self.throttle_delay(response)
        self.classify(response)
        self.validate_response(response)
        return response

    def request(
        self, method: str, path: str, *, attempts: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send one request with the retry policy; return the successful response.

        ``attempts`` overrides ``max_attempts``; 1 sends a non-idempotent write once, so
        the caller can check whether it landed before trying again.

        Raises:
            RetriableConnectorError: still failing after ``max_attempts`` tries.
            FatalConnectorError: an error retrying will not fix.
        """
        retrying = Retrying(
            stop=stop_after_attempt(attempts or self.max_attempts),
            retry=retry_if_exception(_worth_retrying),
            wait=self._wait,
            sleep=self.sleep,
            reraise=True,
        )
        return retrying(self._send_once, method, path, kwargs)

    def paginate(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """Yield every page of a listing, following :meth:`next_page`."""
        while True:
            response = self.request(method, path, **kwargs)
            yield response
            changes = self.next_page(response)
            if changes is None:
                return
            for key, value in changes.items():
                kwargs[key] = {**(kwargs.get(key) or {}), **value}


def env_setting(connector: str, key: str, default: str | None = None) -> str | None:
    """``NURTURE_<CONNECTOR>_<KEY>`` from the environment (CLI use without a Prefect block)."""
    import os

    return os.environ.get(f"NURTURE_{connector.upper()}_{key.upper()}", default)


def secret_value(value: Any) -> str:
    """The plain text of a SecretStr or str credential (only ever put into headers)."""
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter else value)


def split_invalid_emails(
    items: Sequence[PromotionItem],
) -> tuple[list[PromotionItem], dict[int, PushResult]]:
    """Items worth sending, and a fatal result for each whose email would pollute the CRM."""
    good: list[PromotionItem] = []
    bad: dict[int, PushResult] = {}
    for item in items:
        if valid_email(item.email):
            good.append(item)
        else:
            bad[item.promotion_id] = PushResult(
                item.promotion_id, False, error=f"invalid email {item.email!r}"
            )
    return good, bad


def valid_email(email: str | None) -> bool:
    """A cheap check that keeps empty and obviously invalid emails out of the CRM."""
    if not email or email.count("@") != 1 or any(c.isspace() for c in email):
        return False
    local, domain = email.split("@")
    return bool(local) and "." in domain.strip(".")


_D = TypeVar("_D")


def crm_time(value: Any, default: _D) -> datetime | _D:
    """A CRM timestamp as an aware datetime: ISO 8601 (``Z``, ``+0000``, or no offset, read
    as UTC) or epoch milliseconds. ``default`` when it is absent or unreadable: a record
    with a bad date is still taken, never the reason a whole pull fails."""
    text = "" if value is None else str(value).strip()
    try:
        if text.isdigit():
            return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return default
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
