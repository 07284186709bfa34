"""The edge answers first and records durably: database outages, SIGKILL, several processes,
request metadata, and the per-item webhook with replay refusal.

Everything runs over real HTTP on 127.0.0.1: the app under uvicorn in a thread where the
test needs its clock or spool, and ``nurture serve`` as a real process where the test kills
it. SQLite is locked by another *process*; PostgreSQL is made unreachable by closing the TCP
proxy the service connects through, then reopening it.
"""

from __future__ import annotations

import json
import os
import select as select_mod
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url

from nurture.dev.webserver import ThreadedServer
from nurture.engagement.tracking import SIGNATURE_HEADER, create_app, webhook_signature
from nurture.message.tokens import click_token, open_token, tracking_links
from nurture.store.db import make_engine, session_scope
from nurture.store.models import Event, WebhookReceipt
from tests.servers import free_port
from tests.test_events import Seeded, event_rows, seed, suppressions

SECRET = "edge-test-secret"
WEBHOOK_SECRET = "whsec-edge"
INGEST_KEY = "ingest-edge"
FAST = 2.0  # seconds: "answered at once" (the old service waited 30 s, then gave 500)


# -- helpers --------------------------------------------------------------------------


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class TcpProxy:
    """A TCP forwarder on 127.0.0.1; ``down()`` closes it and every connection through it,
    so the database behind it is unreachable until ``up()``."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave the
            # socket listening (the blocked call still holds it) on Linux.
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for conn in self._conns:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select_mod.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            for s in (a, b):
                with suppress(OSError):
                    s.close()


@contextmanager
def sqlite_write_lock(path: str) -> Iterator[None]:
    """Another process holds SQLite's write lock (BEGIN IMMEDIATE) until the block ends."""
    script = (
        "import sqlite3, sys\n"
        f"c = sqlite3.connect({path!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
        "c.execute('COMMIT')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@contextmanager
def outage(engine: Engine, proxy: TcpProxy | None) -> Iterator[None]:
    """The database is unavailable inside the block: SQLite locked by another process,
    PostgreSQL unreachable (its proxy closed)."""
    if proxy is None:
        database = make_url(_url(engine)).database
        assert database
        with sqlite_write_lock(database):
            yield
    else:
        proxy.down()
        try:
            yield
        finally:
            proxy.up()


@pytest.fixture
def reachable(engine: Engine) -> Iterator[tuple[Engine, TcpProxy | None]]:
    """The test database as the service sees it: SQLite directly, PostgreSQL through a
    proxy the test can close."""
    if engine.dialect.name == "sqlite":
        yield engine, None
        return
    url = make_url(_url(engine))
    assert url.port is not None
    proxy = TcpProxy(url.port).up()
    proxied = make_engine(_url(engine).replace(f":{url.port}/", f":{proxy.port}/"))
    try:
        yield proxied, proxy
    finally:
        proxied.dispose()
        proxy.down()


@contextmanager
def in_process(engine: Engine, clock: Clock, spool: Path) -> Iterator[tuple[httpx.Client, Any]]:
    app = create_app(
        engine, secret=SECRET, clock=clock, webhook_secret=WEBHOOK_SECRET,
        ingest_keys=[INGEST_KEY], spool_dir=spool,
    )  # fmt: skip
    with (
        ThreadedServer(app) as server,
        httpx.Client(base_url=server.url, follow_redirects=False, timeout=30) as client,
    ):
        yield client, app


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


def clicks(engine: Engine) -> list[str]:
    """External ids of every click event."""
    with session_scope(engine) as s:
        return list(s.scalars(select(Event.external_id).where(Event.type == "clicked")))


class Serve:
    """``nurture serve`` as a real process."""

    def __init__(self, db_url: str, spool: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "NURTURE_DATABASE_URL": db_url,
            "NURTURE_SECRET_KEY": SECRET,
            "NURTURE_SPOOL_DIR": str(spool),
            "NURTURE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "NURTURE_INGEST_KEYS": INGEST_KEY,
            "NURTURE_ENV": "development",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nurture", "serve", "--port", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nurture serve did not start"
                time.sleep(0.05)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/healthz", timeout=10).json())

    def wait_drained(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (spool := self.health()["spool"])["pending"]:
            assert time.monotonic() < deadline, spool
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        if self.proc.stderr:
            self.proc.stderr.close()


# -- the database is locked or down ---------------------------------------------------


def test_answers_at_once_while_the_database_is_unavailable(
    reachable: tuple[Engine, TcpProxy | None], now: datetime, tmp_path: Path
) -> None:
    engine, proxy = reachable
    ids = seed(engine, now)
    links = tracking_links("http://t", ids.delivery_id, ids.lead_id, SECRET)
    clock = Clock(now)
    with in_process(engine, clock, tmp_path / "spool") as (client, app):
        spool = app.state.spool
        with outage(engine, proxy):
            slowest = 0.0
            for i in range(10):
                start = time.monotonic()
                target = f"https://shop.example.com/{i}"
                click = client.get(_path(links.click_url(target)))
                pixel = client.get(_path(links.open_pixel_url))
                slowest = max(slowest, time.monotonic() - start)
                assert (click.status_code, click.headers["location"]) == (302, target)
                assert pixel.status_code == 200
            start = time.monotonic()
            page = client.get(_path(links.unsubscribe_url))
            done = client.post(_path(links.unsubscribe_url), data={"List-Unsubscribe": "One-Click"})
            slowest = max(slowest, time.monotonic() - start)
            assert page.status_code == 200 and "<form" in page.text
            assert done.status_code == 200 and "You are unsubscribed" in done.text
            assert slowest < FAST, slowest
            # Machine callers are told to retry, never given a 500.
            body = json.dumps({"events": [{"type": "bounce", "email": "x@example.org"}]})
            signature = webhook_signature(body.encode(), WEBHOOK_SECRET, int(now.timestamp()))
            hook = client.post(
                "/webhooks/bounces", content=body, headers={SIGNATURE_HEADER: signature}
            )
            item = {"type": "page_view", "email": ids.email, "occurred_at": now.isoformat()}
            ingest = client.post(
                "/events", json={"events": [item]},
                headers={"Authorization": f"Bearer {INGEST_KEY}"},
            )  # fmt: skip
            assert (hook.status_code, ingest.status_code) == (503, 503)
            assert hook.headers["retry-after"] and ingest.headers["retry-after"]
            assert spool.pending() == 21
        # The database is back: every answered request becomes exactly one event.
        assert spool.wait_drained(60), spool.stats()
    rows = event_rows(engine)
    assert sorted(r[2] for r in rows) == ["clicked"] * 10 + ["opened"] * 10 + ["unsubscribed"]
    assert len({r[4] for r in rows}) == 21
    assert suppressions(engine) == {ids.email: ("unsubscribed", "one-click")}


def test_unsubscribe_page_degrades_without_the_database(
    reachable: tuple[Engine, TcpProxy | None], now: datetime, tmp_path: Path
) -> None:
    engine, proxy = reachable
    # SQLite in WAL mode still reads under another process's write lock, so the page shows
    # the masked address; an unreachable server takes only the address away.
    ids = seed(engine, now, first_name="Jane")
    links = tracking_links("http://t", ids.delivery_id, ids.lead_id, SECRET)
    with in_process(engine, Clock(now), tmp_path / "spool") as (client, _):
        with outage(engine, proxy):
            page = client.get(_path(links.unsubscribe_url))
        assert page.status_code == 200 and '<form method="post">' in page.text
        if proxy is None:
            assert "J***@example.com" in page.text
        else:
            assert "the address this email was sent to" in page.text
            assert "example.com" not in page.text


# -- SIGKILL and several processes ----------------------------------------------------


def test_sigkill_then_restart_records_every_answered_request_once(
    reachable: tuple[Engine, TcpProxy | None], now: datetime, tmp_path: Path
) -> None:
    engine, proxy = reachable
    ids = seed(engine, now)
    spool = tmp_path / "spool"
    serve = Serve(_url(engine), spool)
    try:
        # Some requests drain normally; then, with the database unavailable, more are
        # answered and the process is killed before its writer could record them.
        with httpx.Client(base_url=serve.url, timeout=30) as client:
            for i in range(5):
                token = click_token(ids.delivery_id, f"https://example.com/a{i}", SECRET)
                assert client.get(f"/c/{token}").status_code == 302
            serve.wait_drained()
            with outage(engine, proxy):
                for i in range(25):
                    token = click_token(ids.delivery_id, f"https://example.com/b{i}", SECRET)
                    assert client.get(f"/c/{token}").status_code == 302
                    assert client.get(f"/o/{open_token(ids.delivery_id, SECRET)}.gif").is_success
                assert serve.health()["spool"]["pending"] == 50
                serve.kill()
        assert len(clicks(engine)) == 5
        assert list(spool.glob("spool-*.jsonl")), "the killed process left its spool"
        # A new process adopts the dead one's spool and records what it had answered.
        serve = Serve(_url(engine), spool)
        serve.wait_drained()
    finally:
        serve.stop()
    recorded = clicks(engine)
    assert len(recorded) == len(set(recorded)) == 30
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).where(Event.type == "opened")) == 25
    assert not list(spool.glob("spool-*.jsonl")), "drained segments are deleted"
    assert not list(spool.glob("parked-*")), "nothing was parked"


def test_two_serve_processes_share_only_the_database(
    sqlite_engine: Engine, now: datetime, tmp_path: Path
) -> None:
    ids = seed(sqlite_engine, now)
    spool = tmp_path / "spool"
    servers = [Serve(_url(sqlite_engine), spool), Serve(_url(sqlite_engine), spool)]
    try:
        # Each process keeps to its own segment (the other's live one is locked).
        assert [s.health()["spool"]["segments"] for s in servers] == [1, 1]

        def hammer(server: Serve, offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for i in range(offset, offset + 60):
                    token = click_token(ids.delivery_id, f"https://example.com/{i}", SECRET)
                    assert client.get(f"/c/{token}").status_code == 302

        threads = [threading.Thread(target=hammer, args=(servers[n % 2], n * 60)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in servers:
            s.wait_drained()
    finally:
        for s in servers:
            s.stop()
    recorded = clicks(sqlite_engine)
    assert len(recorded) == len(set(recorded)) == 240


# -- request metadata and the honeypot ------------------------------------------------


def test_opens_and_clicks_carry_request_metadata(
    sqlite_engine: Engine, now: datetime, tmp_path: Path
) -> None:
    ids = seed(sqlite_engine, now)
    links = tracking_links("http://t", ids.delivery_id, ids.lead_id, SECRET)
    clock = Clock(now)
    with in_process(sqlite_engine, clock, tmp_path / "spool") as (client, app):
        client.get(
            _path(links.click_url("https://example.com/")),
            headers={"User-Agent": "Mozilla/5.0 " + "x" * 400,
                     "X-Forwarded-For": "203.0.113.9, 10.0.0.1"},
        )  # fmt: skip
        clock.now = now + timedelta(seconds=5)
        client.head(_path(links.open_pixel_url), headers={"Sec-Purpose": "prefetch;prerender"})
        client.get(_path(links.open_pixel_url), headers={"X-Forwarded-For": "not-an-ip"})
        client.get(_path(links.open_pixel_url), headers={"X-Moz": "Prefetch"})
        assert app.state.spool.wait_drained(30)
    with session_scope(sqlite_engine) as s:
        rows = s.execute(select(Event.type, Event.occurred_at, Event.payload).order_by(Event.id))
        got = [(t, at, p) for t, at, p in rows]
    click_meta = got[0][2]
    assert click_meta["ip"] == "203.0.113.9"  # the peer is loopback: the first hop counts
    assert click_meta["user_agent"] == ("Mozilla/5.0 " + "x" * 400)[:255]
    assert (click_meta["method"], click_meta["prefetch"]) == ("GET", False)
    assert got[0][1] == now  # the injected clock at request time
    assert [(p["method"], p["prefetch"], p["ip"]) for _, _, p in got[1:]] == [
        ("HEAD", True, "127.0.0.1"),
        ("GET", False, "127.0.0.1"),  # a forwarded value that is no address is ignored
        ("GET", True, "127.0.0.1"),
    ]
    assert got[1][1] == now + timedelta(seconds=5)


def test_honeypot_target_is_an_empty_uncached_page(
    sqlite_engine: Engine, now: datetime, tmp_path: Path
) -> None:
    with in_process(sqlite_engine, Clock(now), tmp_path / "spool") as (client, _):
        for response in (client.get("/_nurture/hp"), client.head("/_nurture/hp")):
            assert response.status_code == 200
            assert response.content == b""
            assert response.headers["content-type"].startswith("text/plain")
            assert "no-store" in response.headers["cache-control"]


# -- the bounce webhook ---------------------------------------------------------------


def _signed(doc: Any, at: datetime, secret: str = WEBHOOK_SECRET) -> tuple[bytes, str]:
    body = json.dumps(doc).encode()
    return body, webhook_signature(body, secret, int(at.timestamp()))


def test_webhook_mixed_batch_replay_and_bad_headers(
    engine: Engine, now: datetime, tmp_path: Path
) -> None:
    ids: Seeded = seed(engine, now)
    doc = {
        "events": [
            {"type": "bounce", "email": "bob@example.org", "hard": True, "id": "h-1"},
            {"type": "bounce", "message_id": "<nobody@elsewhere.example>", "hard": True},
            {"type": "bounce", "email": ids.email, "hard": True, "reason": "5.1.1\u0000"},
        ]
    }
    body, signature = _signed(doc, now)
    clock = Clock(now)
    with (
        in_process(engine, clock, tmp_path / "a") as (one, _),
        in_process(engine, clock, tmp_path / "b") as (two, _),
    ):
        headers = {SIGNATURE_HEADER: signature, "Content-Type": "application/json"}
        response = one.post("/webhooks/bounces", content=body, headers=headers)
        assert response.status_code == 207, response.text
        result = response.json()
        assert result["inserted"] == 1 and result["unknown_indices"] == [1]
        assert [(e["index"], e["field"]) for e in result["errors"]] == [(2, "reason")]
        assert "NUL" in result["errors"][0]["message"]
        assert suppressions(engine) == {"bob@example.org": ("bounced", "webhook")}
        # The same signed request again, to this process or another one: 409, nothing new.
        clock.now = now + timedelta(minutes=2)
        for client in (one, two):
            replay = client.post("/webhooks/bounces", content=body, headers=headers)
            assert replay.status_code == 409
        assert len(event_rows(engine)) == 1
        # Malformed signature headers are 401, never 500.
        mac = signature.split("v1=")[1]
        stamp = int(clock.now.timestamp())
        bad_headers: list[str | bytes] = [
            f"t=\u0661\u0662\u0663,v1={mac}".encode(),  # Arabic-Indic digits (UTF-8 bytes)
            f"t={stamp}\u00b2,v1={mac}".encode("latin-1"),  # a superscript two
            f"t={'9' * 5000},v1={mac}",
            f"t={stamp},v1={'z' * 64}",
            f"t={stamp},v1=".encode() + "\u00e9".encode("latin-1") * 64,
            b"t=\xff\xfe,v1=\x80",
            ",".join([f"t={stamp}"] + [f"v1={mac}"] * 50),
            "t=-5,v1=" + mac,
            "garbage",
        ]
        for bad in bad_headers:
            got = two.post("/webhooks/bounces", content=body, headers={SIGNATURE_HEADER: bad})
            assert got.status_code == 401, (bad, got.text)
        with session_scope(engine) as s:
            assert s.scalar(select(func.count()).select_from(WebhookReceipt)) == 1
        # Once its window has closed, a receipt is pruned by the next accepted request.
        clock.now = now + timedelta(minutes=11)
        later, later_sig = _signed({"events": []}, clock.now)
        assert (
            two.post(
                "/webhooks/bounces", content=later, headers={SIGNATURE_HEADER: later_sig}
            ).status_code
            == 200
        )
    with session_scope(engine) as s:
        assert list(s.scalars(select(WebhookReceipt.signed_at))) == [now + timedelta(minutes=11)]


def test_webhook_hostile_items_are_item_errors(
    engine: Engine, now: datetime, tmp_path: Path
) -> None:
    seed(engine, now)
    hostile: list[Any] = [
        {"type": "bounce", "email": "a@example.org", "timestamp": 1e20},
        {"type": "bounce", "email": "a@example.org", "timestamp": -1e20},
        {"type": "bounce", "email": "a@example.org", "timestamp": 10**30},
        {"type": "bounce", "email": "a@example.org", "timestamp": "9999-12-31T23:59:59+00:00"},
        {"type": "bounce", "email": "a@example.org", "timestamp": "0001-01-01T00:00:00-12:00"},
        {"type": "bounce", "email": "a@example.org", "id": "\ud800"},
        {"type": "bounce", "message_id": "a\u0000b"},
        {"type": "bounce", "message_id": "\udfff"},
        {"type": "bounce", "email": "a@example.org", "id": 10**40},
        {"type": ["bounce"], "email": "a@example.org"},
        {"type": "bounce", "email": {"a": 1}},
        {"type": "bounce", "email": "a@example.org", "hard": 1},
        {"type": "bounce", "email": "a@example.org", "reason": "x" * 5000},
        "not an object",
        None,
    ]
    clock = Clock(now)
    with in_process(engine, clock, tmp_path / "s") as (client, _):
        for i, item in enumerate(hostile):
            clock.now = now + timedelta(seconds=i)  # a fresh signature for each request
            body, sig = _signed({"events": [item, {"type": "bounce", "email": "ok@x.org"}]},
                                clock.now)  # fmt: skip
            got = client.post("/webhooks/bounces", content=body, headers={SIGNATURE_HEADER: sig})
            assert got.status_code == 207, (item, got.text)
            assert [e["index"] for e in got.json()["errors"]] == [0], item
    assert suppressions(engine) == {}  # a soft bounce of an unknown address suppresses nothing


# -- one bad item never blocks the good ones --------------------------------------------


def _refuse_url(engine: Engine, url: str) -> None:
    """A trigger that makes the database itself refuse events for one URL."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON events "
                f"WHEN NEW.url = '{url}' BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.url = '{url}' THEN RAISE EXCEPTION 'refused by test'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON events "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )


def test_a_bad_spooled_item_is_parked_and_the_good_ones_recorded(
    engine: Engine, now: datetime, tmp_path: Path
) -> None:
    ids = seed(engine, now)
    bad_url = "https://refused.example/"
    _refuse_url(engine, bad_url)
    spool_dir = tmp_path / "spool"
    links = tracking_links("http://t", ids.delivery_id, ids.lead_id, SECRET)
    with in_process(engine, Clock(now), spool_dir) as (client, app):
        spool = app.state.spool
        with outage(engine, None) if engine.dialect.name == "sqlite" else _nothing():
            # Held back (SQLite) so that all of them land in one batch.
            for target in ("https://a.example/", bad_url, "https://b.example/"):
                assert client.get(_path(links.click_url(target))).status_code == 302
            # A line that is no record at all, as a torn or foreign write would leave.
            segment = next(spool_dir.glob("spool-*.jsonl"))
            with open(segment, "ab") as f:
                f.write(b'{"not": "a record"}\n')
            spool.written += 1
            assert client.get(_path(links.click_url("https://c.example/"))).status_code == 302
        assert spool.wait_drained(60), spool.stats()
        assert (spool.parked, spool.drained) == (2, 3)
    assert sorted(r[3] for r in event_rows(engine)) == [
        "https://a.example/",
        "https://b.example/",
        "https://c.example/",
    ]
    parked = [json.loads(line) for f in spool_dir.glob("parked-*.jsonl") for line in f.open()]
    reasons = sorted(p["reason"] for p in parked)
    assert "refused by test" in reasons[0] or "refused by test" in reasons[1]
    assert any(r.startswith("unreadable spool record") for r in reasons)
    assert bad_url in "".join(p["line"] for p in parked)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def test_webhook_receipts_migration_matches_the_model(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from nurture.store.models import Base

    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "webhook_receipts" in repr(d)] == []


def test_a_full_disk_loses_opens_and_clicks_visibly_and_refuses_unsubscribes(
    sqlite_engine: Engine, now: datetime, tmp_path: Path
) -> None:
    ids = seed(sqlite_engine, now)
    links = tracking_links("http://t", ids.delivery_id, ids.lead_id, SECRET)
    with in_process(sqlite_engine, Clock(now), tmp_path / "spool") as (client, app):
        spool = app.state.spool
        segment_fd = spool._active.fd
        full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
        spool._active.fd = full
        try:
            click = client.get(_path(links.click_url("https://example.com/")))
            pixel = client.get(_path(links.open_pixel_url))
            unsubscribe = client.post(_path(links.unsubscribe_url), data={"scope": "all"})
        finally:
            spool._active.fd = segment_fd
            os.close(full)
        # The reader still reaches the page; an unsubscribe is never confirmed unkept.
        assert (click.status_code, pixel.status_code, unsubscribe.status_code) == (302, 200, 503)
        assert "try again" in unsubscribe.text
        assert client.get("/healthz").json()["spool"]["lost"] == 3  # failed writes
        assert client.post(_path(links.unsubscribe_url), data={"scope": "all"}).status_code == 200
        assert spool.wait_drained(30)
    assert [r[2] for r in event_rows(sqlite_engine)] == ["unsubscribed"]
