"""Recording spool lines, in the serving process or in a child of its own.

:func:`record_lines` decodes spool lines and records them (exactly once per ``xid``).

Decoding spool lines, classifying them and writing them to the database is Python work.
On the server's own interpreter it competes with the event loop for the GIL, and clicks
wait behind each batch. ``nurture serve`` therefore records through a child process,
``python -m nurture.engagement.spool_recorder``: the server still owns its segment files,
their locks and offsets (see :mod:`nurture.engagement.spool`) and only ships complete lines
over a pipe; the child records them with :func:`record_lines` and
answers with the lines to park.

A child that dies (or is killed) mid-batch fails that batch as an operational error: the
spool retries it on a fresh child, and the records the dead child had committed are
deduplicated by their ``xid``. The child exits when its stdin closes (its parent is gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from nurture.engagement.capture import apply_captures
from nurture.engagement.events import EventError, EventIn, RecordResult, record_events
from nurture.frames import read_frame, write_frame
from nurture.store.db import session_scope

__all__ = [
    "RecorderProcess",
    "RecorderUnavailable",
    "is_operational",
    "record_lines",
    "record_to_event",
]

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class RecorderUnavailable(RuntimeError):
    """The recorder process is gone or the database said "not now": retry the batch later."""


class RecorderProcess:
    """A child process that records spool lines; used from one thread at a time."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.process: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # The child must import this very copy of nurture, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "nurture.engagement.spool_recorder"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None
        # The URL may hold a password: it goes over the pipe, never on the command line.
        write_frame(proc.stdin, (os.getpid(), self.database_url))
        self.process = proc
        return proc

    def record(self, raws: Sequence[bytes], now: datetime) -> list[tuple[bytes, str]]:
        """Record ``raws`` at ``now`` in the child; the lines to park, with reasons.

        Raises:
            RecorderUnavailable: the child died or the database is unavailable; nothing
                is lost, the caller retries the same lines.
        """
        proc = self.process if self.process and self.process.poll() is None else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            write_frame(proc.stdin, (now, list(raws)))
            reply = read_frame(proc.stdout)
        except (BrokenPipeError, OSError) as exc:
            reply = None
            log.warning("spool recorder pipe failed: %s", exc)
        if reply is None:
            self._reap()
            raise RecorderUnavailable("the spool recorder process exited; restarting it")
        status, body = reply
        if status == "ok":
            return list(body)
        raise RecorderUnavailable(str(body))

    def _reap(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop the child: it exits once its stdin closes (killed after 5 s)."""
        self._reap()


# -- recording spool lines (in the server or in the child) ----------------------------


def is_operational(exc: BaseException) -> bool:
    """Whether a database error says "not now" (retry later) rather than "not this item".

    Locked or busy SQLite, a PostgreSQL server that is down or restarting, a dropped
    connection and a pool timeout are all operational; constraint and data errors are not.
    """
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        sa_exc.OperationalError
        | sa_exc.InterfaceError
        | sa_exc.DisconnectionError
        | sa_exc.TimeoutError,
    )


def record_to_event(rec: dict[str, Any]) -> EventIn:
    """The :class:`EventIn` a spooled record stands for (raises ``EventError``/``KeyError``)."""
    at = rec["at"]
    return EventIn(
        rec["type"],
        # Unix seconds (cheaper to write than ISO 8601 on the request path); ISO accepted.
        datetime.fromisoformat(at) if isinstance(at, str) else datetime.fromtimestamp(at, UTC),
        lead_id=rec.get("lead"),
        email=rec.get("email"),
        delivery_id=rec.get("delivery"),
        url=rec.get("url"),
        external_id=rec["xid"],
        payload=rec.get("payload") or {},
    )


def record_lines(engine: Engine, raws: Sequence[bytes], now: datetime) -> list[tuple[bytes, str]]:
    """Decode and record spool lines in one transaction; on a non-operational failure,
    item by item. Returns the lines to park, each with its reason.

    Raises:
        Exception: an operational database error (the caller retries the batch; records
            committed before it are deduplicated by their ``xid`` on the replay).
    """
    records, bad = _decode(raws)
    return bad + _record(engine, records, now)


def _record(
    engine: Engine, records: Sequence[tuple[bytes, EventIn]], now: datetime
) -> list[tuple[bytes, str]]:
    if not records:
        return []
    try:
        _commit(engine, [e for _, e in records], now)
        return []
    except Exception as exc:
        if is_operational(exc):
            raise
        if len(records) == 1:
            return [(records[0][0], _reason(exc))]
    parked: list[tuple[bytes, str]] = []
    for raw, event in records:
        try:
            _commit(engine, [event], now)
        except Exception as exc:
            if is_operational(exc):
                raise  # the items before this one are recorded; the replay dedups them
            parked.append((raw, _reason(exc)))
    return parked


def _commit(engine: Engine, events: Sequence[EventIn], now: datetime) -> RecordResult:
    with session_scope(engine) as session:
        # Form signups and opt-in confirmations create leads and consents first.
        return record_events(session, apply_captures(session, events, now), now=now)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _decode(
    raws: Sequence[bytes],
) -> tuple[list[tuple[bytes, EventIn]], list[tuple[bytes, str]]]:
    """Spool lines as events, and the lines that are not records (with a reason)."""
    good: list[tuple[bytes, EventIn]] = []
    bad: list[tuple[bytes, str]] = []
    for raw in raws:
        try:
            rec = json.loads(raw)
            good.append((raw, record_to_event(rec)))
        except (ValueError, KeyError, TypeError, EventError) as exc:
            bad.append((raw, f"unreadable spool record: {type(exc).__name__}: {exc}"))
    return good, bad


# -- the child --------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """Be killed with the server (Linux ``PR_SET_PDEATHSIG``), as a recording thread would
    be: a batch in flight is replayed by whoever adopts the spool, never finished late."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the server died before the signal was armed
        sys.exit(0)


def _serve() -> None:
    """The child: record batches until stdin closes."""
    from nurture.store.db import make_engine

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # Anything printed by mistake must not corrupt the frames.
    sys.stdout = sys.stderr
    hello = read_frame(stdin)
    if hello is None:
        return
    parent, url = hello
    _die_with(parent)
    engine = make_engine(url)
    while (request := read_frame(stdin)) is not None:
        now, raws = request
        try:
            reply: tuple[str, object] = ("ok", record_lines(engine, raws, now))
        except Exception as exc:  # operational (record_lines parks everything else)
            kind = "operational" if is_operational(exc) else "unexpected"
            reply = ("retry", f"{kind}: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            write_frame(stdout, reply)
        except BrokenPipeError:
            return  # the server is gone; what was committed is deduplicated on its replay


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _serve()
