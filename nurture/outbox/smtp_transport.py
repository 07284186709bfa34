"""SMTP transport: send prebuilt RFC 5322 messages over a few reused, parallel connections.

The outbox (``nurture.outbox.delivery``) owns the delivery states; this module only talks SMTP and
reports, per message, one :class:`SendResult`:

* ``sent``: the server answered 250 to the end of DATA. Nothing else counts as sent.
* ``rejected``: a 5xx reply to MAIL, RCPT or DATA. Not retried. ``hard_bounce`` says whether
  the *recipient address* is bad, so the caller may suppress it (see :func:`is_hard_bounce`).
* ``retry_later``: connection errors, timeouts, 4xx replies and configuration problems
  (authentication, TLS) that were still failing after ``max_attempts`` tries with
  exponential backoff and jitter (tenacity). The outbox keeps the message queued.

Connections are opened lazily and kept across messages and batches. Each of the
``connections`` worker threads owns one connection and takes messages from a shared queue.
When the server advertises PIPELINING (RFC 2920), MAIL, RCPT and DATA go in one write, so a
message costs two round trips instead of four.

Exactly once: message content is only written after the server's 354, so a connection that
drops before that point cannot have delivered the message, and we retry it on a fresh
connection. A connection that drops after the final ``.`` but before the server's reply is
the classic SMTP ambiguity (RFC 1047); like every MTA we treat it as not delivered and retry,
and say so in ``detail``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Literal

from pydantic import SecretStr
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from nurture.config import parse_server_url

__all__ = [
    "GroupHook",
    "Outcome",
    "Outgoing",
    "SendResult",
    "SmtpConfig",
    "SmtpSender",
    "is_hard_bounce",
]

log = logging.getLogger(__name__)

Security = Literal["plain", "starttls", "ssl"]

_SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("plain", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("ssl", 465),
    "smtp+ssl": ("ssl", 465),
}

# Servers drop idle clients after a few minutes (RFC 5321 asks for at least 5); rather than
# find out mid-send, we quietly reconnect a connection that sat idle longer than this.
_MAX_IDLE_SECONDS = 120.0

# A reply to MAIL FROM that means "log in first" or "bad credentials" is our configuration,
# not the message: keep the message queued instead of failing it.
_AUTH_CODES = frozenset({530, 534, 535, 538})

_ENHANCED = re.compile(rb"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")
_BARE_EOL = re.compile(rb"\r\n|\r|\n")


class Outcome(StrEnum):
    """What happened to one message."""

    sent = "sent"
    retry_later = "retry_later"
    rejected = "rejected"
    # The whole message went out but the connection died before the server's reply: it may
    # or may not have been accepted. Never retried, so a lead never gets it twice.
    unknown = "unknown"


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to connect. ``repr``/``str`` never show the password (a ``SecretStr``)."""

    host: str
    port: int
    security: Security
    username: str | None = None
    password: SecretStr | None = None
    timeout: float = 30.0
    local_hostname: str | None = None

    def __post_init__(self) -> None:
        if self.security not in ("plain", "starttls", "ssl"):
            raise ValueError(f"SMTP security must be plain, starttls or ssl, not {self.security!r}")
        if not self.host:
            raise ValueError("SMTP host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"SMTP port {self.port} is out of range 1-65535")
        if self.timeout <= 0:
            raise ValueError(f"SMTP timeout must be positive, not {self.timeout}")
        if self.password is not None and not isinstance(self.password, SecretStr):
            # Keep the secret wrapped whatever the caller passed.
            object.__setattr__(self, "password", SecretStr(str(self.password)))

    @classmethod
    def from_url(cls, url: str | SecretStr) -> SmtpConfig:
        """Parse ``smtp://user:pass@host:port``, ``smtp+starttls://...`` or ``smtps://...``.

        User and password are percent-decoded. ``?timeout=SECONDS`` is accepted. Errors show
        the URL with the password replaced by ``***``.

        Args:
            url: The URL, plain or wrapped in a ``SecretStr`` (as ``Settings.smtp_url`` is).

        Raises:
            ValueError: On an unknown scheme, a missing host, a bad port or a bad timeout.
        """
        parsed = parse_server_url(url, "SMTP", _SCHEMES)
        return cls(
            host=parsed.host,
            port=parsed.port,
            security=parsed.kind,
            username=parsed.username,
            password=parsed.password,
            timeout=parsed.timeout,
        )


@dataclass(frozen=True)
class Outgoing:
    """One message to send: the envelope and the full RFC 5322 bytes (CRLF line ends)."""

    key: int
    sender: str
    recipient: str
    data: bytes


@dataclass(frozen=True)
class SendResult:
    """The outcome for the message with this ``key``; ``code``/``detail`` are the server's."""

    key: int
    outcome: Outcome
    code: int | None = None
    detail: str | None = None
    hard_bounce: bool = False


def is_hard_bounce(code: int, reply: str | bytes) -> bool:
    """Whether a 5xx reply to RCPT or DATA means the recipient address itself is bad.

    The mapping, used to decide whether to suppress the address:

    * With an RFC 3463 enhanced status code, it decides: ``5.1.x`` (bad mailbox, bad domain,
      bad syntax, moved, null MX) and ``5.2.1`` (mailbox disabled) are hard bounces. Others,
      such as ``5.7.x`` policy/spam blocks, ``5.2.2`` mailbox full, ``5.3.4`` too big or
      ``5.6.x`` content, are not: the address may well work for another message.
    * Without one, 550 (mailbox unavailable), 551 (user not local) and 553 (mailbox name not
      allowed) are hard bounces; 552 (storage/size), 554 (transaction failed, usually policy)
      and the rest are not.

    Args:
        code: The SMTP reply code.
        reply: The reply text after the code.
    """
    if code < 500 or code > 599:
        return False
    text = reply.encode("utf-8", "replace") if isinstance(reply, str) else reply
    match = _ENHANCED.match(text)
    if match and match.group(1) == b"5":
        subject, detail = int(match.group(2)), int(match.group(3))
        return subject == 1 or (subject == 2 and detail == 1)
    return code in (550, 551, 553)


class _Retryable(Exception):
    """A failure worth another try: network trouble, a timeout or a 4xx reply."""

    def __init__(self, code: int | None, detail: str, *, connecting: bool = False) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.connecting = connecting


class _Final(Exception):
    """A failure that another try right now would not fix."""

    def __init__(
        self,
        outcome: Outcome,
        code: int | None,
        detail: str,
        *,
        hard_bounce: bool = False,
        server_down: bool = False,
    ) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.code = code
        self.detail = detail
        self.hard_bounce = hard_bounce
        self.server_down = server_down


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _reply_detail(code: int, reply: bytes | str, stage: str) -> str:
    return f"{stage}: {code} {_text(reply)}".strip()


def _prepare(data: bytes) -> bytes:
    """CRLF line ends, dot-stuffing (RFC 5321 4.5.2) and the terminating ``.``.

    The fast path (already CRLF, no line starting with a dot) costs three scans, in the
    sending threads of the main process: every one of them shows in the tick's throughput.
    """
    # Each CRLF holds one CR and one LF, so there is no bare CR or LF exactly when the CRs
    # and LFs together number twice the CRLFs (two scans instead of four counts).
    if len(data) - len(data.translate(None, b"\r\n")) != 2 * data.count(b"\r\n"):
        data = _BARE_EOL.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_AT_LINE_START.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


@dataclass
class _Slot:
    """One connection, used by one worker thread at a time."""

    conn: smtplib.SMTP | None = None
    pipelining: bool = False
    smtputf8: bool = False
    eightbit: bool = False
    used: bool = False  # at least one transaction completed on this connection
    last_used: float = 0.0


# ``on_group(done, upcoming)``: the results of a connection's previous group, and the keys of
# the group it is about to put on the wire. See :meth:`SmtpSender.send_batch`.
GroupHook = Callable[[list[SendResult], list[int]], None]


@dataclass
class _Batch:
    """Shared state of one ``send_batch`` call."""

    queue: deque[tuple[int, Outgoing]]
    results: list[SendResult | None]
    down: str | None = None  # set when the server cannot be reached: drain the rest
    down_code: int | None = None
    stop: bool = False  # set when the caller was interrupted: take no new messages
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_group: GroupHook | None = None
    group_size: int = 1


class SmtpSender:
    """Sends batches of prebuilt messages over up to ``connections`` reused SMTP connections.

    Use it as a context manager, or call :meth:`close`. One sender may be used for many
    batches; its connections stay open between them. ``send_batch`` calls are serialised.

    Args:
        config: Server, security and credentials.
        connections: Parallel connections (one worker thread each).
        max_attempts: Tries per message for retryable failures, the first one included.
        backoff_base: Seconds before the first retry; doubles each time, plus up to that
            much random jitter, capped at 30 s.
        on_result: Called with each result as soon as its message is done, from the worker
            threads (so it must be thread-safe and should be quick). Use it to record
            progress that must survive a crash in the middle of a batch. An exception it
            raises is logged and does not stop the batch.
    """

    def __init__(
        self,
        config: SmtpConfig,
        *,
        connections: int = 4,
        max_attempts: int = 3,
        backoff_base: float = 0.2,
        on_result: Callable[[SendResult], None] | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, not {connections}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        if backoff_base < 0:
            raise ValueError(f"backoff_base must not be negative, not {backoff_base}")
        self.config = config
        self.connections = connections
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.on_result = on_result
        self._slots = [_Slot() for _ in range(connections)]
        self._batch_lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._local_hostname = config.local_hostname
        self._retrying = Retrying(
            stop=stop_after_attempt(max_attempts),
            wait=wait_exponential(multiplier=backoff_base, max=30.0) + wait_random(0, backoff_base),
            retry=retry_if_exception_type(_Retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )

    def __repr__(self) -> str:
        return (
            f"SmtpSender({self.config!r}, connections={self.connections}, "
            f"max_attempts={self.max_attempts})"
        )

    def __enter__(self) -> SmtpSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """QUIT and close every open connection. The sender may be used again afterwards."""
        with self._batch_lock:
            for slot in self._slots:
                self._drop(slot, polite=True)

    def send_batch(
        self,
        messages: Sequence[Outgoing],
        *,
        on_group: GroupHook | None = None,
        group_size: int = 8,
    ) -> list[SendResult]:
        """Send every message; return exactly one result per message, in no particular order.

        Each result is also passed to ``on_result`` as it happens. If the calling thread is
        interrupted (e.g. ``KeyboardInterrupt``), the workers finish the messages in flight,
        take no new ones, and the exception propagates; results already reached
        ``on_result``.

        Args:
            messages: The messages, each with a unique ``key``.
            on_group: With it, each connection takes up to ``group_size`` messages at a
                time and, before the first byte of them goes on the wire, calls
                ``on_group(done, upcoming)`` with the results of its previous group and the
                keys it is about to transmit (and once more at the end, with ``upcoming``
                empty). The outbox records outcomes and marks rows ``sending`` there, so a
                crash leaves at most ``connections * group_size`` messages in doubt. If it
                raises, that connection transmits nothing more and the others take no new
                group: the group comes back ``retry_later`` untransmitted, and the caller
                must still record every result it gets back.
            group_size: Messages per group (with ``on_group`` only).
        """
        if not messages:
            return []
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, not {group_size}")
        with self._batch_lock:
            batch = _Batch(
                queue=deque(enumerate(messages)),
                results=[None] * len(messages),
                on_group=on_group,
                group_size=group_size if on_group is not None else 1,
            )
            workers = [
                threading.Thread(
                    target=self._work,
                    args=(slot, batch),
                    name=f"smtp-sender-{i}",
                    daemon=True,  # a dying process must not wait on a slow server
                )
                for i, slot in enumerate(self._slots[: min(self.connections, len(messages))])
            ]
            for worker in workers:
                worker.start()
            try:
                for worker in workers:
                    worker.join()
            except BaseException:
                batch.stop = True
                raise
            out: list[SendResult] = []
            for result, msg in zip(batch.results, messages, strict=True):
                if result is None:  # only if a worker died of a bug; keep the message queued
                    result = SendResult(msg.key, Outcome.retry_later, None, "not attempted")
                    self._report(result)
                out.append(result)
            return out

    # -- worker side --------------------------------------------------------------------

    def _work(self, slot: _Slot, batch: _Batch) -> None:
        retrying = self._retrying.copy()
        done: list[SendResult] = []
        try:
            while not batch.stop:
                group = self._take(batch)
                if not group:
                    return
                if batch.on_group is not None and not self._announce(batch, done, group):
                    done = []
                    return
                done = []
                for index, msg in group:
                    if batch.stop:
                        break  # left None: reported "not attempted", nothing was sent
                    if batch.down is not None and slot.conn is None:
                        result = SendResult(
                            msg.key, Outcome.retry_later, batch.down_code, batch.down
                        )
                    else:
                        result = self._deliver(slot, batch, retrying, msg)
                    batch.results[index] = result
                    self._report(result)
                    done.append(result)
        finally:
            if batch.on_group is not None and done:
                try:
                    batch.on_group(done, [])
                except Exception:  # the caller records every returned result anyway
                    log.exception("recording the last group of a connection failed")

    @staticmethod
    def _take(batch: _Batch) -> list[tuple[int, Outgoing]]:
        group: list[tuple[int, Outgoing]] = []
        with batch.lock:
            while batch.queue and len(group) < batch.group_size:
                group.append(batch.queue.popleft())
        return group

    def _announce(
        self, batch: _Batch, done: list[SendResult], group: list[tuple[int, Outgoing]]
    ) -> bool:
        """Call ``on_group`` before ``group`` goes on the wire; False: it failed, so the
        group was answered ``retry_later`` untransmitted and every worker stops."""
        assert batch.on_group is not None
        try:
            batch.on_group(done, [msg.key for _, msg in group])
            return True
        except Exception as exc:
            log.exception("on_group failed; nothing more is transmitted in this batch")
            batch.stop = True
            for index, msg in group:
                result = SendResult(msg.key, Outcome.retry_later, None, f"not sent: {exc}")
                batch.results[index] = result
                self._report(result)
            return False

    def _report(self, result: SendResult) -> None:
        if self.on_result is None:
            return
        try:
            self.on_result(result)
        except Exception:
            log.exception("on_result failed for delivery %s", result.key)

    def _deliver(self, slot: _Slot, batch: _Batch, retrying: Retrying, msg: Outgoing) -> SendResult:
        try:
            try:
                # Most messages succeed on the first try: skip tenacity's bookkeeping for
                # them (it costs ~15% of a message's CPU time on a fast sink).
                code, detail = self._attempt(slot, msg)
            except _Retryable as first:
                code, detail = retrying(_replay_then(first, self._attempt), slot, msg)
            return SendResult(msg.key, Outcome.sent, code, detail)
        except _Retryable as exc:
            if exc.connecting:
                with batch.lock:
                    batch.down, batch.down_code = f"server unreachable: {exc.detail}", exc.code
            return SendResult(msg.key, Outcome.retry_later, exc.code, exc.detail)
        except _Final as exc:
            if exc.server_down:
                with batch.lock:
                    batch.down, batch.down_code = exc.detail, exc.code
            return SendResult(msg.key, exc.outcome, exc.code, exc.detail, exc.hard_bounce)
        except Exception as exc:  # a bug or an exotic error: never lose the message
            log.exception("unexpected error sending delivery %s", msg.key)
            self._drop(slot, polite=False)
            return SendResult(msg.key, Outcome.retry_later, None, f"{type(exc).__name__}: {exc}")

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.debug("SMTP attempt %d failed (%s); retrying", state.attempt_number, exc)

    def _attempt(self, slot: _Slot, msg: Outgoing) -> tuple[int, str]:
        """One try: connect if needed, run the transaction; a stale connection gets one
        free reconnect, because nothing was sent on it yet."""
        if msg.recipient == "" or "\r" in msg.recipient or "\n" in msg.recipient:
            raise _Final(Outcome.rejected, None, f"invalid envelope recipient {msg.recipient!r}")
        if "\r" in msg.sender or "\n" in msg.sender:
            raise _Final(Outcome.rejected, None, f"invalid envelope sender {msg.sender!r}")
        if slot.conn is not None and time.monotonic() - slot.last_used > _MAX_IDLE_SECONDS:
            self._drop(slot, polite=False)  # a QUIT to a vanished peer would hang
        reused = slot.conn is not None and slot.used
        if slot.conn is None:
            self._connect(slot)
        try:
            return self._transaction(slot, msg)
        except _Stale:
            if not reused:
                raise _Retryable(None, "connection closed by server before MAIL") from None
            self._drop(slot, polite=False)
            self._connect(slot)
            try:
                return self._transaction(slot, msg)
            except _Stale:
                raise _Retryable(None, "connection closed by server before MAIL") from None

    def _connect(self, slot: _Slot) -> None:
        cfg = self.config
        if self._local_hostname is None:
            # socket.getfqdn() may do DNS; do it once, not per connection.
            self._local_hostname = socket.getfqdn()
        conn: smtplib.SMTP | None = None
        try:
            if cfg.security == "ssl":
                conn = smtplib.SMTP_SSL(
                    cfg.host,
                    cfg.port,
                    local_hostname=self._local_hostname,
                    timeout=cfg.timeout,
                    context=self._tls_context(),
                )
            else:
                conn = smtplib.SMTP(
                    cfg.host, cfg.port, local_hostname=self._local_hostname, timeout=cfg.timeout
                )
            conn.ehlo_or_helo_if_needed()
            if cfg.security == "starttls":
                conn.starttls(context=self._tls_context())
                conn.ehlo()
            if cfg.username:
                secret = cfg.password.get_secret_value() if cfg.password else ""
                conn.login(cfg.username, secret)
        except smtplib.SMTPAuthenticationError as exc:
            _close_quietly(conn)
            raise _Final(
                Outcome.retry_later,
                exc.smtp_code,
                _reply_detail(exc.smtp_code, exc.smtp_error, "AUTH failed"),
                server_down=True,
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            # No STARTTLS or no AUTH offered: never fall back to sending in clear text.
            _close_quietly(conn)
            raise _Final(
                Outcome.retry_later, None, f"refusing to go on: {exc}", server_down=True
            ) from None
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            _close_quietly(conn)
            raise _Final(
                Outcome.retry_later, None, f"TLS failed: {exc}", server_down=True
            ) from None
        except smtplib.SMTPResponseException as exc:  # greeting or EHLO refused
            _close_quietly(conn)
            raise _Retryable(
                exc.smtp_code,
                _reply_detail(exc.smtp_code, exc.smtp_error, "connect"),
                connecting=True,
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            _close_quietly(conn)
            raise _Retryable(
                None, f"connect to {cfg.host}:{cfg.port}: {exc}", connecting=True
            ) from None
        with contextlib.suppress(OSError, AttributeError):
            # We always write whole commands, so Nagle only adds latency (and, with delayed
            # ACKs on a real network, 40 ms stalls between DATA and the content).
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        slot.conn = conn
        slot.pipelining = conn.has_extn("pipelining")
        slot.smtputf8 = conn.has_extn("smtputf8")
        slot.eightbit = conn.has_extn("8bitmime")
        slot.used = False
        slot.last_used = time.monotonic()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _drop(self, slot: _Slot, *, polite: bool) -> None:
        conn, slot.conn = slot.conn, None
        if conn is None:
            return
        if polite:
            with contextlib.suppress(OSError, smtplib.SMTPException, AttributeError):
                # Goodbyes are a courtesy: do not wait long for a server that is gone.
                conn.sock.settimeout(min(self.config.timeout, 5.0))  # type: ignore[union-attr]
                conn.quit()
        _close_quietly(conn)

    def _transaction(self, slot: _Slot, msg: Outgoing) -> tuple[int, str]:
        """MAIL, RCPT, DATA and the content on an open connection.

        Returns the final 250 reply. Raises ``_Stale`` if the connection turned out dead
        before the server answered anything, ``_Retryable`` or ``_Final`` otherwise.
        """
        conn = slot.conn
        assert conn is not None
        mail_opts = ""
        if not (msg.sender.isascii() and msg.recipient.isascii()):
            if not slot.smtputf8:
                # Fatal, not retryable: the same server will not grow SMTPUTF8 on retry.
                raise _Final(
                    Outcome.rejected,
                    None,
                    "the address has a non-ASCII local part and the server does not offer "
                    "SMTPUTF8 (RFC 6531), so it cannot be delivered through this server",
                )
            mail_opts = " SMTPUTF8"
        if slot.eightbit and not msg.data.isascii():
            mail_opts += " BODY=8BITMIME"
        envelope = f"MAIL FROM:<{msg.sender}>{mail_opts}\r\nRCPT TO:<{msg.recipient}>\r\n"
        answered = False
        content_sent = False
        try:
            if slot.pipelining:
                conn.send((envelope + "DATA\r\n").encode())
                mail = conn.getreply()
                answered = True
                try:
                    rcpt = conn.getreply()
                    data = conn.getreply()
                except smtplib.SMTPServerDisconnected:
                    if mail[0] != 421:
                        raise
                    # The server said why before hanging up; report that.
                    rcpt = data = (-1, b"")
            else:
                mail_line, rcpt_line, _ = envelope.split("\r\n")
                conn.send((mail_line + "\r\n").encode())
                mail = conn.getreply()
                answered = True
                if mail[0] != 250:
                    rcpt = data = (-1, b"")
                else:
                    conn.send((rcpt_line + "\r\n").encode())
                    rcpt = conn.getreply()
                    if rcpt[0] not in (250, 251):
                        data = (-1, b"")
                    else:
                        conn.send(b"DATA\r\n")
                        data = conn.getreply()
            if mail[0] != 250 or rcpt[0] not in (250, 251) or data[0] != 354:
                if data[0] == 354:
                    # Pipelined DATA accepted although MAIL or RCPT failed (RFC 2920 says
                    # it must not be): send an empty body so the server leaves DATA mode.
                    conn.send(b".\r\n")
                    conn.getreply()
                self._fail_envelope(slot, mail, rcpt, data)
            conn.send(_prepare(msg.data))
            content_sent = True
            code, reply = conn.getreply()
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            self._drop(slot, polite=False)
            if not answered:
                raise _Stale() from None
            if content_sent:
                raise _Final(
                    Outcome.unknown,
                    None,
                    f"connection lost after end of DATA, before the reply: {exc}; "
                    "the server may have accepted it, so it is not resent",
                ) from None
            raise _Retryable(None, f"connection lost: {exc}") from None
        slot.last_used = time.monotonic()
        if code == 250:
            slot.used = True
            return code, _text(reply)
        detail = _reply_detail(code, reply, "DATA")
        if code == 421:
            self._drop(slot, polite=False)
        if 400 <= code < 500:
            raise _Retryable(code, detail)
        if 500 <= code < 600:
            raise _Final(Outcome.rejected, code, detail, hard_bounce=is_hard_bounce(code, reply))
        # Not a reply SMTP allows here: the session is in an unknown state.
        self._drop(slot, polite=False)
        raise _Final(Outcome.retry_later, code, detail)

    def _fail_envelope(
        self,
        slot: _Slot,
        mail: tuple[int, bytes],
        rcpt: tuple[int, bytes],
        data: tuple[int, bytes],
    ) -> None:
        """Classify the first failed envelope reply, reset or drop the session, and raise."""
        if mail[0] != 250:
            code, reply, stage = mail[0], mail[1], "MAIL FROM"
        elif rcpt[0] not in (250, 251):
            code, reply, stage = rcpt[0], rcpt[1], "RCPT TO"
        else:
            code, reply, stage = data[0], data[1], "DATA"
        detail = _reply_detail(code, reply, stage)
        if code == 421 or not 400 <= code < 600:
            # Shutting down, or a reply we cannot parse: this session is over.
            self._drop(slot, polite=False)
        else:
            self._reset(slot)
        if 400 <= code < 500:
            raise _Retryable(code, detail)
        if stage == "MAIL FROM":
            # A refused sender says nothing about the recipient: never a hard bounce.
            outcome = Outcome.retry_later if code in _AUTH_CODES else Outcome.rejected
            raise _Final(outcome, code, detail)
        if 500 <= code < 600:
            raise _Final(Outcome.rejected, code, detail, hard_bounce=is_hard_bounce(code, reply))
        raise _Retryable(code if code > 0 else None, detail)

    def _reset(self, slot: _Slot) -> None:
        """RSET after a failed transaction so the connection can carry the next one."""
        conn = slot.conn
        if conn is None:
            return
        try:
            code, _ = conn.rset()
        except (OSError, smtplib.SMTPException):
            code = -1
        if code != 250:
            self._drop(slot, polite=False)


def _replay_then(
    first: BaseException, attempt: Callable[[_Slot, Outgoing], tuple[int, str]]
) -> Callable[[_Slot, Outgoing], tuple[int, str]]:
    """An attempt function whose first call re-raises ``first`` (the try already made),
    so tenacity counts it, waits, and makes the remaining tries."""
    pending = [first]

    def call(slot: _Slot, msg: Outgoing) -> tuple[int, str]:
        if pending:
            raise pending.pop()
        return attempt(slot, msg)

    return call


class _Stale(Exception):
    """The connection was dead before the server answered anything for this message."""


def _close_quietly(conn: smtplib.SMTP | None) -> None:
    if conn is None:
        return
    with contextlib.suppress(OSError):
        conn.close()
