"""The Pipedrive connector: v2 persons (matched by email once), v2 deals, token rate limits.

Pipedrive has no batch upsert and lets two persons share an email, so the connector makes
writes idempotent itself: a lead without a link is searched by exact email before a person
is created, and a deal is created only if the person has none in the configured pipeline.
The burst headers (``x-ratelimit-remaining``/``-reset``) pace the calls; a spent daily
budget (``x-daily-requests-left: 0``) pauses the connector until the next day.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from nurture.connectors.base import (
    DailyLimitExceeded,
    HttpClient,
    NotFound,
    crm_time,
    env_setting,
    error_text,
    parse_retry_after,
    secret_value,
    valid_email,
)
from nurture.connectors.pipedrive import settings
from nurture.crm import (
    ConnectorError,
    ContactIn,
    FatalConnectorError,
    PromotionItem,
    PushResult,
    RetriableConnectorError,
    StageChange,
)
from nurture.crm.mapping import FieldRule, apply_mapping, load_mapping, parse_mapping


class PipedriveClient(HttpClient):
    """Pipedrive's API: the success envelope and token-based rate-limit headers."""

    def retry_after(self, response: httpx.Response) -> float | None:
        """``Retry-After`` if sent, else the burst window's ``x-ratelimit-reset``."""
        return parse_retry_after(response.headers.get("Retry-After")) or parse_retry_after(
            response.headers.get("x-ratelimit-reset")
        )

    def classify(self, response: httpx.Response) -> None:
        """A 429 with no daily requests left is the daily budget: pause, do not loop."""
        if response.status_code == 429 and response.headers.get("x-daily-requests-left") == "0":
            raise DailyLimitExceeded(f"Pipedrive daily budget: {error_text(response)}")
        super().classify(response)

    def throttle_delay(self, response: httpx.Response) -> float:
        """Wait for the burst window to reset when it is spent."""
        if response.headers.get("x-ratelimit-remaining", "").strip() == "0":
            return parse_retry_after(response.headers.get("x-ratelimit-reset")) or 2.0
        return 0.0

    def validate_response(self, response: httpx.Response) -> None:
        """A 2xx must still say ``success: true``."""
        try:
            body = response.json()
        except ValueError:
            raise RetriableConnectorError(f"Pipedrive: not JSON: {error_text(response)}") from None
        if not isinstance(body, dict) or body.get("success") is not True:
            raise FatalConnectorError(f"Pipedrive: unsuccessful: {error_text(response)}")


class PipedriveConnector:
    """Pushes promoted leads as Pipedrive persons (and deals) and pulls deal outcomes back.

    Args:
        token: API token (``NURTURE_PIPEDRIVE_TOKEN``), sent as ``api_token``.
        base_url: ``https://{company}.pipedrive.com`` (``NURTURE_PIPEDRIVE_BASE_URL``).
        pipeline_id: with ``stage_id``, a deal is created per lead in that stage.
        stage_id: the deal stage id (``NURTURE_PIPEDRIVE_STAGE_ID``).
        create_lead: also create a v1 lead (the Leads Inbox) per person, once
            (``NURTURE_PIPEDRIVE_CREATE_LEAD=1``).
        batch_size: leads per push call (Pipedrive has no batch API; default 100).
        mapping: field rules or a YAML file with a ``pipedrive`` section.
        overlap: how far before the high-water mark a pull starts again.
        client: options for :class:`PipedriveClient` (timeout, max_attempts, sleep...).
    """

    name = "pipedrive"

    def __init__(
        self,
        token: SecretStr | str | None = None,
        base_url: str | None = None,
        pipeline_id: int | str | None = None,
        stage_id: int | str | None = None,
        create_lead: bool | None = None,
        batch_size: int | None = None,
        mapping: list[FieldRule] | Path | str | None = None,
        overlap: timedelta = timedelta(minutes=5),
        **client: Any,
    ) -> None:
        token = token or env_setting(self.name, "token")
        if not token:
            raise FatalConnectorError("pipedrive: no token (set NURTURE_PIPEDRIVE_TOKEN)")
        self._token = SecretStr(secret_value(token))
        pipeline = pipeline_id or env_setting(self.name, "pipeline_id")
        stage = stage_id or env_setting(self.name, "stage_id")
        self.pipeline_id = int(pipeline) if pipeline else None
        self.stage_id = int(stage) if stage else None
        if create_lead is None:
            create_lead = (env_setting(self.name, "create_lead", "") or "") in ("1", "true")
        self.create_lead = create_lead
        self.batch_size = int(batch_size or env_setting(self.name, "batch_size", "100") or 100)
        self.overlap = overlap
        source = mapping or env_setting("crm", "mapping")
        rules = source if isinstance(source, list) else None
        if rules is None and source:
            rules = load_mapping(Path(str(source)), self.name)
        self.rules = rules or parse_mapping(settings.DEFAULT_MAPPING, "pipedrive default")
        self.client = PipedriveClient(
            base_url or env_setting(self.name, "base_url", settings.BASE_URL) or "", **client
        )

    def __repr__(self) -> str:
        return f"PipedriveConnector(base_url={self.client.base_url!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    def check(self) -> str:
        """One cheap authenticated call (one deal), for ``nurture doctor``.

        Raises:
            ConnectorError: Pipedrive refused the token or did not answer.
        """
        self._call("GET", settings.DEALS, params={"limit": 1}, attempts=1)
        return f"token accepted by {self.client.base_url}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        params = {**(kwargs.pop("params", None) or {}), "api_token": self._token.get_secret_value()}
        return self.client.request(method, path, params=params, **kwargs).json()

    def person(self, item: PromotionItem) -> dict[str, Any]:
        """The v2 person body for ``item``."""
        props = apply_mapping(item, self.rules)
        email = props.pop("email", item.email.strip().lower())
        first, last = props.pop("first_name", None), props.pop("last_name", None)
        body: dict[str, Any] = {
            "name": " ".join(p for p in (first, last) if p) or email,
            "emails": [{"value": email, "primary": True, "label": "work"}],
        }
        if props:
            body["custom_fields"] = props
        return body

    def _find_person(self, email: str) -> str | None:
        found = self._call(
            "GET",
            settings.PERSON_SEARCH,
            params={"term": email, "fields": "email", "exact_match": "true", "limit": 2},
        )
        items = ((found.get("data") or {}).get("items")) or []
        ids = sorted(int(i["item"]["id"]) for i in items if i.get("item"))
        return str(ids[0]) if ids else None  # the oldest, if sales already made duplicates

    def _find_deal(self, person_id: str) -> str | None:
        deals = self._call(
            "GET",
            settings.DEALS,
            params={"person_id": person_id, "pipeline_id": self.pipeline_id, "limit": 1},
        )
        return str(deals["data"][0]["id"]) if deals.get("data") else None

    def _create_once(self, find: Any, path: str, body: dict[str, Any]) -> str:
        """POST is not idempotent: a lost answer is followed by a lookup, not a blind retry."""
        for attempt in range(self.client.max_attempts):
            if attempt:
                found = find()
                if found:
                    return str(found)
                self.client.sleep(self.client.backoff_base * 2**attempt)
            try:
                return str(self._call("POST", path, json=body, attempts=1)["data"]["id"])
            except RetriableConnectorError as exc:
                if (
                    getattr(exc, "pause_until_next_day", False)
                    or attempt + 1 == self.client.max_attempts
                ):
                    raise
                if exc.retry_after:
                    self.client.sleep(min(exc.retry_after, self.client.backoff_max))
        raise RetriableConnectorError(f"pipedrive: could not create {path}")  # pragma: no cover

    def _push_one(self, item: PromotionItem) -> PushResult:
        body = self.person(item)
        email = item.email.strip().lower()
        person_id = item.external_id or self._find_person(email)
        existing = bool(person_id)
        if person_id:
            self._call("PATCH", settings.PERSON.format(id=person_id), json=body)
        else:
            person_id = self._create_once(lambda: self._find_person(email), settings.PERSONS, body)
        # A person we just created has no deal yet: only an existing one needs the lookup.
        wants_deal = self.pipeline_id and self.stage_id
        if wants_deal and not (existing and self._find_deal(person_id)):
            pid = person_id
            self._create_once(
                lambda: self._find_deal(pid),
                settings.DEALS,
                {
                    "title": f"{body['name']} - {item.company or 'inbound'}",
                    "person_id": int(person_id),
                    "pipeline_id": self.pipeline_id,
                    "stage_id": self.stage_id,
                },
            )
        if self.create_lead and not (existing and self._find_lead(person_id)):
            pid = person_id
            self._create_once(
                lambda: self._find_lead(pid),
                settings.LEADS,
                {"title": f"{body['name']} - {item.stage}", "person_id": int(person_id)},
            )
        return PushResult(item.promotion_id, True, person_id, "person")

    def _find_lead(self, person_id: str) -> str | None:
        leads = self._call("GET", settings.LEADS, params={"person_id": person_id, "limit": 1})
        return str(leads["data"][0]["id"]) if leads.get("data") else None

    def delete(self, object_type: str, external_id: str) -> None:
        """Erase a person (``DELETE /api/v2/persons/{id}``); one already gone counts as done."""
        if object_type != "person":
            return
        try:
            self._call("DELETE", f"/api/v2/persons/{int(external_id)}")
        except NotFound:
            return

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        """Create or update each person (and its deal); one result per item."""
        results: list[PushResult] = []
        for item in items:
            if not item.external_id and not valid_email(item.email):
                results.append(
                    PushResult(item.promotion_id, False, error=f"invalid email {item.email!r}")
                )
                continue
            try:
                results.append(self._push_one(item))
            except DailyLimitExceeded:
                raise
            except RetriableConnectorError as exc:
                # The CRM is failing: the rest of the batch would fail too.
                results.extend(
                    PushResult(i.promotion_id, False, error=str(exc), retryable=True)
                    for i in items[len(results) :]
                )
                break
            except ConnectorError as exc:
                results.append(PushResult(item.promotion_id, False, error=str(exc)))
        return results

    def pull_contacts(self, since: datetime | None, now: datetime) -> Iterator[list[ContactIn]]:
        """Persons created since ``since`` (minus overlap), page by page, oldest first: intake.

        v2 lists persons by ``updated_since`` only; a person created after the mark was
        also updated after it, so that filter is a superset, sorted by ``add_time`` and
        narrowed here to the persons added since the mark.
        """
        params: dict[str, Any] = {
            "limit": settings.PAGE_LIMIT,
            "sort_by": "add_time",
            "sort_direction": "asc",
        }
        start = None
        if since is not None:
            start = (since - self.overlap).astimezone(UTC)
            params["updated_since"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        while True:
            page = self._call("GET", settings.PERSONS, params=dict(params))
            contacts = [_person(p) for p in page.get("data") or []]
            # An unreadable add_time: taken (intake links each record once).
            yield [
                c
                for c in contacts
                if start is None or c.created_at is None or c.created_at >= start
            ]
            cursor = (page.get("additional_data") or {}).get("next_cursor")
            if not cursor:
                return
            params["cursor"] = cursor

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        """Won and lost deals updated since the mark minus the overlap (cursor paging)."""
        params: dict[str, Any] = {"limit": settings.PAGE_LIMIT, "sort_by": "update_time"}
        if self.pipeline_id:
            params["pipeline_id"] = self.pipeline_id
        if since is not None:
            start = (since - self.overlap).astimezone(UTC)
            params["updated_since"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        changes: list[StageChange] = []
        while True:
            page = self._call("GET", settings.DEALS, params=dict(params))
            for deal in page.get("data") or []:
                stage = settings.STATUS_BACK.get(deal.get("status") or "")
                if stage and deal.get("person_id"):
                    when = crm_time(deal.get("update_time"), now)
                    changes.append(StageChange(str(deal["person_id"]), "person", stage, when))
            cursor = (page.get("additional_data") or {}).get("next_cursor")
            if not cursor:
                return changes
            params["cursor"] = cursor


def _person(rec: dict[str, Any]) -> ContactIn:
    """A v2 person as an intake record: its primary email (else the first one)."""
    emails = [e for e in rec.get("emails") or [] if isinstance(e, dict) and e.get("value")]
    primary = next((e for e in emails if e.get("primary")), emails[0] if emails else None)
    return ContactIn(
        external_id=str(rec.get("id") or ""),
        object_type="person",
        email=str(primary["value"]) if primary else None,
        created_at=crm_time(rec.get("add_time"), None),
        first_name=rec.get("first_name"),
        last_name=rec.get("last_name"),
    )
