"""Charts, the HTML report (escaped, self-contained, rendered by headless Chromium) and the CLI."""

from __future__ import annotations

import json
import queue
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, update
from websockets.sync.client import ClientConnection, connect

from nurture.cli.report import report as report_command
from nurture.reporting.charts import funnel_png, transitions_png
from nurture.reporting.html_report import render_html, write_html
from nurture.reporting.report import build_report
from nurture.store.db import session_scope
from nurture.store.models import Lead
from tests.test_reports import PIPELINE, ab_history, stage_history

EVIL = "<img src=x onerror=alert(1)>"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and proof that it is a PNG)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_charts_are_png_images(sqlite_engine: Engine) -> None:
    stage_history(sqlite_engine)
    report = build_report(sqlite_engine, PIPELINE)
    for chart in (funnel_png(report), transitions_png(report)):
        width, height = png_size(chart)
        assert width > 300 and height > 150
    empty = build_report(sqlite_engine, PIPELINE, campaign="welcome", by="variant")
    assert png_size(transitions_png(empty))[0] > 0


def test_html_escapes_lead_text_and_stays_self_contained(sqlite_engine: Engine) -> None:
    stage_history(sqlite_engine)
    with session_scope(sqlite_engine) as session:
        session.execute(update(Lead).where(Lead.source == "partner").values(owner=EVIL))
        session.execute(update(Lead).where(Lead.source == "social").values(source=EVIL))
    html = render_html(build_report(sqlite_engine, PIPELINE, by="owner"))
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html  # nothing loads from the network
    assert html.count('src="data:image/png;base64,') == 2
    assert "default-src 'none'; img-src data:" in html


def test_cli_report_json_markdown_html_and_promotion(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nurture.config import get_settings

    ab_history(sqlite_engine)
    monkeypatch.setenv("NURTURE_DATABASE_URL", str(sqlite_engine.url))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        out = tmp_path / "out" / "report.html"
        res = runner.invoke(report_command, ["--json", "--html", str(out)])
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        assert data["html"] == str(out) and out.read_text().startswith("<!doctype html>")
        [ab] = [a for a in data["ab_tests"] if a["campaign"] == "ab"]
        assert ab["winner"] == "roi" and ab["test"]["significant"] is True
        res = runner.invoke(report_command, ["--markdown", "--campaign", "ab", "--promote-winners"])
        assert res.exit_code == 0, res.output
        assert "# Nurture report: campaign ab" in res.output
        assert "| ab | case-study | roi | b2b/case_study_roi | 200 | 20.0% | 20.0% |" in res.output
        assert "| close |" not in res.output  # --campaign ab leaves the other campaign out
        assert "template: b2b/case_study_roi" in res.output
        res = runner.invoke(report_command, ["--since", "2026-03-05", "--until", "2026-03-01"])
        assert res.exit_code == 1 and "must be before --until" in res.output
        res = runner.invoke(report_command, ["--since", "yesterday"])
        assert res.exit_code == 1 and "--since: expected an ISO 8601" in res.output
        res = runner.invoke(report_command, ["--campaign", "nope"])
        assert res.exit_code == 1 and "unknown campaign 'nope'" in res.output
        res = runner.invoke(report_command, ["--by", "campaign"])
        assert res.exit_code == 0 and "By campaign" in res.output and "A/B tests" in res.output
    finally:
        get_settings.cache_clear()


# --- headless Chromium over the DevTools protocol -----------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class DevTools:
    """A minimal Chrome DevTools protocol client for one page."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return dict(msg["result"])
            self.events.append(msg)

    def wait_for(self, method: str) -> dict[str, Any]:
        for msg in self.events:
            if msg.get("method") == method:
                return msg
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    def errors(self) -> list[str]:
        found = []
        for msg in self.events:
            method, params = msg.get("method"), msg.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args")))
            elif method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found


@contextmanager
def chromium_page(user_dir: Path) -> Iterator[DevTools]:
    """Start headless Chromium on a loopback DevTools port and attach to its first page."""
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium package is needed: apt-get install -y chromium (.ci/run)"
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:  # Chromium announces its DevTools endpoint on stderr once it listens.
            line = lines.get(timeout=60)
            if line.startswith("DevTools listening on ws://"):
                port = int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                break
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


PAGE_CHECK = """JSON.stringify({
  images: Array.from(document.images).map(i => ({
    id: i.id, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
  tables: Array.from(document.querySelectorAll('table')).map(t => ({
    title: t.closest('section').querySelector('h2').textContent,
    rows: t.tBodies[0].rows.length})),
  headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  title: document.title
})"""


def test_html_report_renders_in_headless_chromium(engine: Engine, tmp_path: Path) -> None:
    """Charts decode (naturalWidth > 0), tables have rows, and the console has no errors."""
    stage_history(engine)
    path = write_html(build_report(engine, PIPELINE), tmp_path / "report.html")
    with chromium_page(tmp_path / "profile") as page:
        page.call("Runtime.enable")
        page.call("Log.enable")
        page.call("Page.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        page.call("Page.navigate", url=path.as_uri())
        page.wait_for("Page.loadEventFired")
        result = page.call("Runtime.evaluate", expression=PAGE_CHECK, returnByValue=True)
        state = json.loads(result["result"]["value"])
        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        errors = page.errors()
    import base64

    (tmp_path / "screenshot.png").write_bytes(base64.b64decode(shot["data"]))
    assert state["title"] == "Nurture report: all campaigns"
    assert [i["id"] for i in state["images"]] == ["funnel-chart", "transitions-chart"]
    for img in state["images"]:
        assert img["complete"] and img["width"] > 300 and img["height"] > 150, img
    tables = {t["title"]: t["rows"] for t in state["tables"]}
    assert tables["Stages"] == 8
    assert tables["Stage transitions"] == 8
    assert tables["Speed to lead"] == 1
    assert tables["Campaign steps"] == 1
    assert tables["Touchpoints"] == 3
    assert "Campaign health" in state["headings"]
    assert errors == []
    assert png_size(base64.b64decode(shot["data"]))[1] > 900  # the whole page, not a blank
