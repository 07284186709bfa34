"""A stateful fake of HubSpot CRM v3: contacts, deals, pipelines, search, rate limits.

Contacts are unique by email (case-insensitive); deals by the unique custom property
``nurture_key``. Batch upserts create or update and say which (``new``); invalid emails
come back in ``errors`` with their ids (207). Faults follow :class:`tests.fakes.base.Faults`;
a 429 carries HubSpot's policy body and sometimes ``Retry-After``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.base import FakeCrm, iso, json_response

BATCH_LIMIT = 100
UNIQUE = {"contacts": "email", "deals": "nurture_key"}
PIPELINES = {
    "default": [
        "appointmentscheduled",
        "qualifiedtobuy",
        "presentationscheduled",
        "decisionmakerboughtin",
        "contractsent",
        "closedwon",
        "closedlost",
    ]
}


class FakeHubSpot(FakeCrm):
    """HubSpot's objects in memory; ``token`` is the only accepted bearer token."""

    def __init__(self, token: str = "hs-token", clock: Callable[[], datetime] | None = None):
        super().__init__(clock)
        self.token = token
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"contacts": {}, "deals": {}}
        # Unique property value -> record, kept by every write, so an upsert is a lookup
        # rather than a scan (a 10k push was quadratic).
        self._by_unique: dict[str, dict[str, dict[str, Any]]] = {"contacts": {}, "deals": {}}
        self.associations: set[tuple[str, str]] = set()  # (deal id, contact id)
        self.batch_sizes: list[int] = []
        # False: an upsert's response carries the idProperty value only where the input's
        # properties named it (HubSpot does not document that it echoes `id`).
        self.echo_id_property = True
        self._watches: list[tuple[int, threading.Event]] = []
        self.gdpr_deleted: list[str] = []  # contact ids, in the order they were deleted

    def watch(self, contacts: int) -> threading.Event:
        """An event set once at least ``contacts`` contacts exist (to kill a pusher then)."""
        event = threading.Event()
        self._watches.append((contacts, event))
        return event

    # --- state helpers for tests ----------------------------------------------------------

    def find(self, obj: str, prop: str, value: str) -> list[dict[str, Any]]:
        """Records of ``obj`` whose ``prop`` equals ``value``."""
        return [r for r in self.objects[obj].values() if r["properties"].get(prop) == value]

    def set_property(self, obj: str, ident: str, **props: str) -> None:
        """Change a record as a salesperson would in the HubSpot UI."""
        with self.lock:
            rec = self.objects[obj][ident]
            rec["properties"].update(props)
            self._index(obj, rec)
            self._touch(obj, rec)

    def _index(self, obj: str, rec: dict[str, Any]) -> None:
        value = rec["properties"].get(UNIQUE[obj])
        if value is not None:
            self._by_unique[obj].setdefault(value, rec)

    def _lookup(self, obj: str, value: str) -> dict[str, Any] | None:
        """The first record whose unique property is ``value`` (as a scan would find)."""
        rec = self._by_unique[obj].get(value)
        if rec is None or rec["properties"].get(UNIQUE[obj]) == value:
            return rec
        # The indexed record's value changed since: look the slow way, and re-index.
        del self._by_unique[obj][value]
        found = next(
            (r for r in self.objects[obj].values() if r["properties"].get(UNIQUE[obj]) == value),
            None,
        )
        if found is not None:
            self._by_unique[obj][value] = found
        return found

    def _touch(self, obj: str, rec: dict[str, Any]) -> None:
        now = self.clock()
        rec["updatedAt"] = iso(now)
        key = "lastmodifieddate" if obj == "contacts" else "hs_lastmodifieddate"
        rec["properties"][key] = str(int(now.timestamp() * 1000))

    def _write(self, obj: str, ident: str | None, props: dict[str, Any]) -> tuple[dict, bool]:
        unique = UNIQUE[obj]
        rec = None
        if ident is not None:
            value = str(ident).lower() if unique == "email" else str(ident)
            props = {**props, unique: value}
            rec = self._lookup(obj, value)
        new = rec is None
        if rec is None:
            rid = str(self.new_id())
            created = self.clock()
            rec = {
                "id": rid,
                "properties": {
                    "hs_object_id": rid,
                    "createdate": str(int(created.timestamp() * 1000)),
                },
                "createdAt": iso(created),
            }
            self.objects[obj][rid] = rec
        rec["properties"].update({k: str(v) for k, v in props.items()})
        self._index(obj, rec)
        self._touch(obj, rec)
        for n, event in self._watches:
            if len(self.objects["contacts"]) >= n:
                event.set()
        return rec, new

    # --- HTTP ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Daily": "250000",
            "X-HubSpot-RateLimit-Daily-Remaining": "249000",
            "X-HubSpot-RateLimit-Secondly": "19",
            "X-HubSpot-RateLimit-Secondly-Remaining": "18",
        }

    def _fault(self, request: Request) -> tuple[Response | None, bool]:
        """(error response to send before the write, whether to fail after the write)."""
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return json_response(
                {
                    "status": "error",
                    "message": "Authentication credentials not found.",
                    "category": "INVALID_AUTHENTICATION",
                    "correlationId": str(uuid.uuid4()),
                },
                401,
            ), False
        with self.lock:
            kind = self.faults.draw()
        if kind == "429":
            policy = self.faults.rng.choice(["SECONDLY", "TEN_SECONDLY_ROLLING"])
            headers = {**self._headers(), "X-HubSpot-RateLimit-Secondly-Remaining": "0"}
            if self.faults.rng.random() < 0.5:
                headers["Retry-After"] = "7"
            return json_response(
                {
                    "status": "error",
                    "message": "You have reached your secondly limit.",
                    "errorType": "RATE_LIMIT",
                    "correlationId": str(uuid.uuid4()),
                    "policyName": policy,
                },
                429,
                headers,
            ), False
        if kind == "5xx-before":
            return json_response(
                {"status": "error", "message": "internal error", "category": "INTERNAL_ERROR"},
                self.faults.rng.choice([500, 502, 503]),
            ), False
        return None, kind == "5xx-after"

    async def batch(self, request: Request) -> Response:
        """batch/upsert, batch/update and batch/create for contacts and deals."""
        self.count(request)
        await self.maybe_hang()
        obj, action = request.path_params["object"], request.path_params["action"]
        body = await request.json()
        error, after = self._fault(request)
        if error:
            return error
        inputs = body.get("inputs") or []
        if len(inputs) > BATCH_LIMIT:
            return json_response(
                {
                    "status": "error",
                    "category": "VALIDATION_ERROR",
                    "message": f"Batch too large: {len(inputs)} > {BATCH_LIMIT}",
                },
                400,
            )
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self.lock:
            self.batch_sizes.append(len(inputs))
            for inp in inputs:
                props = dict(inp.get("properties") or {})
                if action == "upsert":
                    if inp.get("idProperty") != UNIQUE[obj]:
                        return json_response(
                            {
                                "status": "error",
                                "category": "VALIDATION_ERROR",
                                "message": f"{inp.get('idProperty')} is not a unique property",
                            },
                            400,
                        )
                    ident = str(inp.get("id") or "")
                    if obj == "contacts" and ("@" not in ident or " " in ident):
                        errors.append(
                            {
                                "status": "error",
                                "category": "VALIDATION_ERROR",
                                "message": f"Email address {ident} is invalid",
                                "context": {"ids": [ident]},
                            }
                        )
                        continue
                    rec, new = self._write(obj, ident, props)
                elif action == "update":
                    rec = self.objects[obj].get(str(inp.get("id")))
                    if rec is None:
                        errors.append(
                            {
                                "status": "error",
                                "category": "OBJECT_NOT_FOUND",
                                "message": "Object not found",
                                "context": {"ids": [inp.get("id")]},
                            }
                        )
                        continue
                    rec["properties"].update({k: str(v) for k, v in props.items()})
                    self._index(obj, rec)
                    self._touch(obj, rec)
                    new = False
                else:
                    rec, new = self._write(obj, None, props)
                shown = dict(rec["properties"])
                if action == "upsert" and not self.echo_id_property and UNIQUE[obj] not in props:
                    shown.pop(UNIQUE[obj], None)
                results.append({**rec, "new": new, "properties": shown})
        if after:
            return json_response({"status": "error", "message": "Bad gateway"}, 502)
        out = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": iso(self.clock()),
            "completedAt": iso(self.clock()),
        }
        if errors:
            out.update(errors=errors, numErrors=len(errors))
        return json_response(out, 207 if errors else 200, self._headers())

    async def associate(self, request: Request) -> Response:
        """v4 default associations, idempotent."""
        self.count(request)
        body = await request.json()
        error, after = self._fault(request)
        if error:
            return error
        with self.lock:
            for pair in body.get("inputs") or []:
                self.associations.add((str(pair["from"]["id"]), str(pair["to"]["id"])))
        if after:
            return json_response({"status": "error", "message": "Bad gateway"}, 502)
        return json_response({"status": "COMPLETE", "results": []}, 200, self._headers())

    async def gdpr_delete(self, request: Request) -> Response:
        """POST /crm/v3/objects/contacts/gdpr-delete: permanently delete one contact (204).

        ``idProperty: email`` looks the contact up by email; an unknown one is a 404.
        """
        self.count(request)
        body = await request.json()
        error, after = self._fault(request)
        if error:
            return error
        with self.lock:
            ident = str(body.get("objectId") or "")
            if body.get("idProperty") == "email":
                rec = self._lookup("contacts", ident.lower())
            else:
                rec = self.objects["contacts"].get(ident)
            if rec is None:
                return json_response(
                    {
                        "status": "error",
                        "message": "Object not found",
                        "category": "OBJECT_NOT_FOUND",
                    },
                    404,
                )
            del self.objects["contacts"][rec["id"]]
            self._by_unique["contacts"].pop(rec["properties"].get("email"), None)
            self.associations = {a for a in self.associations if a[1] != rec["id"]}
            self.gdpr_deleted.append(rec["id"])
        if after:
            return json_response({"status": "error", "message": "Bad gateway"}, 502)
        return Response(status_code=204)

    async def search(self, request: Request) -> Response:
        """Filters (EQ, GTE, LTE, IN) ANDed within a group, groups ORed; paging by after."""
        self.count(request)
        obj = request.path_params["object"]
        body = await request.json()
        error, _ = self._fault(request)
        if error:
            return error
        groups = body.get("filterGroups") or []
        if len(groups) > 5 or any(len(g.get("filters") or []) > 10 for g in groups):
            return json_response(
                {"status": "error", "category": "VALIDATION_ERROR", "message": "too many filters"},
                400,
            )

        def ok(rec: dict[str, Any], f: dict[str, Any]) -> bool:
            value = rec["properties"].get(f["propertyName"])
            op, want = f["operator"], f.get("value")
            if op == "EQ":
                return value == want
            if op == "IN":
                return value in (f.get("values") or [])
            if value is None:
                return False
            num = value.isdigit() and str(want).isdigit()
            a, b = (int(value), int(want)) if num else (value, str(want))
            return a >= b if op == "GTE" else a <= b if op == "LTE" else False

        with self.lock:
            rows = [
                r
                for r in self.objects[obj].values()
                if not groups or any(all(ok(r, f) for f in g.get("filters") or []) for g in groups)
            ]
            for sort in reversed(body.get("sorts") or []):
                prop = sort["propertyName"]
                rows.sort(
                    key=lambda r: int(r["properties"].get(prop) or 0),
                    reverse=sort.get("direction") == "DESCENDING",
                )
        limit = min(int(body.get("limit") or 10), 200)
        after = int(body.get("after") or 0)
        if after >= 10_000:
            return json_response(
                {"status": "error", "category": "VALIDATION_ERROR", "message": "max 10000"}, 400
            )
        wanted = body.get("properties") or []
        page = rows[after : after + limit]
        out: dict[str, Any] = {
            "total": len(rows),
            "results": [
                {**r, "properties": {k: r["properties"].get(k) for k in wanted}} for r in page
            ],
        }
        if after + limit < len(rows):
            out["paging"] = {"next": {"after": str(after + limit)}}
        return json_response(out, 200, self._headers())

    async def pipelines(self, request: Request) -> Response:
        """GET /crm/v3/pipelines/deals (authenticated, like every HubSpot API call)."""
        self.count(request)
        error, _ = self._fault(request)
        if error:
            return error
        return json_response(
            {
                "results": [
                    {
                        "id": pid,
                        "label": pid.title(),
                        "stages": [
                            {"id": s, "label": s, "displayOrder": i} for i, s in enumerate(stages)
                        ],
                    }
                    for pid, stages in PIPELINES.items()
                ]
            }
        )

    def app(self) -> Starlette:
        """The routes HubSpot serves that the connector uses."""
        return Starlette(
            routes=[
                Route("/crm/v3/objects/contacts/gdpr-delete", self.gdpr_delete, methods=["POST"]),
                Route("/crm/v3/objects/{object}/batch/{action}", self.batch, methods=["POST"]),
                Route("/crm/v3/objects/{object}/search", self.search, methods=["POST"]),
                Route(
                    "/crm/v4/associations/deals/contacts/batch/associate/default",
                    self.associate,
                    methods=["POST"],
                ),
                Route("/crm/v3/pipelines/deals", self.pipelines, methods=["GET"]),
            ]
        )
