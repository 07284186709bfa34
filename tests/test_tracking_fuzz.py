"""An adversarial layer for the tracking service: no input gives a 5xx.

Schemathesis drives every operation of the service's own OpenAPI document
(``/openapi.json``) against the running service over HTTP on 127.0.0.1, signing webhook
bodies and sending a valid bearer key half the time so the item validation is reached, not
only the 401s. Hypothesis then throws arbitrary JSON at the batch endpoints, arbitrary
bytes at the signature header and arbitrary text as tokens. The batch fuzz runs on SQLite
and on PostgreSQL (which refuses NUL and lone surrogates that SQLite stores). Example
counts are fixed, so the whole file stays well under a minute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from nurture.dev.webserver import ThreadedServer
from nurture.engagement.tracking import (
    SIGNATURE_HEADER,
    create_app,
    openapi_document,
    webhook_signature,
)
from nurture.message.tokens import tracking_links
from nurture.spec.consent import ConsentSpec
from nurture.store.db import make_engine, upgrade
from tests.conftest import _pg_engine
from tests.servers import PostgresCluster
from tests.test_events import seed

SECRET = "fuzz-secret"
WEBHOOK_SECRET = "fuzz-webhook"
INGEST_KEY = "fuzz-ingest"
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)

# A signup form (double opt-in) and a single opt-in one, so /forms and /confirm are fuzzed too.
CONSENT = ConsentSpec.model_validate(
    {
        "topics": {"newsletter": {"label": "Newsletter"}},
        "double_opt_in": ["website"],
        "forms": {
            "signup": {
                "touchpoint": "website",
                "fields": {"email": "email", "name": "first_name", "team": "attributes.team"},
                "topics": ["newsletter"],
            },
            "partner": {"touchpoint": "partner", "fields": {"mail": "email"}},
        },
    }
)
schema = schemathesis.openapi.from_dict(openapi_document(with_capture=True))


@dataclass
class Live:
    """The running service and a client for it."""

    url: str
    client: httpx.Client
    links: Any


def _serve(engine: Engine, spool: Path) -> Iterator[Live]:
    ids = seed(engine, NOW)
    app = create_app(
        engine, secret=SECRET, clock=lambda: NOW, webhook_secret=WEBHOOK_SECRET,
        ingest_keys=[INGEST_KEY], max_body=64_000, spool_dir=spool, consent=CONSENT,
    )  # fmt: skip
    with (
        ThreadedServer(app) as server,
        httpx.Client(base_url=server.url, timeout=30, follow_redirects=False) as client,
    ):
        links = tracking_links(server.url, ids.delivery_id, ids.lead_id, SECRET)
        yield Live(server.url, client, links)
        assert app.state.spool.wait_drained(30)
        assert app.state.spool.parked == 0


@pytest.fixture(scope="module")
def live_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The service on a migrated SQLite file, for the whole module."""
    folder = tmp_path_factory.mktemp("fuzz")
    engine = make_engine(f"sqlite:///{folder}/nurture.db")
    upgrade(engine)
    yield from _serve(engine, folder / "spool")
    engine.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """The service on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        yield request.getfixturevalue("live_sqlite")
        return
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    engine = _pg_engine(cluster)
    yield from _serve(engine, tmp_path_factory.mktemp("fuzz-pg") / "spool")
    engine.dispose()


def _signed(body: bytes) -> dict[str, str]:
    signature = webhook_signature(body, WEBHOOK_SECRET, int(NOW.timestamp()))
    return {SIGNATURE_HEADER: signature, "Content-Type": "application/json"}


def _no_server_error(response: httpx.Response | Any, what: object) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:500])


@schema.parametrize()
@FUZZ
def test_openapi_operations_never_answer_5xx(case: Any, live_sqlite: Live) -> None:
    """Every operation, with schema-shaped inputs: as generated, then authenticated."""
    response = case.call(base_url=live_sqlite.url, timeout=30)
    _no_server_error(response, (case.method, case.formatted_path))
    if case.path == "/webhooks/bounces":
        body = json.dumps(case.body).encode() if isinstance(case.body, dict | list) else b""
        signed = live_sqlite.client.post(case.path, content=body, headers=_signed(body))
        _no_server_error(signed, case.body)
        assert signed.status_code in (200, 207, 400, 409, 413, 422), signed.text
    elif case.path == "/events":
        body = json.dumps(case.body).encode() if isinstance(case.body, dict | list) else b""
        authed = live_sqlite.client.post(
            case.path, content=body, headers={"Authorization": f"Bearer {INGEST_KEY}"}
        )
        _no_server_error(authed, case.body)
        assert authed.status_code in (200, 207, 400, 413, 422), authed.text


def test_the_served_document_lists_the_capture_routes_only_when_served(live_sqlite: Live) -> None:
    served = live_sqlite.client.get("/openapi.json").json()
    assert {"/forms/{form}", "/confirm/{token}"} <= set(served["paths"])
    assert "/forms/{form}" not in openapi_document(with_capture=False)["paths"]


# -- hypothesis beyond the schema -------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["\x00", "\ud800", "\udfff", "9999-12-31T23:59:59+00:00",
                      "0001-01-01T00:00:00-14:00", "2026-03-03T10:00:00Z", "<a@b>",
                      "bounce", "complaint", "a@example.org", "Jane.Doe@example.com"])
)  # fmt: skip
_json = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=3)
                   | st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)  # fmt: skip
_fields = st.sampled_from(
    ["type", "email", "message_id", "hard", "id", "timestamp", "reason", "occurred_at",
     "lead_id", "delivery_id", "url", "payload"]
)  # fmt: skip
_items = st.dictionaries(_fields, _json, max_size=7) | _json


@given(batch=st.lists(_items, max_size=6))
@FUZZ
def test_hostile_batches_never_answer_5xx(live: Live, batch: list[Any]) -> None:
    # allow_nan: Python's json (and many senders) write NaN and Infinity literals.
    body = json.dumps({"events": batch}).encode()
    hook = live.client.post("/webhooks/bounces", content=body, headers=_signed(body))
    _no_server_error(hook, batch)
    assert hook.status_code in (200, 207, 409, 422), hook.text
    events = live.client.post(
        "/events", content=body, headers={"Authorization": f"Bearer {INGEST_KEY}"}
    )
    _no_server_error(events, batch)
    assert events.status_code in (200, 207, 422), events.text


_form_values = st.text(max_size=40) | st.sampled_from(
    ["\x00", "\ud800", "a@example.org", " Jane.Doe@Example.com ", "a" * 300 + "@x.example",
     "x@" + "y" * 300 + ".example", "<script>@x.example", "=cmd|' /C calc'!A0"]
)  # fmt: skip
_form_keys = st.sampled_from(["email", "name", "team", "mail", "first", "_hp", "topics"]) | st.text(
    max_size=8
)
_form_bodies = (
    st.dictionaries(_form_keys, _form_values | st.lists(_form_values, max_size=3)) | _json
)


@given(
    form=st.sampled_from(["signup", "partner"]),
    body=_form_bodies,
    as_json=st.booleans(),
    ip=st.ip_addresses(v=4),
)
@FUZZ
def test_hostile_form_posts_never_answer_5xx(
    live: Live, form: str, body: Any, as_json: bool, ip: Any
) -> None:
    # A distinct client address per example (the service trusts X-Forwarded-For from a local
    # proxy), so the per-address limit does not hide the validation behind 429s.
    headers = {"X-Forwarded-For": str(ip)}
    if as_json:
        headers["Content-Type"] = "application/json"
        content = json.dumps(body).encode("utf-8", "surrogatepass")
    else:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        pairs = body.items() if isinstance(body, dict) else [("email", json.dumps(body))]
        content = "&".join(
            f"{quote(str(k), safe='', errors='surrogatepass')}="
            f"{quote(str(v), safe='', errors='surrogatepass')}"
            for k, v in pairs
        ).encode()
    answer = live.client.post(f"/forms/{form}", content=content, headers=headers)
    _no_server_error(answer, body)
    # 200 is the thank-you page of an HTML post to a form without a redirect.
    assert answer.status_code in (200, 202, 303, 400, 413, 422, 429), answer.text


# What an HTTP client can send as a header value at all (h11 refuses the rest before it
# leaves): TAB, visible ASCII, space and obs-text bytes, no leading or trailing whitespace.
_header_bytes = st.binary(max_size=200).filter(
    lambda b: all(c == 0x09 or 0x20 <= c <= 0x7E or c >= 0x80 for c in b) and b == b.strip()
)


@given(
    header=_header_bytes | st.sampled_from([b"t=\xd9\xa1,v1=00", b"t=\xb2,v1=" + b"0" * 64]),
    body=st.binary(max_size=300),
)
@FUZZ
def test_hostile_signature_headers_and_bodies_never_answer_5xx(
    live_sqlite: Live, header: bytes, body: bytes
) -> None:
    response = live_sqlite.client.post(
        "/webhooks/bounces", content=body, headers={SIGNATURE_HEADER: header}
    )
    assert response.status_code == 401, (header, response.status_code, response.text[:300])
    ingest = live_sqlite.client.post(
        "/events", content=body, headers={"Authorization": b"Bearer x" + header}
    )
    _no_server_error(ingest, (header, body))


@given(token=st.text(min_size=1, max_size=300), method=st.sampled_from(["GET", "HEAD", "POST"]))
@FUZZ
def test_hostile_tokens_never_answer_5xx(live_sqlite: Live, token: str, method: str) -> None:
    quoted = quote(token, safe="")
    assume(quoted not in (".", ".."))
    for path in (f"/c/{quoted}", f"/o/{quoted}.gif", f"/u/{quoted}"):
        response = live_sqlite.client.request(method, path)
        _no_server_error(response, path)
        assert response.status_code in (404, 405), (path, response.status_code)
