"""Tracking service under load: ``nurture serve`` vs a bare Starlette 302, same uvicorn.

Both run as real processes under uvicorn with the settings ``nurture serve`` uses (no
access log, no server header, no proxy-header rewriting, uvicorn's default HTTP and loop
implementations), one process each, one after the other. ``wrk`` (Debian's package,
installed by ``benchmarks/prereqs.sh``) drives each from 127.0.0.1 with 50 connections on
one thread, for the same duration, and reports requests/s and the p99 latency. Ours
answers signed click links (HMAC check, one spool write, 302); the floor answers a fixed
302. After the load, the run waits until the spool has drained and checks that the
database holds at least as many click events as wrk counted answers (a request answered
as wrk stopped may be recorded without being counted).

``python -m benchmarks.tracking_bench [--seconds 10] [--connections 50]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SECRET = "bench-tracking-secret-0123456789abcdef"
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
RATIO_TARGET = 0.5
P99_TARGET_MS = 50.0


async def _bare_click(request: Request) -> Response:
    return Response(status_code=302, headers={"Location": "https://example.com/landing"})


# The floor: what any Starlette app answering a 302 costs under the same server.
bare_app = Starlette(routes=[Route("/c/{token}", _bare_click, methods=["GET"])])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seed(db_url: str) -> int:
    """A migrated database with one lead, one campaign and one sent delivery; its id."""
    from nurture.store.db import make_engine, session_scope, upgrade
    from nurture.store.models import Campaign, Delivery, Enrollment, Lead

    engine = make_engine(db_url)
    upgrade(engine)
    with session_scope(engine) as s:
        lead = Lead(email="reader@example.com", created_at=NOW, updated_at=NOW)
        campaign = Campaign(name="bench", spec={}, spec_hash="0" * 64, created_at=NOW,
                            updated_at=NOW)  # fmt: skip
        s.add_all([lead, campaign])
        s.flush()
        enrollment = Enrollment(campaign_id=campaign.id, lead_id=lead.id, step_id="one",
                                enrolled_at=NOW)  # fmt: skip
        s.add(enrollment)
        s.flush()
        delivery = Delivery(
            enrollment_id=enrollment.id, campaign_id=campaign.id, lead_id=lead.id,
            step_id="one", template="b2b/welcome", domain="example.com", status="sent",
            message_id="<bench.1@nurture.example>", due_at=NOW, queued_at=NOW, sent_at=NOW,
            updated_at=NOW,
        )  # fmt: skip
        s.add(delivery)
        s.flush()
        delivery_id = int(delivery.id)
    engine.dispose()
    return delivery_id


def _clicks(db_url: str) -> int:
    from sqlalchemy import func, select

    from nurture.store.db import make_engine, session_scope
    from nurture.store.models import Event

    engine = make_engine(db_url)
    with session_scope(engine) as s:
        count = int(s.scalar(select(func.count()).where(Event.type == "clicked")) or 0)
    engine.dispose()
    return count


@contextmanager
def _process(cmd: list[str], env: dict[str, str], url: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process and wait until ``url`` answers; SIGTERM it afterwards."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {err[-500:]}")
            try:
                if httpx.get(url, timeout=1).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within 60 s")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    """Run wrk against one URL; requests/s, p50 and p99 in ms, requests, non-3xx answers."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found: run benchmarks/prereqs.sh (Debian package wrk)")
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    text = out.stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"no {pct}% latency in wrk output:\n{text}")
        return float(m.group(1)) * _UNITS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    return {
        "rps": float(rps.group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "requests": int(total.group(1)),
        "bad_status": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "",  # type: ignore[dict-item]
    }


def run(workdir: Path, seconds: int = 10, connections: int = 50) -> dict[str, Any]:
    """Measure both servers one after the other and return the numbers for the harness."""
    from nurture.message.tokens import click_token

    workdir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{workdir / 'tracking.db'}"
    delivery_id = _seed(db_url)
    token = click_token(delivery_id, "https://example.com/landing?utm_source=nurture", SECRET)
    env = {
        **os.environ,
        "NURTURE_DATABASE_URL": db_url,
        "NURTURE_SECRET_KEY": SECRET,
        "NURTURE_SPOOL_DIR": str(workdir / "spool"),
        "NURTURE_ENV": "development",
        "PYTHONUNBUFFERED": "1",
    }
    # The settings `nurture serve` passes to uvicorn, given to the bare app as flags.
    uvicorn_flags = ["--no-access-log", "--no-server-header", "--no-proxy-headers"]
    bare_port, ours_port = _free_port(), _free_port()
    bare_cmd = [sys.executable, "-m", "uvicorn", "benchmarks.tracking_bench:bare_app",
                "--host", "127.0.0.1", "--port", str(bare_port), *uvicorn_flags]  # fmt: skip
    ours_cmd = [sys.executable, "-m", "nurture", "serve", "--host", "127.0.0.1",
                "--port", str(ours_port)]  # fmt: skip
    warm = max(1, seconds // 5)
    with _process(bare_cmd, env, f"http://127.0.0.1:{bare_port}/c/x"):
        url = f"http://127.0.0.1:{bare_port}/c/{token}"
        _wrk(url, warm, connections)
        bare = _wrk(url, seconds, connections)
    with _process(ours_cmd, env, f"http://127.0.0.1:{ours_port}/healthz") as proc:
        url = f"http://127.0.0.1:{ours_port}/c/{token}"
        ours_warm = _wrk(url, warm, connections)
        ours = _wrk(url, seconds, connections)
        # Wait for the writer to catch up (bounded), then stop the server cleanly.
        deadline = time.monotonic() + 120
        pending = -1
        while time.monotonic() < deadline:
            doc = httpx.get(f"http://127.0.0.1:{ours_port}/healthz", timeout=5).json()
            pending = int(doc["spool"]["pending"])
            if pending == 0:
                break
            time.sleep(0.1)
        drain_s = round(120 - max(0.0, deadline - time.monotonic()), 2)
        rss = _rss_mib(proc.pid)
    recorded = _clicks(db_url)
    answered = ours_warm["requests"] + ours["requests"]
    ratio = ours["rps"] / bare["rps"] if bare["rps"] else 0.0
    return {
        "seconds": seconds,
        "connections": connections,
        "ours_rps": round(ours["rps"], 1),
        "ours_p50_ms": round(ours["p50_ms"], 2),
        "ours_p99_ms": round(ours["p99_ms"], 2),
        "bare_rps": round(bare["rps"], 1),
        "bare_p50_ms": round(bare["p50_ms"], 2),
        "bare_p99_ms": round(bare["p99_ms"], 2),
        "ratio": round(ratio, 3),
        "ours_bad_status": ours["bad_status"],
        "ours_socket_errors": ours["socket_errors"],
        "answered_counted": answered,
        "clicks_recorded": recorded,
        "spool_pending_after": pending,
        "drain_wait_s": drain_s,
        "serve_rss_mib": rss,
        "ok": bool(
            ratio >= RATIO_TARGET
            and ours["p99_ms"] < P99_TARGET_MS
            and ours["bad_status"] == 0
            and pending == 0
        ),
        # Every request answered during the measured and warm-up runs is recorded.
        "lost": max(0, answered - recorded),
    }


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def main() -> None:
    """Command line: print the numbers as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), args.seconds, args.connections), indent=2))


if __name__ == "__main__":
    main()
