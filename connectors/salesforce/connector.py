"""The Salesforce connector: OAuth client credentials, composite upsert by external id.

Leads are upserted 200 at a time by the external id field (``Nurture_Id__c`` =
``lead-<id>``), so retries and re-runs after a crash update the same record. A 401
``INVALID_SESSION_ID`` refreshes the token once; a 403 ``REQUEST_LIMIT_EXCEEDED`` raises
:class:`~nurture.connectors.base.DailyLimitExceeded`, which the promotion queue turns into a pause
until the next day. Pull-back queries ``SystemModstamp`` from the high-water mark minus the
overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
    secret_value,
    split_invalid_emails,
)
from nurture.connectors.salesforce import settings
from nurture.crm import (
    ContactIn,
    FatalConnectorError,
    PromotionItem,
    PushResult,
    RetriableConnectorError,
    StageChange,
)
from nurture.crm.mapping import FieldRule, apply_mapping, load_mapping, parse_mapping


class SessionExpired(FatalConnectorError):
    """401 INVALID_SESSION_ID: the access token must be refreshed."""


def _codes(response: httpx.Response) -> set[str]:
    try:
        body = response.json()
    except ValueError:
        return set()
    items = body if isinstance(body, list) else [body]
    return {str(e.get("errorCode")) for e in items if isinstance(e, dict)}


class SalesforceClient(HttpClient):
    """Salesforce's REST API: errors are JSON arrays with an ``errorCode``."""

    def classify(self, response: httpx.Response) -> None:
        """403 REQUEST_LIMIT_EXCEEDED is the daily limit; 401 INVALID_SESSION_ID refreshes."""
        if response.status_code == 403 and "REQUEST_LIMIT_EXCEEDED" in _codes(response):
            raise DailyLimitExceeded(f"Salesforce daily API limit: {error_text(response)}")
        if response.status_code == 401 and "INVALID_SESSION_ID" in _codes(response):
            raise SessionExpired(error_text(response))
        super().classify(response)


class SalesforceConnector:
    """Pushes promoted leads into Salesforce Leads and pulls status changes back.

    Args:
        client_id: connected app consumer key (``NURTURE_SALESFORCE_CLIENT_ID``).
        client_secret: consumer secret (``NURTURE_SALESFORCE_CLIENT_SECRET``).
        login_url: login or My Domain URL (``NURTURE_SALESFORCE_LOGIN_URL``).
        instance_url: overrides the token's ``instance_url`` (proxies, tests).
        batch_size: records per composite call (default 200).
        external_id_field: the Lead's external id field (default ``Nurture_Id__c``).
        mapping: field rules or a YAML file with a ``salesforce`` section.
        overlap: how far before the high-water mark a pull starts again.
        opportunity_stage: with a StageName (``NURTURE_SALESFORCE_OPPORTUNITY_STAGE``), an
            Opportunity is upserted per lead (external id ``opp-lead-<id>``), closing in
            ``close_days`` from ``clock()``.
        client: options for :class:`SalesforceClient` (timeout, max_attempts, sleep...).
    """

    name = "salesforce"

    def __init__(
        self,
        client_id: str | None = None,
        client_secret: SecretStr | str | None = None,
        login_url: str | None = None,
        instance_url: str | None = None,
        batch_size: int | None = None,
        external_id_field: str | None = None,
        mapping: list[FieldRule] | Path | str | None = None,
        overlap: timedelta = timedelta(minutes=5),
        api_version: str = settings.API_VERSION,
        opportunity_stage: str | None = None,
        close_days: int = 30,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        **client: Any,
    ) -> None:
        self.client_id = client_id or env_setting(self.name, "client_id")
        secret = client_secret or env_setting(self.name, "client_secret")
        if not self.client_id or not secret:
            raise FatalConnectorError(
                "salesforce: set NURTURE_SALESFORCE_CLIENT_ID and NURTURE_SALESFORCE_CLIENT_SECRET"
            )
        self._secret = SecretStr(secret_value(secret))
        self.login_url = login_url or env_setting(self.name, "login_url", settings.LOGIN_URL) or ""
        self.instance_override = instance_url or env_setting(self.name, "instance_url")
        self.batch_size = int(batch_size or env_setting(self.name, "batch_size", "200") or 200)
        self.field = external_id_field or settings.EXTERNAL_ID_FIELD
        self.overlap = overlap
        self.version = api_version
        self.opportunity_stage = opportunity_stage or env_setting(self.name, "opportunity_stage")
        self.close_days = close_days
        self.clock = clock
        source = mapping or env_setting("crm", "mapping")
        rules = source if isinstance(source, list) else None
        if rules is None and source:
            rules = load_mapping(Path(str(source)), self.name)
        self.rules = rules or parse_mapping(settings.DEFAULT_MAPPING, "salesforce default")
        self._client_options = client
        self.login = HttpClient(self.login_url, **client)
        self.api: SalesforceClient | None = None
        self.token_requests = 0

    def __repr__(self) -> str:
        return f"SalesforceConnector(login_url={self.login_url!r}, client_id={self.client_id!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self.login.close()
        if self.api:
            self.api.close()

    def check(self) -> str:
        """Get an access token with the client credentials, for ``nurture doctor``.

        Raises:
            ConnectorError: Salesforce refused the credentials or did not answer.
        """
        api = self._authenticate()
        return f"client credentials accepted; instance {api.base_url}"

    @property
    def calls(self) -> int:
        """HTTP calls made, token requests included."""
        return self.login.calls + (self.api.calls if self.api else 0)

    def _authenticate(self) -> SalesforceClient:
        self.token_requests += 1
        token = self.login.request(
            "POST",
            settings.TOKEN_PATH,
            data={
                "grant_type": "client_credentials",
                "client_id": self.client_id,
                "client_secret": self._secret.get_secret_value(),
            },
        ).json()
        if "access_token" not in token or "instance_url" not in token:
            raise FatalConnectorError("salesforce: token response without access_token")
        calls = self.api.calls if self.api else 0
        if self.api:
            self.api.close()
        self.api = SalesforceClient(
            self.instance_override or token["instance_url"],
            headers={"Authorization": f"Bearer {token['access_token']}"},
            **self._client_options,
        )
        self.api.calls = calls
        return self.api

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call; an expired session is refreshed once, then the error stands."""
        api = self.api or self._authenticate()
        try:
            return api.request(method, path, **kwargs)
        except SessionExpired:
            return self._authenticate().request(method, path, **kwargs)

    def record(self, item: PromotionItem) -> dict[str, Any]:
        """The Lead record for ``item`` (external id included, ``Id`` never)."""
        rec: dict[str, Any] = {"attributes": {"type": settings.OBJECT}}
        rec.update(apply_mapping(item, self.rules))
        status = settings.STATUS.get(item.stage)
        if status:
            rec["Status"] = status
        rec[self.field] = f"lead-{item.lead_id}"
        return rec

    def opportunity(self, item: PromotionItem, lead_sf_id: str) -> dict[str, Any]:
        """The Opportunity record for ``item``, pointing back at its Lead."""
        name = " ".join(p for p in (item.first_name, item.last_name) if p) or item.email
        close = (self.clock() + timedelta(days=self.close_days)).date().isoformat()
        return {
            "attributes": {"type": "Opportunity"},
            "Name": f"{name} ({item.company})" if item.company else name,
            "StageName": self.opportunity_stage,
            "CloseDate": close,
            settings.OPPORTUNITY_LEAD_FIELD: lead_sf_id,
            self.field: f"opp-lead-{item.lead_id}",
        }

    def _upsert(
        self, obj: str, batch: Sequence[PromotionItem], records: list[dict[str, Any]]
    ) -> dict[int, PushResult]:
        path = settings.COMPOSITE_UPSERT.format(version=self.version, object=obj, field=self.field)
        body = {"allOrNone": False, "records": records}
        answers = self._call("PATCH", path, json=body).json()
        if not isinstance(answers, list) or len(answers) != len(batch):
            raise RetriableConnectorError("salesforce: composite answer does not match batch")
        out: dict[int, PushResult] = {}
        for item, ans in zip(batch, answers, strict=True):  # answers are in input order
            if ans.get("success"):
                out[item.promotion_id] = PushResult(item.promotion_id, True, str(ans["id"]), "lead")
                continue
            errors = ans.get("errors") or []
            codes = {str(e.get("statusCode") or e.get("errorCode")) for e in errors}
            out[item.promotion_id] = PushResult(
                item.promotion_id,
                False,
                error=f"salesforce {obj}: "
                + "; ".join(f"{e.get('statusCode')}: {e.get('message')}" for e in errors),
                retryable=bool(codes & settings.RETRYABLE_RECORD_ERRORS),
            )
        return out

    def delete(self, object_type: str, external_id: str) -> None:
        """Erase a Lead (``DELETE .../sobjects/Lead/{id}``); one already gone counts as done.

        The Opportunity is the deal, not the person, and stays.
        """
        if object_type != "lead":
            return
        path = f"/services/data/{self.version}/sobjects/{settings.OBJECT}/{external_id}"
        try:
            self._call("DELETE", path)
        except NotFound:
            return

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        """Upsert Leads by external id in composite batches; one result per item."""
        good, results = split_invalid_emails(items)
        for start in range(0, len(good), self.batch_size):
            batch = good[start : start + self.batch_size]
            leads = self._upsert(settings.OBJECT, batch, [self.record(i) for i in batch])
            results.update(leads)
            ok = [i for i in batch if leads[i.promotion_id].ok]
            if self.opportunity_stage and ok:
                opps = self._upsert(
                    "Opportunity",
                    ok,
                    [self.opportunity(i, str(leads[i.promotion_id].external_id)) for i in ok],
                )
                for item in ok:  # the lead is done only when its opportunity is there too
                    if not opps[item.promotion_id].ok:
                        results[item.promotion_id] = opps[item.promotion_id]
        return [results[i.promotion_id] for i in items]

    def _query(self, soql: str, since: datetime | None) -> list[dict[str, Any]]:
        return [row for page in self._pages(soql, since, "SystemModstamp") for row in page]

    def _pages(
        self, soql: str, since: datetime | None, field: str
    ) -> Iterator[list[dict[str, Any]]]:
        """A SOQL query ordered by ``field`` from the mark minus the overlap, page by page
        (``nextRecordsUrl``)."""
        if since is not None:
            start = (since - self.overlap).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            soql += f" WHERE {field} >= {start}"
        soql += f" ORDER BY {field}"
        page = self._call(
            "GET", settings.QUERY.format(version=self.version), params={"q": soql}
        ).json()
        while True:
            yield list(page.get("records", []))
            next_url = page.get("nextRecordsUrl")
            if page.get("done", True) or not next_url:
                return
            page = self._call("GET", next_url).json()

    def pull_contacts(self, since: datetime | None, now: datetime) -> Iterator[list[ContactIn]]:
        """Leads created since ``since`` (minus overlap), by ``CreatedDate``, page by page:
        intake."""
        soql = f"SELECT Id, Email, FirstName, LastName, Company, CreatedDate FROM {settings.OBJECT}"
        for page in self._pages(soql, since, "CreatedDate"):
            yield [
                ContactIn(
                    external_id=str(rec.get("Id") or ""),
                    object_type="lead",
                    email=rec.get("Email"),
                    created_at=crm_time(rec.get("CreatedDate"), None),
                    first_name=rec.get("FirstName"),
                    last_name=rec.get("LastName"),
                    company=rec.get("Company"),
                )
                for rec in page
            ]

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        """Lead status (and Opportunity stage) changes, by ``SystemModstamp``, since the mark
        minus the overlap."""
        changes: list[StageChange] = []
        for rec in self._query(
            f"SELECT Id, Email, Status, SystemModstamp FROM {settings.OBJECT}", since
        ):
            stage = settings.STATUS_BACK.get(rec.get("Status") or "")
            if stage:
                changes.append(
                    StageChange(
                        str(rec["Id"]), "lead", stage, crm_time(rec.get("SystemModstamp"), now),
                        email=rec.get("Email"),
                    )
                )  # fmt: skip
        if self.opportunity_stage:
            lead_field = settings.OPPORTUNITY_LEAD_FIELD
            for rec in self._query(
                f"SELECT Id, StageName, {lead_field}, SystemModstamp FROM Opportunity", since
            ):
                stage = settings.OPPORTUNITY_BACK.get(rec.get("StageName") or "")
                if stage and rec.get(lead_field):
                    changes.append(
                        StageChange(
                            str(rec[lead_field]),
                            "lead",
                            stage,
                            crm_time(rec.get("SystemModstamp"), now),
                        )
                    )
        return changes
