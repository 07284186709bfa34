"""A real ``prefect server`` and process workers on 127.0.0.1, for the deployment tests.

Everything runs offline under a temporary PREFECT_HOME. The server stops on SIGINT and a
worker on SIGTERM (what Prefect handles gracefully); both are killed if they overstay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nurture.config import PROJECT_ROOT
from tests.servers import free_port

BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for every Prefect process of a test: offline, quiet, fast polling."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NURTURE_"))}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_CLI_WRAP_LINES": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen[bytes], sig: int, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class PrefectServer:
    """``prefect server start`` on a free port of 127.0.0.1, with its own PREFECT_HOME."""

    home: Path
    database_url: str | None = None  # PostgreSQL (asyncpg) for the server; None: SQLite
    scheduler: bool = False  # off: only the runs a test triggers happen
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # Where the README's commands and the workers run: a programme made by `nurture init`.
    workdir: Path = PROJECT_ROOT

    @property
    def api_url(self) -> str:
        """The API base URL clients and workers use."""
        return f"http://127.0.0.1:{self.port}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client or worker of this server."""
        return prefect_env(self.home, self.api_url, **extra)

    def start(self, timeout: float = 120.0) -> PrefectServer:
        """Start the server and wait until /api/health answers (about 20 s cold)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        env = prefect_env(self.home, PREFECT_SERVER_API_PORT=str(self.port))
        if not self.scheduler:
            env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        self.log = self.home / "server.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"],
                env=env,
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"prefect server not healthy after {timeout} s")

    def stop_workers(self) -> None:
        """Stop every worker started so far (SIGTERM, then kill after 20 s)."""
        for worker in self.workers:
            _stop(worker, signal.SIGTERM, 20)
        self.workers.clear()

    def stop(self) -> None:
        """Stop the workers (SIGTERM), then the server (SIGINT)."""
        self.stop_workers()
        if self.proc is not None:
            _stop(self.proc, signal.SIGINT, 30)
            self.proc = None

    def cli(
        self, command: str, *, env: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> str:
        """Run one ``prefect ...`` command line (as the README writes it) in ``workdir``."""
        proc = subprocess.run(
            command,
            shell=True,
            env=dict(env or self.env()),
            cwd=self.workdir,
            capture_output=True,
            timeout=timeout,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{command!r} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def start_worker(self, command: str, env: Mapping[str, str], name: str) -> None:
        """Start a worker from a README command line; its output goes to a log file."""
        log = self.home / f"worker-{name}.log"
        with log.open("wb") as out:
            self.workers.append(
                subprocess.Popen(
                    [*_words(command), "--name", name],
                    env=dict(env),
                    cwd=self.workdir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

    def worker_logs(self) -> str:
        """Every worker's output so far (for assertion messages)."""
        return "\n".join(p.read_text(errors="replace") for p in self.home.glob("worker-*.log"))

    # ------------------------------------------------------------------ API

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON call to the server's REST API."""
        response = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment(self, flow: str, name: str) -> dict[str, Any]:
        """A deployment by ``flow/name``."""
        return dict(self.api("GET", f"/deployments/name/{flow}/{name}"))

    def wait_for_runs(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Poll until every flow run is in a terminal state (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = [self.api("GET", f"/flow_runs/{i}") for i in ids]
            if all(r["state_type"] in TERMINAL for r in runs):
                return runs
            if time.monotonic() > deadline:
                states = [(r["name"], r["state_type"]) for r in runs]
                raise TimeoutError(
                    f"flow runs not finished after {timeout} s: {states}\n"
                    f"{self.worker_logs()[-4000:]}"
                )
            time.sleep(0.5)

    def artifacts(self, flow_run_id: str) -> dict[str, Any]:
        """The artifacts a flow run published, by key, with table data decoded."""
        rows = self.api(
            "POST",
            "/artifacts/filter",
            {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
        )
        out: dict[str, Any] = {}
        for row in rows:
            data = row["data"]
            if row["type"] == "table" and isinstance(data, str):
                data = json.loads(data)
            out[row["key"] or row["id"]] = data
        return out

    def logs(self, flow_run_id: str) -> list[str]:
        """The log messages of one flow run."""
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
        rows = self.api("POST", "/logs/filter", body)
        return [r["message"] for r in rows]

    def wait_for_log(self, flow_run_id: str, text: str, timeout: float = 30.0) -> bool:
        """Whether a log line containing ``text`` arrives (the server stores logs in batches)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.logs(flow_run_id)):
                return True
            time.sleep(0.5)
        return False


def _words(command: str) -> list[str]:
    import shlex

    return shlex.split(command)


def run_id_from(output: str) -> str:
    """The flow run id that ``prefect deployment run`` printed."""
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:", 1)[1].strip()
    raise ValueError(f"no flow run UUID in:\n{output}")
