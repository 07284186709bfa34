"""The HubSpot connector: contacts by batch upsert, optional deals, pull-back by search.

A lead we have never linked is upserted by email; a linked lead is updated by its HubSpot
id, so email is used to match only the first time. Deals are upserted by a unique custom
property (``nurture_key`` = ``lead-<id>``) so a retry or a re-run after a crash never
creates a second deal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from nurture.connectors.base import (
    HttpClient,
    NotFound,
    crm_time,
    env_setting,
    error_text,
    secret_value,
    valid_email,
)
from nurture.connectors.hubspot import settings
from nurture.crm import (
    ContactIn,
    FatalConnectorError,
    PromotionItem,
    PushResult,
    RetriableConnectorError,
    StageChange,
)
from nurture.crm.mapping import FieldRule, apply_mapping, load_mapping, parse_mapping


class HubSpotClient(HttpClient):
    """HubSpot's HTTP API: policy-aware 429s and the secondly/daily headers."""

    def classify(self, response: httpx.Response) -> None:
        """429 (any policy) and 5xx retry; a spent daily quota waits for the reset."""
        if response.status_code == 429:
            policy = _json(response).get("policyName") or "unknown"
            wait = self.retry_after(response)
            if policy == "DAILY":
                wait = max(wait or 0.0, 3600.0)
            elif wait is None:
                wait = 10.0 if policy == "TEN_SECONDLY_ROLLING" else 1.0
            raise RetriableConnectorError(
                f"HubSpot rate limit ({policy}): {error_text(response)}", retry_after=wait
            )
        super().classify(response)

    def throttle_delay(self, response: httpx.Response) -> float:
        """Pause for the rest of the second when the secondly budget is spent."""
        remaining = response.headers.get("X-HubSpot-RateLimit-Secondly-Remaining")
        if remaining is not None and remaining.strip() == "0":
            return 1.0
        return 0.0


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class HubSpotConnector:
    """Pushes promoted leads into HubSpot and pulls stage changes back.

    Args:
        token: private-app or OAuth token (``NURTURE_HUBSPOT_TOKEN``).
        base_url: API root (``NURTURE_HUBSPOT_BASE_URL``).
        batch_size: inputs per batch call (``NURTURE_HUBSPOT_BATCH_SIZE``, default 100).
        pipeline: deal pipeline id; with ``deal_stage`` a deal is upserted per lead.
        deal_stage: deal stage internal id (``NURTURE_HUBSPOT_DEAL_STAGE``).
        mapping: field rules, or a YAML file (``NURTURE_CRM_MAPPING``) with a hubspot section.
        overlap: how far before the high-water mark a pull starts again.
        client: options for :class:`HubSpotClient` (timeout, max_attempts, sleep...).
    """

    name = "hubspot"

    def __init__(
        self,
        token: SecretStr | str | None = None,
        base_url: str | None = None,
        batch_size: int | None = None,
        pipeline: str | None = None,
        deal_stage: str | None = None,
        mapping: list[FieldRule] | Path | str | None = None,
        overlap: timedelta = timedelta(minutes=5),
        **client: Any,
    ) -> None:
        token = token or env_setting(self.name, "token")
        if not token:
            raise FatalConnectorError("hubspot: no token (set NURTURE_HUBSPOT_TOKEN)")
        self.batch_size = int(batch_size or env_setting(self.name, "batch_size", "100") or 100)
        self.pipeline = pipeline or env_setting(self.name, "pipeline")
        self.deal_stage = deal_stage or env_setting(self.name, "deal_stage")
        self.overlap = overlap
        self.rules = _rules(mapping or env_setting("crm", "mapping"), self.name)
        self.client = HubSpotClient(
            base_url or env_setting(self.name, "base_url", settings.BASE_URL) or "",
            headers={"Authorization": f"Bearer {secret_value(token)}"},
            **client,
        )

    def __repr__(self) -> str:
        return f"HubSpotConnector(base_url={self.client.base_url!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    def check(self) -> str:
        """One cheap authenticated call (the deal pipelines), for ``nurture doctor``.

        Raises:
            ConnectorError: HubSpot refused the token or did not answer.
        """
        self.client.request("GET", settings.PIPELINES, attempts=1)
        return f"token accepted by {self.client.base_url}"

    def delete(self, object_type: str, external_id: str) -> None:
        """Erase a contact with HubSpot's GDPR delete (``POST .../contacts/gdpr-delete``).

        A deal is not the person: it is left alone (its contact association goes with the
        contact). A contact that is already gone counts as deleted.
        """
        if object_type != "contact":
            return
        try:
            self.client.request("POST", settings.GDPR_DELETE, json={"objectId": str(external_id)})
        except NotFound:
            return

    # --- push ---------------------------------------------------------------------------

    def properties(self, item: PromotionItem) -> dict[str, Any]:
        """The contact properties for ``item``: the field mapping plus its lifecycle stage."""
        props = apply_mapping(item, self.rules)
        stage = settings.LIFECYCLE.get(item.stage)
        if stage:
            props["lifecyclestage"] = stage
        return props

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        """Upsert the contacts (and deals) for ``items``; one result per item."""
        results: dict[int, PushResult] = {}
        fresh: list[PromotionItem] = []
        linked: list[PromotionItem] = []
        for item in items:
            if item.external_id:
                linked.append(item)
            elif valid_email(item.email):
                fresh.append(item)
            else:
                results[item.promotion_id] = PushResult(
                    item.promotion_id, False, error=f"invalid email {item.email!r}"
                )
        for start in range(0, len(fresh), self.batch_size):
            results.update(self._upsert_by_email(fresh[start : start + self.batch_size]))
        for start in range(0, len(linked), self.batch_size):
            results.update(self._update_by_id(linked[start : start + self.batch_size]))
        if self.pipeline and self.deal_stage:
            ok = [i for i in items if results[i.promotion_id].ok]
            for start in range(0, len(ok), self.batch_size):
                batch = ok[start : start + self.batch_size]
                self._upsert_deals(batch, {i.promotion_id: results[i.promotion_id] for i in batch})
        return [results[i.promotion_id] for i in items]

    def _upsert_by_email(self, batch: list[PromotionItem]) -> dict[int, PushResult]:
        inputs = []
        for item in batch:
            props = self.properties(item)
            props["email"] = item.email.strip().lower()
            inputs.append({"idProperty": "email", "id": props["email"], "properties": props})
        body = self.client.request("POST", settings.UPSERT_CONTACTS, json={"inputs": inputs}).json()
        by_email = {
            str((r.get("properties") or {}).get("email", "")).lower(): str(r["id"])
            for r in body.get("results", [])
        }
        return self._match(batch, by_email, lambda i: i.email.strip().lower(), body)

    def _update_by_id(self, batch: list[PromotionItem]) -> dict[int, PushResult]:
        inputs = [{"id": i.external_id, "properties": self.properties(i)} for i in batch]
        body = self.client.request("POST", settings.UPDATE_CONTACTS, json={"inputs": inputs}).json()
        by_id = {str(r["id"]): str(r["id"]) for r in body.get("results", [])}
        return self._match(batch, by_id, lambda i: str(i.external_id), body)

    def _match(
        self, batch: list[PromotionItem], found: dict[str, str], key: Any, body: dict[str, Any]
    ) -> dict[int, PushResult]:
        # Per-record errors name the ids they concern; they are validation errors (fatal).
        failed: dict[str, str] = {}
        for err in body.get("errors") or []:
            ids = ((err.get("context") or {}).get("ids")) or []
            for ident in ids:
                failed[str(ident).lower()] = str(err.get("message") or err.get("category"))
        out: dict[int, PushResult] = {}
        for item in batch:
            k = key(item)
            if k in found:
                out[item.promotion_id] = PushResult(item.promotion_id, True, found[k], "contact")
            elif k.lower() in failed:
                out[item.promotion_id] = PushResult(
                    item.promotion_id, False, error=f"hubspot: {failed[k.lower()]}"
                )
            else:
                out[item.promotion_id] = PushResult(
                    item.promotion_id, False, error="hubspot: missing from response", retryable=True
                )
        return out

    def _upsert_deals(self, batch: list[PromotionItem], contacts: dict[int, PushResult]) -> None:
        inputs = []
        for item in batch:
            name = " ".join(p for p in (item.first_name, item.last_name) if p) or item.email
            key = f"lead-{item.lead_id}"
            inputs.append(
                {
                    "idProperty": settings.DEAL_KEY_PROPERTY,
                    "id": key,
                    "properties": {
                        # Also among the properties, so that the response always carries it
                        # and results match inputs whether or not HubSpot echoes `id`.
                        settings.DEAL_KEY_PROPERTY: key,
                        "dealname": f"{name} ({item.company})" if item.company else name,
                        "pipeline": self.pipeline,
                        "dealstage": self.deal_stage,
                        settings.DEAL_CONTACT_PROPERTY: contacts[item.promotion_id].external_id,
                    },
                }
            )
        body = self.client.request("POST", settings.UPSERT_DEALS, json={"inputs": inputs}).json()
        deal_by_key = {
            str((r.get("properties") or {}).get(settings.DEAL_KEY_PROPERTY)): str(r["id"])
            for r in body.get("results", [])
        }
        pairs = []
        for item in batch:
            deal = deal_by_key.get(f"lead-{item.lead_id}")
            if deal is None:
                raise RetriableConnectorError(f"hubspot: deal for lead {item.lead_id} missing")
            pairs.append(
                {"from": {"id": deal}, "to": {"id": contacts[item.promotion_id].external_id}}
            )
        self.client.request("POST", settings.ASSOCIATE_DEALS_CONTACTS, json={"inputs": pairs})

    # --- pull ---------------------------------------------------------------------------

    def _search(self, obj: str, prop: str, since: datetime | None, props: list[str]) -> list[Any]:
        return [rec for page in self._pages(obj, prop, since, props) for rec in page]

    def _pages(
        self, obj: str, prop: str, since: datetime | None, props: list[str]
    ) -> Iterator[list[Any]]:
        """Search results page by page, ascending by ``prop``."""
        filters: list[dict[str, Any]] = []
        if since is not None:
            start = since - self.overlap
            filters.append(
                {
                    "propertyName": prop,
                    "operator": "GTE",
                    "value": str(int(start.timestamp() * 1000)),
                }
            )
        body: dict[str, Any] = {
            "filterGroups": [{"filters": filters}] if filters else [],
            "properties": props,
            "sorts": [{"propertyName": prop, "direction": "ASCENDING"}],
            "limit": settings.SEARCH_LIMIT,
            "after": 0,
        }
        path = settings.SEARCH.format(object=obj)
        while True:
            page = self.client.request("POST", path, json=body).json()
            yield list(page.get("results", []))
            after = ((page.get("paging") or {}).get("next") or {}).get("after")
            if after is None or int(after) >= settings.SEARCH_MAX_RESULTS:
                return
            body = {**body, "after": after}

    def pull_contacts(self, since: datetime | None, now: datetime) -> Iterator[list[ContactIn]]:
        """Contacts created since ``since`` (minus overlap), by ``createdate``, page by page:
        intake."""
        props = ["email", "firstname", "lastname", "company", "createdate"]
        for page in self._pages("contacts", "createdate", since, props):
            yield [_contact(rec) for rec in page]

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        """Contact lifecycle and deal stage changes modified since ``since`` (minus overlap)."""
        changes: list[StageChange] = []
        for rec in self._search(
            "contacts", "lastmodifieddate", since, ["email", "lifecyclestage", "lastmodifieddate"]
        ):
            props = rec.get("properties") or {}
            stage = settings.LIFECYCLE_BACK.get(props.get("lifecyclestage") or "")
            if stage:
                changes.append(
                    StageChange(
                        str(rec["id"]),
                        "contact",
                        stage,
                        crm_time(props.get("lastmodifieddate") or rec.get("updatedAt"), now),
                        email=props.get("email"),
                    )
                )
        if self.pipeline:
            for rec in self._search(
                "deals",
                "hs_lastmodifieddate",
                since,
                ["dealstage", "pipeline", settings.DEAL_CONTACT_PROPERTY, "hs_lastmodifieddate"],
            ):
                props = rec.get("properties") or {}
                stage = settings.DEAL_STAGES_BACK.get(props.get("dealstage") or "")
                contact = props.get(settings.DEAL_CONTACT_PROPERTY)
                if stage and contact and props.get("pipeline") == self.pipeline:
                    changes.append(
                        StageChange(
                            str(contact),
                            "contact",
                            stage,
                            crm_time(props.get("hs_lastmodifieddate") or rec.get("updatedAt"), now),
                        )
                    )
        return changes


def _contact(rec: Any) -> ContactIn:
    props = rec.get("properties") or {}
    return ContactIn(
        external_id=str(rec.get("id") or ""),
        object_type="contact",
        email=props.get("email"),
        created_at=crm_time(props.get("createdate") or rec.get("createdAt"), None),
        first_name=props.get("firstname"),
        last_name=props.get("lastname"),
        company=props.get("company"),
    )


def _rules(mapping: list[FieldRule] | Path | str | None, name: str) -> list[FieldRule]:
    if isinstance(mapping, list):
        return mapping
    if mapping:
        loaded = load_mapping(Path(mapping), name)
        if loaded is not None:
            return loaded
    return parse_mapping(settings.DEFAULT_MAPPING, f"{name} default mapping")
