"""A stateful fake of Pipedrive v2: persons (duplicates allowed, as in Pipedrive), deals,
exact-email search, cursor paging, the success envelope and token-based rate limits."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.base import FakeCrm, json_response

PIPELINES = {1: [1, 2, 3, 4, 5]}  # pipeline id -> stage ids


def _ts(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakePipedrive(FakeCrm):
    """One company account; ``token`` is the only accepted ``api_token``."""

    def __init__(self, token: str = "pd-token", clock: Callable[[], datetime] | None = None):
        super().__init__(clock)
        self.token = token
        self.persons: dict[int, dict[str, Any]] = {}
        self.deleted: list[int] = []  # person ids
        self.deals: dict[int, dict[str, Any]] = {}
        self.leads: dict[str, dict[str, Any]] = {}
        self.burst = 80  # requests per 2 s window (we never really wait: the window is fake)
        self.daily_left = 100_000
        self.page_size = 500
        self.lists_left: int | None = None  # answer that many person list pages, then 500

    def add_person(self, name: str, emails: list[str], **fields: Any) -> int:
        """A salesperson adds a person by hand: intake finds it."""
        with self.lock:
            pid = self.new_id()
            self.persons[pid] = {
                "id": pid, "name": name, **fields,
                "emails": [{"value": e, "primary": i == 0, "label": "work"}
                           for i, e in enumerate(emails)],
                "add_time": _ts(self.clock()), "update_time": _ts(self.clock()),
            }  # fmt: skip
        return pid

    def set_deal(self, deal_id: int, **fields: Any) -> None:
        """A salesperson marks a deal won or lost."""
        with self.lock:
            self.deals[deal_id].update(fields)
            self.deals[deal_id]["update_time"] = _ts(self.clock())

    def _headers(self, remaining: int) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.burst),
            "x-ratelimit-remaining": str(max(remaining, 0)),
            "x-ratelimit-reset": "2",
            "x-daily-requests-left": str(max(self.daily_left, 0)),
        }

    def _gate(self, request: Request) -> tuple[Response | None, bool]:
        if request.query_params.get("api_token") != self.token:
            return json_response(
                {"success": False, "error": "unauthorized access", "errorCode": 401,
                 "error_info": "Please check the API token", "data": None}, 401
            ), False  # fmt: skip
        with self.lock:
            if self.daily_left <= 0:
                return json_response(
                    {"success": False, "error": "Daily limit reached", "data": None},
                    429, self._headers(0),
                ), False  # fmt: skip
            self.daily_left -= 1
            kind = self.faults.draw()
        if kind == "429":
            headers = self._headers(0)
            if self.faults.rng.random() < 0.5:
                headers["Retry-After"] = "6"
            return json_response(
                {"success": False, "error": "Too many requests", "data": None}, 429, headers
            ), False
        if kind == "5xx-before":
            return json_response({"success": False, "error": "Internal error", "data": None},
                                 500), False  # fmt: skip
        return None, kind == "5xx-after"

    def _ok(self, data: Any, extra: dict[str, Any] | None = None, status: int = 200) -> Response:
        body: dict[str, Any] = {"success": True, "data": data}
        if extra is not None:
            body["additional_data"] = extra
        return json_response(body, status, self._headers(self.burst - 1))

    async def create_person(self, request: Request) -> Response:
        """POST /api/v2/persons: always creates, even for a known email."""
        self.count(request)
        await self.maybe_hang()
        error, after = self._gate(request)
        if error:
            return error
        body = await request.json()
        if not body.get("name"):
            return json_response({"success": False, "error": "Name is required", "data": None}, 400)
        with self.lock:
            pid = self.new_id()
            rec = {"id": pid, "name": body["name"], "emails": body.get("emails") or [],
                   "add_time": _ts(self.clock()), "update_time": _ts(self.clock()),
                   "custom_fields": body.get("custom_fields") or {}}  # fmt: skip
            self.persons[pid] = rec
        if after:
            return json_response({"success": False, "error": "gateway", "data": None}, 502)
        return self._ok(rec, status=201)

    async def list_persons(self, request: Request) -> Response:
        """GET /api/v2/persons: ``updated_since``, ``sort_by``/``sort_direction``, cursor."""
        self.count(request)
        error, _ = self._gate(request)
        if error:
            return error
        q = request.query_params
        with self.lock:
            if self.lists_left is not None:
                if self.lists_left <= 0:
                    return json_response(
                        {"success": False, "error": "Internal error", "data": None}, 500
                    )
                self.lists_left -= 1
            rows = list(self.persons.values())
        key = q.get("sort_by", "id")
        rows.sort(key=lambda r: (r[key], r["id"]), reverse=q.get("sort_direction") == "desc")
        if q.get("updated_since"):
            rows = [r for r in rows if r["update_time"] >= q["updated_since"]]
        limit = min(int(q.get("limit", 100)), self.page_size)
        offset = int(q.get("cursor") or 0)
        page = rows[offset : offset + limit]
        more = offset + limit < len(rows)
        return self._ok(page, {"next_cursor": str(offset + limit) if more else None})

    async def patch_person(self, request: Request) -> Response:
        """PATCH /api/v2/persons/{id}."""
        self.count(request)
        error, after = self._gate(request)
        if error:
            return error
        pid = int(request.path_params["id"])
        body = await request.json()
        with self.lock:
            rec = self.persons.get(pid)
            if rec is None:
                return json_response({"success": False, "error": "Person not found",
                                      "data": None}, 404)  # fmt: skip
            rec.update({k: v for k, v in body.items() if k in ("name", "emails", "custom_fields")})
            rec["update_time"] = _ts(self.clock())
        if after:
            return json_response({"success": False, "error": "gateway", "data": None}, 502)
        return self._ok(rec)

    async def delete_person(self, request: Request) -> Response:
        """DELETE /api/v2/persons/{id}: ``{"success": true, "data": {"id": id}}``."""
        self.count(request)
        error, after = self._gate(request)
        if error:
            return error
        pid = int(request.path_params["id"])
        with self.lock:
            if self.persons.pop(pid, None) is None:
                return json_response({"success": False, "error": "Person not found",
                                      "data": None}, 404)  # fmt: skip
            self.deleted.append(pid)
        if after:
            return json_response({"success": False, "error": "gateway", "data": None}, 502)
        return json_response({"success": True, "data": {"id": pid}})

    async def search(self, request: Request) -> Response:
        """GET /api/v2/persons/search?term=&fields=email&exact_match=true."""
        self.count(request)
        error, _ = self._gate(request)
        if error:
            return error
        term = request.query_params.get("term", "").lower()
        if len(term) < 2:
            return json_response({"success": False, "error": "term too short", "data": None}, 400)
        exact = request.query_params.get("exact_match") == "true"
        with self.lock:
            hits = [
                p for p in self.persons.values()
                if any((e["value"].lower() == term) if exact else (term in e["value"].lower())
                       for e in p["emails"])
            ]  # fmt: skip
        limit = int(request.query_params.get("limit", "100"))
        items = [{"result_score": 1.0, "item": {"id": p["id"], "type": "person", "name": p["name"],
                  "emails": [e["value"] for e in p["emails"]]}} for p in hits[:limit]]  # fmt: skip
        return self._ok({"items": items}, {"next_cursor": None})

    async def deals_endpoint(self, request: Request) -> Response:
        """GET (filters person_id, pipeline_id, updated_since; cursor) and POST /api/v2/deals."""
        self.count(request)
        await self.maybe_hang()
        error, after = self._gate(request)
        if error:
            return error
        if request.method == "POST":
            body = await request.json()
            pipeline, stage = body.get("pipeline_id"), body.get("stage_id")
            if pipeline not in PIPELINES or stage not in PIPELINES[pipeline]:
                return json_response({"success": False, "error": "Invalid stage",
                                      "data": None}, 400)  # fmt: skip
            if int(body.get("person_id") or 0) not in self.persons:
                return json_response({"success": False, "error": "Person not found",
                                      "data": None}, 400)  # fmt: skip
            with self.lock:
                did = self.new_id()
                rec = {"id": did, "title": body.get("title"), "person_id": body["person_id"],
                       "pipeline_id": pipeline, "stage_id": stage, "status": "open",
                       "add_time": _ts(self.clock()), "update_time": _ts(self.clock())}  # fmt: skip
                self.deals[did] = rec
            if after:
                return json_response({"success": False, "error": "gateway", "data": None}, 502)
            return self._ok(rec, status=201)
        q = request.query_params
        with self.lock:
            rows = sorted(self.deals.values(), key=lambda d: (d["update_time"], d["id"]))
        if "person_id" in q:
            rows = [d for d in rows if str(d["person_id"]) == q["person_id"]]
        if "pipeline_id" in q:
            rows = [d for d in rows if str(d["pipeline_id"]) == q["pipeline_id"]]
        if "updated_since" in q:
            rows = [d for d in rows if d["update_time"] >= q["updated_since"]]
        limit = min(int(q.get("limit", "100")), 500)
        offset = int(q.get("cursor") or 0)
        page = rows[offset : offset + limit]
        nxt = str(offset + limit) if offset + limit < len(rows) else None
        return self._ok(page, {"next_cursor": nxt})

    async def leads_endpoint(self, request: Request) -> Response:
        """GET (person_id filter) and POST /api/v1/leads; a lead needs a person or org."""
        self.count(request)
        error, after = self._gate(request)
        if error:
            return error
        if request.method == "GET":
            pid = request.query_params.get("person_id")
            with self.lock:
                rows = [v for v in self.leads.values() if pid is None or str(v["person_id"]) == pid]
            limit = int(request.query_params.get("limit", "100"))
            return self._ok(rows[:limit], {"pagination": {"more_items_in_collection": False}})
        body = await request.json()
        if not body.get("title") or int(body.get("person_id") or 0) not in self.persons:
            return json_response({"success": False, "error": "Lead needs a title and a person",
                                  "data": None}, 400)  # fmt: skip
        with self.lock:
            lid = f"{self.new_id():08d}-0000-4000-8000-000000000000"
            rec = {"id": lid, "title": body["title"], "person_id": body["person_id"],
                   "add_time": _ts(self.clock())}  # fmt: skip
            self.leads[lid] = rec
        if after:
            return json_response({"success": False, "error": "gateway", "data": None}, 502)
        return self._ok(rec, status=201)

    def app(self) -> Starlette:
        """The v2 routes the connector uses."""
        return Starlette(
            routes=[
                Route("/api/v2/persons/search", self.search, methods=["GET"]),
                Route("/api/v2/persons", self.create_person, methods=["POST"]),
                Route("/api/v2/persons", self.list_persons, methods=["GET"]),
                Route("/api/v2/persons/{id:int}", self.patch_person, methods=["PATCH"]),
                Route("/api/v2/persons/{id:int}", self.delete_person, methods=["DELETE"]),
                Route("/api/v1/leads", self.leads_endpoint, methods=["GET", "POST"]),
                Route("/api/v2/deals", self.deals_endpoint, methods=["GET", "POST"]),
            ]
        )
