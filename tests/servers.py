"""Real servers for the tests: a throwaway PostgreSQL cluster and an SMTP sink (aiosmtpd)."""

from __future__ import annotations

import email
import email.policy
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: install Debian's postgresql package "
        "(`apt-get install -y postgresql`); .ci/run does this on CI"
    )


@dataclass
class PostgresCluster:
    """A PostgreSQL server on 127.0.0.1 in a temporary folder, trust auth, fsync off."""

    datadir: Path
    port: int
    user: str = "postgres"
    _runas: list[str] = field(default_factory=list)

    @classmethod
    def start(cls) -> PostgresCluster:
        """initdb and start a fresh cluster; as root, run it as the postgres user."""
        bindir = _pg_bin()
        base = Path(tempfile.mkdtemp(prefix="nurture-pg-"))
        datadir = base / "data"
        runas: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(base, pw.pw_uid, pw.pw_gid)
            runas = ["runuser", "-u", "postgres", "--"]
        port = free_port()
        subprocess.run(
            [
                *runas,
                str(bindir / "initdb"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
                str(datadir),
            ],
            check=True,
            capture_output=True,
        )
        opts = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            f"-c full_page_writes=off -c max_connections=200 -k {base}"
        )
        subprocess.run(
            [
                *runas,
                str(bindir / "pg_ctl"),
                "-D",
                str(datadir),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "-l",
                str(base / "log"),
                "start",
            ],
            check=True,
            capture_output=True,
        )
        return cls(datadir=datadir, port=port, _runas=runas)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL for one database of this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement in autocommit mode (CREATE DATABASE and the like)."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname={database}", autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop the server and remove its files."""
        bindir = _pg_bin()
        subprocess.run(
            [
                *self._runas,
                str(bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


class _Keeper:
    """aiosmtpd handler that keeps every accepted message, with an optional reply hook."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.sink.rcpt_hook is not None:
            reply = self.sink.rcpt_hook(address)
            if reply:
                return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_hook is not None:
            reply = self.sink.data_hook(envelope)
            if reply:
                return reply
        raw = envelope.original_content or b""
        with self.sink.lock:
            for rcpt in envelope.rcpt_tos:
                self.sink.raw.append((rcpt, raw))
        return "250 Message accepted"


@dataclass
class SmtpSink:
    """A real SMTP server on 127.0.0.1 (aiosmtpd in a thread) that keeps what it accepts."""

    host: str = "127.0.0.1"
    port: int = 0
    raw: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rcpt_hook: Callable[[str], str | None] | None = None
    data_hook: Callable[[Any], str | None] | None = None
    _controller: Controller | None = None

    def start(self) -> SmtpSink:
        """Start listening on a free port."""
        self.port = self.port or free_port()
        self._controller = Controller(
            _Keeper(self), hostname=self.host, port=self.port, ready_timeout=10
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop the server."""
        if self._controller is not None:
            self._controller.stop()

    @property
    def url(self) -> str:
        """The ``smtp://`` URL our settings take."""
        return f"smtp://{self.host}:{self.port}"

    @property
    def messages(self) -> list[tuple[str, EmailMessage]]:
        """Every (recipient, parsed message), in arrival order. Parsed on demand: the
        server thread only stores bytes, so it keeps up with a fast sender."""
        with self.lock:
            raw = list(self.raw)
        return [
            (rcpt, email.message_from_bytes(data, policy=email.policy.default))  # type: ignore[misc]
            for rcpt, data in raw
        ]

    def count(self) -> int:
        """How many (recipient, message) pairs arrived."""
        with self.lock:
            return len(self.raw)

    def recipients(self) -> list[str]:
        """Every envelope recipient, in arrival order."""
        with self.lock:
            return [r for r, _ in self.raw]

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` messages arrived (real I/O, so we poll briefly)."""
        deadline = time.monotonic() + timeout
        while self.count() < count and time.monotonic() < deadline:
            time.sleep(0.01)
