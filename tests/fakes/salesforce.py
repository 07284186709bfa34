"""A stateful fake of Salesforce REST: OAuth tokens, composite upsert, SOQL paging, limits.

Leads are unique by the external id field; ``Id`` values look like ``00Q...``. Every
answer carries ``Sforce-Limit-Info: api-usage=N/LIMIT``; when ``daily_limit`` calls have
been made, the answer is 403 ``REQUEST_LIMIT_EXCEEDED`` until :meth:`new_day`. Tokens can
be expired to get 401 ``INVALID_SESSION_ID``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.base import FakeCrm, json_response

BATCH_LIMIT = 200
REQUIRED = {"Lead": ("LastName", "Company"), "Opportunity": ("Name", "StageName", "CloseDate")}
PREFIX = {"Lead": "00Q", "Opportunity": "006"}


def _stamp(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.000+0000")


class FakeSalesforce(FakeCrm):
    """One org with a ``Lead`` object and a connected app ``client_id``/``client_secret``."""

    def __init__(
        self,
        client_id: str = "app",
        client_secret: str = "shh",
        clock: Callable[[], datetime] | None = None,
        page_size: int = 2000,
    ) -> None:
        super().__init__(clock)
        self.client_id, self.client_secret = client_id, client_secret
        self.tokens: set[str] = set()
        self.records: dict[str, dict[str, dict[str, Any]]] = {"Lead": {}, "Opportunity": {}}
        self.leads = self.records["Lead"]
        self.deleted: list[tuple[str, str]] = []  # (object, id)
        self.opportunities = self.records["Opportunity"]
        self._cursors: dict[str, tuple[str, list[str], str | None, str]] = {}
        self.daily_limit = 1_000_000
        self.api_usage = 0
        self.page_size = page_size
        self.batch_sizes: list[int] = []
        self.queries_left: int | None = None  # answer that many query pages, then 503

    def add_lead(self, **fields: Any) -> str:
        """A salesperson creates a Lead by hand (no external id): intake finds it."""
        with self.lock:
            ident = f"{PREFIX['Lead']}{self.new_id():015d}"
            stamp = _stamp(self.clock())
            self.leads[ident] = {"Id": ident, **fields, "CreatedDate": stamp,
                                 "SystemModstamp": stamp}  # fmt: skip
        return ident

    def new_day(self) -> None:
        """The 24-hour window rolls over."""
        self.api_usage = 0

    def expire_tokens(self) -> None:
        """Every issued session becomes invalid."""
        self.tokens.clear()

    def set_field(self, ident: str, obj: str = "Lead", **fields: str) -> None:
        """A salesperson edits a record."""
        with self.lock:
            self.records[obj][ident].update(fields)
            self.records[obj][ident]["SystemModstamp"] = _stamp(self.clock())

    def _limit_headers(self) -> dict[str, str]:
        return {"Sforce-Limit-Info": f"api-usage={self.api_usage}/{self.daily_limit}"}

    def _gate(self, request: Request) -> tuple[Response | None, bool]:
        auth = request.headers.get("authorization", "")
        if auth.removeprefix("Bearer ") not in self.tokens:
            return json_response(
                [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                401,
            ), False
        with self.lock:
            if self.api_usage >= self.daily_limit:
                return json_response(
                    [{"message": "TotalRequests Limit exceeded.",
                      "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
                    403, self._limit_headers(),
                ), False  # fmt: skip
            self.api_usage += 1
            kind = self.faults.draw()
        if kind == "429":  # Salesforce rarely sends 429, but proxies in front of it do
            return json_response(
                [{"message": "busy", "errorCode": "SERVER_UNAVAILABLE"}], 503, {"Retry-After": "5"}
            ), False
        if kind == "5xx-before":
            return json_response(
                [{"message": "oops", "errorCode": "UNKNOWN_EXCEPTION"}], 500
            ), False
        return None, kind == "5xx-after"

    async def token(self, request: Request) -> Response:
        """POST /services/oauth2/token (client credentials flow)."""
        self.count(request)
        # Parsed by hand: Starlette's form parser needs python-multipart.
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("client_id") != self.client_id
            or form.get("client_secret") != self.client_secret
        ):
            return json_response(
                {"error": "invalid_client", "error_description": "invalid client credentials"}, 400
            )
        tok = secrets.token_hex(12)
        with self.lock:
            self.tokens.add(tok)
        assert self.server is not None
        return json_response(
            {"access_token": tok, "instance_url": self.server.url, "id": "x",
             "token_type": "Bearer", "issued_at": "0", "signature": "sig"}
        )  # fmt: skip

    async def upsert(self, request: Request) -> Response:
        """PATCH /services/data/vXX.X/composite/sobjects/{object}/{field}."""
        self.count(request)
        await self.maybe_hang()
        error, after = self._gate(request)
        if error:
            return error
        field, obj = request.path_params["field"], request.path_params["object"]
        if obj not in self.records:
            return json_response([{"message": f"no sObject {obj}", "errorCode": "NOT_FOUND"}], 404)
        table = self.records[obj]
        body = await request.json()
        records = body.get("records") or []
        if len(records) > BATCH_LIMIT:
            return json_response(
                [{"message": f"more than {BATCH_LIMIT} records", "errorCode": "INVALID_BATCH"}], 400
            )
        out = []
        with self.lock:
            self.batch_sizes.append(len(records))
            for rec in records:
                key = rec.get(field)
                missing = [f for f in REQUIRED[obj] if not rec.get(f)]
                if "Id" in rec or not key:
                    out.append(
                        {
                            "success": False,
                            "errors": [
                                {
                                    "statusCode": "INVALID_FIELD",
                                    "message": "bad key",
                                    "fields": [field],
                                }
                            ],
                        }
                    )
                    continue  # fmt: skip
                existing = next((r for r in table.values() if r.get(field) == key), None)
                if existing is None and missing:
                    out.append(
                        {
                            "success": False,
                            "errors": [
                                {
                                    "statusCode": "REQUIRED_FIELD_MISSING",
                                    "message": f"Required fields are missing: {missing}",
                                    "fields": missing,
                                }
                            ],
                        }
                    )
                    continue  # fmt: skip
                fields = {k: v for k, v in rec.items() if k != "attributes"}
                if existing is None:
                    ident = f"{PREFIX[obj]}{self.new_id():015d}"
                    existing = table[ident] = {"Id": ident, "CreatedDate": _stamp(self.clock())}
                    created = True
                else:
                    created = False
                existing.update(fields)
                existing["SystemModstamp"] = _stamp(self.clock())
                out.append({"id": existing["Id"], "success": True, "errors": [],
                            "created": created})  # fmt: skip
        if after:
            return json_response([{"message": "gateway", "errorCode": "UNKNOWN_EXCEPTION"}], 502)
        return json_response(out, 200, self._limit_headers())

    async def query(self, request: Request) -> Response:
        """GET /services/data/vXX.X/query?q=SOQL and /query/{cursor} for the next pages."""
        self.count(request)
        error, _ = self._gate(request)
        if error:
            return error
        with self.lock:
            if self.queries_left is not None:
                if self.queries_left <= 0:
                    return json_response(
                        [{"message": "busy", "errorCode": "SERVER_UNAVAILABLE"}], 503
                    )
                self.queries_left -= 1
        cursor = request.path_params.get("cursor")
        order = "SystemModstamp"
        if cursor:
            token, offset_text = cursor.rsplit("-", 1)
            obj, fields, since, order = self._cursors[token]
            offset = int(offset_text)
        else:
            soql = request.query_params.get("q", "")
            m = re.match(r"SELECT (.+?) FROM (\w+)", soql)
            if m is None or m.group(2) not in self.records:
                return json_response([{"message": "bad SOQL", "errorCode": "MALFORMED_QUERY"}], 400)
            fields = [f.strip() for f in m.group(1).split(",")]
            obj = m.group(2)
            order_match = re.search(r"ORDER BY (\w+)", soql)
            order = order_match.group(1) if order_match else "SystemModstamp"
            since_match = re.search(rf"{order} >= (\S+)", soql)
            since, offset = (since_match.group(1) if since_match else None), 0
        with self.lock:
            rows = sorted(self.records[obj].values(), key=lambda r: (r[order], r["Id"]))
        if since:
            bound = datetime.fromisoformat(since.replace("Z", "+00:00"))
            rows = [
                r for r in rows
                if datetime.fromisoformat(r[order].replace("+0000", "+00:00")) >= bound
            ]  # fmt: skip
        page = rows[offset : offset + self.page_size]
        done = offset + self.page_size >= len(rows)
        body: dict[str, Any] = {
            "totalSize": len(rows),
            "done": done,
            "records": [
                {"attributes": {"type": obj}, **{k: r.get(k) for k in fields}} for r in page
            ],
        }
        if not done:
            token = secrets.token_hex(6)
            self._cursors[token] = (obj, fields, since, order)
            version = request.path_params["version"]
            body["nextRecordsUrl"] = (
                f"/services/data/{version}/query/{token}-{offset + self.page_size}"
            )
        return json_response(body, 200, self._limit_headers())

    async def delete(self, request: Request) -> Response:
        """DELETE /services/data/vXX.X/sobjects/{object}/{id}: 204, or 404 NOT_FOUND."""
        self.count(request)
        error, after = self._gate(request)
        if error:
            return error
        obj, ident = request.path_params["object"], request.path_params["id"]
        with self.lock:
            table = self.records.get(obj, {})
            key = next((k for k, r in table.items() if str(r.get("Id")) == ident), None)
            if key is None:
                return json_response(
                    [{"message": "entity is deleted or does not exist", "errorCode": "NOT_FOUND"}],
                    404,
                )
            del table[key]
            self.deleted.append((obj, ident))
        if after:
            return json_response([{"message": "gateway", "errorCode": "SERVER_UNAVAILABLE"}], 503)
        return Response(status_code=204)

    def app(self) -> Starlette:
        """The routes the connector uses."""
        return Starlette(
            routes=[
                Route("/services/oauth2/token", self.token, methods=["POST"]),
                Route(
                    "/services/data/{version}/composite/sobjects/{object}/{field}",
                    self.upsert,
                    methods=["PATCH"],
                ),
                Route(
                    "/services/data/{version}/sobjects/{object}/{id}",
                    self.delete,
                    methods=["DELETE"],
                ),
                Route("/services/data/{version}/query", self.query, methods=["GET"]),
                Route("/services/data/{version}/query/{cursor}", self.query, methods=["GET"]),
            ]
        )
