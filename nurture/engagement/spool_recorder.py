"""The spool's recorder in a process of its own, so that recording never slows answering.

Decoding spool lines, classifying them and writing them to the database is Python work.
On the server's own interpreter it competes with the event loop for the GIL, and clicks
wait behind each batch. ``nurture serve`` therefore records through a child process,
``python -m nurture.engagement.spool_recorder``: the server still owns its segment files,
their locks and offsets (see :mod:`nurture.engagement.spool`) and only ships complete lines
over a pipe; the child records them with :func:`~nurture.engagement.spool.record_lines` and
answers with the lines to park.

A child that dies (or is killed) mid-batch fails that batch as an operational error: the
spool retries it on a fresh child, and the records the dead child had committed are
deduplicated by their ``xid``. The child exits when its stdin closes (its parent is gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from nurture.frames import read_frame, write_frame

__all__ = ["RecorderProcess", "RecorderUnavailable"]

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
    from nurture.engagement.spool import is_operational, record_lines
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
