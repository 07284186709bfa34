"""Real servers for the tests: a throwaway PostgreSQL cluster and an SMTP sink (aiosmtpd)."""

from __future__ import annotations

import asyncio
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
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from nurture.outbox.smtp_transport import SmtpConfig


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

    def restart(self) -> None:
        """Restart the server in place, dropping every connection (fast shutdown)."""
        bindir = _pg_bin()
        subprocess.run(
            [*self._runas, str(bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w",
             "-t", "60", "-l", str(self.datadir.parent / "log"), "restart"],
            check=True, capture_output=True,
        )  # fmt: skip

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
                self.sink.mail_options.append(list(envelope.mail_options))
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
    #: Advertise SMTPUTF8 (RFC 6531) and accept non-ASCII addresses with it (aiosmtpd's
    #: Controller default).
    smtputf8: bool = True
    #: The MAIL FROM parameters of each kept message, parallel to ``raw``.
    mail_options: list[list[str]] = field(default_factory=list)
    _controller: Controller | None = None

    def start(self) -> SmtpSink:
        """Start listening on a free port."""
        self.port = self.port or free_port()
        self._controller = Controller(
            _Keeper(self),
            hostname=self.host,
            port=self.port,
            ready_timeout=10,
            enable_SMTPUTF8=self.smtputf8,
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


PASSWORD = "s3cr3t-Pa55word"  # the one account of RecordingServer(auth=True)


def _transport(server: SMTP) -> asyncio.Transport:
    assert isinstance(server.transport, asyncio.Transport)
    return server.transport


class Recorder:
    """aiosmtpd handler that counts sessions and can refuse, fail or hang up on cue."""

    def __init__(self, *, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.sessions = 0
        self.logins = 0
        self.messages: list[tuple[str, bytes]] = []
        self.transports: list[asyncio.Transport] = []
        self.mail_hook: Callable[[str], str | None] | None = None
        self.rcpt_hook: Callable[[str], str | None] | None = None
        self.data_hook: Callable[[str], str | None] | None = None
        # Return True to hang up after receiving the whole message, without replying.
        self.drop_hook: Callable[[str], bool] | None = None

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> list[str]:
        session.host_name = hostname
        self.sessions += 1
        self.transports.append(_transport(server))
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return list(responses)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self.mail_hook(address) if self.mail_hook else None
        if reply:
            if reply.startswith("421"):
                asyncio.get_running_loop().call_soon(_transport(server).close)
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self.rcpt_hook(address) if self.rcpt_hook else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rcpt = envelope.rcpt_tos[0]
        if self.drop_hook and self.drop_hook(rcpt):
            _transport(server).abort()  # the reply below goes nowhere
            return "250 never seen"
        reply = self.data_hook(rcpt) if self.data_hook else None
        if reply:
            return reply
        self.messages.append((rcpt, envelope.original_content or b""))
        return "250 2.0.0 Ok: queued"

    def recipients(self) -> list[str]:
        return [r for r, _ in self.messages]


class RecordingServer:
    """A real aiosmtpd server on 127.0.0.1 with the :class:`Recorder` handler."""

    def __init__(self, *, pipelining: bool, auth: bool = False, port: int = 0) -> None:
        self.handler = Recorder(pipelining=pipelining)
        self.port = port or free_port()
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": False}
        if auth:
            kwargs.update(auth_require_tls=False, authenticator=self._authenticate)
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10, **kwargs
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.handler.logins += 1
        ok = isinstance(data, LoginPassword) and data == (b"mailer", PASSWORD.encode())
        return AuthResult(success=ok, handled=False)

    def start(self) -> RecordingServer:
        """Start listening."""
        self.controller.start()
        self.running = True
        return self

    def stop(self) -> None:
        """Stop listening (again is fine)."""
        if getattr(self, "running", False):
            self.controller.stop()
            self.running = False

    def config(self, **kw: Any) -> SmtpConfig:
        """Transport settings for this server."""
        return SmtpConfig(host="127.0.0.1", port=self.port, security="plain", **kw)

    def hang_up_all(self) -> None:
        """Close every server-side connection, as an idle timeout would."""

        async def abort() -> None:
            for transport in self.handler.transports:
                transport.abort()
            await asyncio.sleep(0)  # let the loop run the connection_lost callbacks
            await asyncio.sleep(0)

        loop = self.controller.loop
        asyncio.run_coroutine_threadsafe(abort(), loop).result(timeout=5)
