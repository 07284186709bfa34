"""The tracking service's durable local spool: answer first, record in the database later.

A click, an open or an unsubscribe is appended to a JSON Lines *segment* file with one
``write()`` before the request is answered, so a SIGKILL of the process (or of uvicorn)
loses nothing that was answered: the bytes are in the kernel's page cache. A background
writer (an asyncio task on the server's event loop) then, in a loop:

1. fsyncs the segment (so a power loss can cost at most the requests of the last cycle,
   a few milliseconds under load; the request path itself never waits for a disk flush);
2. reads up to ``batch`` complete lines past its offset;
3. records them with :func:`nurture.engagement.events.record_events` in one transaction on a worker
   thread, and only then moves its offset (kept in a ``.offset`` file beside the segment).

Each record carries a unique id that becomes the event's ``external_id``, so a crash between
the commit and the offset update replays the batch harmlessly: ``record_events`` counts
those as duplicates. That is what makes it exactly once per answered request.

Failures are classified. An operational database error (locked, down, connection lost,
pool timeout) leaves the offset where it is and retries with a capped backoff, for as long
as it takes. Any other error splits the batch and records item by item; an item that still
fails on its own (or a line that is not a record at all) is *parked*: appended, with its
reason, to ``<process>.parked.jsonl`` in the spool folder, never dropped and never retried
in a loop.

Several processes (uvicorn ``--workers``, several hosts on a shared folder or not) share
nothing but the database: each writes its own segments, named by a random process id and
held under an exclusive ``flock`` for as long as the process lives. At start, and every
``adopt_every`` seconds, a writer looks for segments whose lock is free (their process
died), locks them and drains them too; two live processes never drain the same file.
A fully drained segment is deleted (the active one is rotated first once it is large).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from nurture.engagement.events import EventError, EventIn, RecordResult, record_events
from nurture.store.db import session_scope

__all__ = ["Spool", "is_operational"]

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
# One encoder for every record: json.dumps with options builds a new one per call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
ROTATE_BYTES = 8 * 1024 * 1024
_BACKOFF_START = 0.05
_BACKOFF_CAP = 5.0


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
        delivery_id=rec.get("delivery"),
        url=rec.get("url"),
        external_id=rec["xid"],
        payload=rec.get("payload") or {},
    )


@dataclass
class _Segment:
    """One spool file being written or drained, with its lock and read offset."""

    path: Path
    fd: int  # O_RDWR|O_APPEND, holds the flock
    offset: int = 0
    own: bool = True
    buffer: bytes = b""  # bytes past ``offset`` already read but not yet a whole line
    lines: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def offset_path(self) -> Path:
        return self.path.with_suffix(".offset")

    def save_offset(self) -> None:
        # Fixed width, one pwrite: a crash leaves the old or the new value, never a mix.
        # Not fsync'd: an offset that goes back only replays (idempotent) records.
        fd = os.open(self.offset_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, b"%020d\n" % self.offset, 0)
        finally:
            os.close(fd)

    def load_offset(self) -> None:
        try:
            raw = self.offset_path.read_bytes()
        except FileNotFoundError:
            return
        text = raw.strip()
        if text.isdigit():
            self.offset = int(text)


def _lock(path: Path, create: bool) -> int | None:
    """Open ``path`` and take its exclusive flock without waiting; ``None`` if it is taken
    or the file has just been deleted by the process that drained it."""
    flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if os.fstat(fd).st_nlink == 0:  # unlinked between our open and our lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return None
    return fd


class Spool:
    """A per-process durable spool of engagement events and the writer that drains it.

    Args:
        folder: Where segment files live (``NURTURE_SPOOL_DIR``); created if missing.
        engine: The database the writer records into.
        clock: The injected clock (the ``now`` given to ``record_events``).
        batch: Records per database transaction.
        adopt_every: Seconds between scans for orphaned segments of dead processes.
        interval: Pause after a batch that was not full, so that under load the writer
            records few large batches instead of many tiny ones (each is a transaction,
            and its Python work competes with the event loop for the GIL).
    """

    def __init__(
        self,
        folder: Path,
        engine: Engine,
        clock: Callable[[], datetime],
        *,
        batch: int = 1000,
        adopt_every: float = 30.0,
        interval: float = 0.05,
    ) -> None:
        self.folder = Path(folder)
        self.engine = engine
        self.clock = clock
        self.batch = batch
        self.adopt_every = adopt_every
        self.interval = interval
        self.process_id = uuid.uuid4().hex[:16]
        self._seq = 0
        self._active: _Segment | None = None
        self._segments: list[_Segment] = []  # drained oldest first; the active one last
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._dirty = False
        self._executor: ThreadPoolExecutor | None = None
        # Counters for /healthz and tests (guarded by the condition for other threads).
        self._cond = threading.Condition()
        self.written = 0
        self.drained = 0
        self.parked = 0
        # Writes that failed (disk full): opens and clicks were answered without their
        # event, unsubscribes were refused with a 503 page.
        self.lost = 0
        self.adopted_pending = 0
        self.last_error: str | None = None

    # -- the request path (event loop thread) ----------------------------------------

    def append(self, record: dict[str, Any]) -> str:
        """Write one record to the active segment before the request is answered.

        ``record`` gets an ``xid`` (the event's external_id) unless it has one. Returns it.
        """
        if self._active is None:
            raise RuntimeError("the spool is not open")
        xid = record.get("xid")
        if xid is None:
            # 128 random bits, like a uuid4, without building a UUID object per request.
            xid = record["xid"] = "track:" + os.urandom(16).hex()
        os.write(self._active.fd, _ENCODE(record).encode() + b"\n")
        self._dirty = True
        self.written += 1
        if self._wake is not None:
            self._wake.set()
        return str(xid)

    def try_append(self, record: dict[str, Any]) -> bool:
        """:meth:`append`, but a failed write (disk full, I/O error) is logged and counted
        in ``lost`` instead of raised; ``False`` then."""
        try:
            self.append(record)
        except OSError as exc:
            self.lost += 1
            log.error("spool write failed, event lost: %s: %s", type(exc).__name__, exc)
            return False
        return True

    # -- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Create this process's first segment and adopt orphaned ones (synchronous)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._active = self._new_segment()
        self._segments.append(self._active)
        self._adopt()

    async def start(self) -> None:
        """Open the spool and start the writer task on the running loop."""
        if self._active is None:
            self.open()
        self._loop = asyncio.get_running_loop()
        # One thread of its own: the writer's database work never waits behind (or holds
        # up) the threads that serve requests.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nurture-spool")
        self._wake = asyncio.Event()
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="nurture-spool-writer")

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Try to drain for up to ``drain_seconds``, then stop; what is left stays on disk
        for the next start (or another process) to replay."""
        if self._task is not None:
            deadline = asyncio.get_running_loop().time() + drain_seconds
            while self.pending() and asyncio.get_running_loop().time() < deadline:
                if self.last_error is not None:
                    break  # the database is failing: leave the rest for the next start
                await asyncio.sleep(0.01)
            self._stopping = True
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, timeout=max(1.0, drain_seconds))
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None
        self.close()

    def close(self) -> None:
        """Release every segment lock; drained segments are deleted, others kept."""
        for seg in self._segments:
            self._release(seg, delete=self._fully_drained(seg))
        self._segments.clear()
        self._active = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- state for health checks and tests -------------------------------------------

    def pending(self) -> int:
        """Records written or adopted and not yet recorded or parked."""
        return self.written + self.adopted_pending - self.drained - self.parked

    def wait_drained(self, timeout: float) -> bool:
        """Block (another thread) until nothing is pending; ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.pending() <= 0, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/healthz``."""
        return {
            "pending": self.pending(),
            "written": self.written,
            "recorded": self.drained,
            "parked": self.parked,
            "lost": self.lost,
            "segments": len(self._segments),
            "last_error": self.last_error,
        }

    # -- segments ----------------------------------------------------------------------

    def _new_segment(self) -> _Segment:
        self._seq += 1
        path = self.folder / f"spool-{self.process_id}-{self._seq:06d}{SEGMENT_SUFFIX}"
        fd = _lock(path, create=True)
        if fd is None:  # pragma: no cover - a fresh random name cannot be locked by others
            raise RuntimeError(f"cannot lock new spool segment {path}")
        return _Segment(path, fd)

    def _adopt(self) -> None:
        """Lock and queue every segment whose owner is gone."""
        known = {seg.path for seg in self._segments}
        for path in sorted(self.folder.glob(f"spool-*{SEGMENT_SUFFIX}")):
            if path in known:
                continue
            fd = _lock(path, create=False)
            if fd is None:
                continue
            seg = _Segment(path, fd, own=False)
            seg.load_offset()
            # Count what is left so pending() and wait_drained() cover adopted records.
            with open(path, "rb") as f:
                f.seek(seg.offset)
                self.adopted_pending += f.read().count(b"\n")
            log.info("adopting spool segment %s at offset %d", path.name, seg.offset)
            self._segments.insert(len(self._segments) - 1, seg)

    def _release(self, seg: _Segment, *, delete: bool) -> None:
        if delete:
            # Unlink while still holding the lock: a process that opened the file just
            # before sees st_nlink == 0 once it gets the lock, and leaves it alone.
            for p in (seg.path, seg.offset_path):
                p.unlink(missing_ok=True)
        try:
            fcntl.flock(seg.fd, fcntl.LOCK_UN)
        finally:
            os.close(seg.fd)

    def _fully_drained(self, seg: _Segment) -> bool:
        return seg.offset >= os.fstat(seg.fd).st_size

    def _read_lines(self, seg: _Segment, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` complete lines past the offset, each with its end offset."""
        out: list[tuple[int, bytes]] = []
        pos = seg.offset
        size = os.fstat(seg.fd).st_size
        while len(out) < limit and pos < size:
            chunk = os.pread(seg.fd, min(1 << 20, size - pos), pos)
            if not chunk:
                break
            start = 0
            while len(out) < limit:
                end = chunk.find(b"\n", start)
                if end < 0:
                    break
                out.append((pos + end + 1, chunk[start:end]))
                start = end + 1
            if start == 0:  # no whole line in this chunk: a torn tail, wait for more
                break
            pos += start
        return out

    # -- the writer --------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        backoff = _BACKOFF_START
        next_adopt = loop.time() + self.adopt_every
        while True:
            if loop.time() >= next_adopt:
                self._adopt()
                next_adopt = loop.time() + self.adopt_every
            try:
                recorded = await self._drain_once()
            except Exception as exc:  # an operational database error: wait and retry
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.warning("spool writer: %s; retrying in %.2fs", self.last_error, backoff)
                if self._stopping:
                    return
                await asyncio.sleep(backoff)
                backoff = min(_BACKOFF_CAP, backoff * 2)
                continue
            backoff = _BACKOFF_START
            self.last_error = None
            if recorded >= self.batch:
                continue  # a backlog: keep going
            if recorded and not self._stopping:
                await asyncio.sleep(self.interval)
                continue
            if self._stopping:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    async def _drain_once(self) -> int:
        """Record one batch from the oldest segment with work; how many lines it took."""
        loop = asyncio.get_running_loop()
        for seg in list(self._segments):
            lines = self._read_lines(seg, self.batch)
            if not lines and seg is not self._active and not self._fully_drained(seg):
                # A dead process's segment ending in a torn line (a power loss mid-write):
                # no writer will ever finish it, so park the fragment and move past it.
                size = os.fstat(seg.fd).st_size
                tail = os.pread(seg.fd, size - seg.offset, seg.offset)
                self._park([(tail, "torn last line of an orphaned spool segment")])
                seg.offset = size
                seg.save_offset()
                with self._cond:
                    self.adopted_pending += 1  # it had no newline, so it was not counted
                    self.parked += 1
                    self._cond.notify_all()
                return 1
            if not lines:
                if seg is not self._active and self._fully_drained(seg):
                    self._segments.remove(seg)
                    self._release(seg, delete=True)
                elif seg is self._active and seg.offset >= ROTATE_BYTES:
                    self._rotate()
                continue
            if seg is self._active and self._dirty:
                # Group fsync of everything answered so far, off the event loop.
                self._dirty = False
                await loop.run_in_executor(self._executor, os.fsync, seg.fd)
            # Decoding builds and validates EventIn objects: worker-thread work, like the SQL.
            parked = await loop.run_in_executor(self._executor, self._decode_and_record, lines)
            self._park(parked)
            seg.offset = lines[-1][0]
            seg.save_offset()
            done = len(lines)
            with self._cond:
                self.drained += done - len(parked)
                self.parked += len(parked)
                self._cond.notify_all()
            return done
        return 0

    def _rotate(self) -> None:
        """Start a new active segment; the drained old one is deleted (no await between)."""
        old = self._active
        assert old is not None
        self._active = self._new_segment()
        self._segments.append(self._active)
        if self._fully_drained(old):
            self._segments.remove(old)
            self._release(old, delete=True)

    def _decode_and_record(self, lines: Sequence[tuple[int, bytes]]) -> list[tuple[bytes, str]]:
        records, bad = _decode(lines)
        return bad + self._record(records)

    def _record(self, records: Sequence[tuple[bytes, EventIn]]) -> list[tuple[bytes, str]]:
        """Record a batch; on a non-operational failure, item by item. Returns parked items.

        Raises:
            Exception: an operational database error (the caller retries the batch).
        """
        if not records:
            return []
        try:
            self._commit([e for _, e in records])
            return []
        except Exception as exc:
            if is_operational(exc):
                raise
            if len(records) == 1:
                return [(records[0][0], _reason(exc))]
        parked: list[tuple[bytes, str]] = []
        for raw, event in records:
            try:
                self._commit([event])
            except Exception as exc:
                if is_operational(exc):
                    raise  # the items before this one are recorded; the replay dedups them
                parked.append((raw, _reason(exc)))
        return parked

    def _commit(self, events: Sequence[EventIn]) -> RecordResult:
        with session_scope(self.engine) as session:
            return record_events(session, events, now=self.clock())

    def _park(self, items: Sequence[tuple[bytes, str]]) -> None:
        if not items:
            return
        path = self.folder / f"parked-{self.process_id}.jsonl"
        at = self.clock().isoformat()
        with open(path, "ab") as f:
            for raw, reason in items:
                line = {"parked_at": at, "reason": reason, "line": raw.decode("utf-8", "replace")}
                f.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        for raw, reason in items:
            log.error("spool: parked a record (%s): %.200r", reason, raw)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _decode(
    lines: Sequence[tuple[int, bytes]],
) -> tuple[list[tuple[bytes, EventIn]], list[tuple[bytes, str]]]:
    """Spool lines as events, and the lines that are not records (with a reason)."""
    good: list[tuple[bytes, EventIn]] = []
    bad: list[tuple[bytes, str]] = []
    for _, raw in lines:
        try:
            rec = json.loads(raw)
            good.append((raw, record_to_event(rec)))
        except (ValueError, KeyError, TypeError, EventError) as exc:
            bad.append((raw, f"unreadable spool record: {type(exc).__name__}: {exc}"))
    return good, bad
