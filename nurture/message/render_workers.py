"""Render worker processes: compose messages on other cores while the parent sends.

The workers are plain subprocesses, ``python -m nurture.message.render_workers``, not a
multiprocessing pool. A spawned multiprocessing child re-imports the parent's ``__main__``
module first. Under a Prefect process worker that module is Prefect's flow-run engine;
under the benchmarks it is the benchmark. Either way it costs one to two seconds of CPU per
child on every tick. These children import :mod:`nurture.message.compose` and nothing else (about
0.15 s), and they exit when the parent closes their stdin or dies.

Frames are pickles with an 8-byte length prefix. Requests travel on the child's stdin,
results on its stdout. The child's own ``sys.stdout`` is pointed at stderr, so a stray
print can never corrupt a frame. stderr is inherited, so a child's traceback reaches the
parent's log.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from nurture.message.compose import ComposeSettings, Rendered, compose
from nurture.message.rendering import TemplateStore

__all__ = ["RenderWorkerError", "RenderWorkers"]

_HEADER = struct.Struct("!Q")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# How long close() waits for a child to exit after its stdin closed, before killing it.
_EXIT_WAIT_SECONDS = 10.0


class RenderWorkerError(RuntimeError):
    """A render worker exited (crashed or was killed) before returning a result."""


def _write_frame(stream: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> Any:
    """The next object, or None at end of stream (also for a frame cut short)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)  # our own child, over a private pipe


class _Worker:
    """One child process, a thread that feeds it and a thread that collects its results."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        env = dict(os.environ)
        # The child must import this very copy of nurture, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nurture.message.render_workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.pending: dict[int, Future[list[Rendered]]] = {}
        self.lock = threading.Lock()
        self.exited: RenderWorkerError | None = None  # set once the child is gone
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.outbox.put(dict(settings))
        self.writer = threading.Thread(target=self._feed, name="render-feed", daemon=True)
        self.reader = threading.Thread(target=self._collect, name="render-collect", daemon=True)
        self.writer.start()
        self.reader.start()

    def submit(self, task_id: int, rows: list[dict[str, Any]], now: datetime) -> Future[Any]:
        future: Future[list[Rendered]] = Future()
        with self.lock:
            if self.exited is not None:
                future.set_exception(self.exited)
                return future
            self.pending[task_id] = future
        self.outbox.put((task_id, rows, now))
        return future

    def _feed(self) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            while (item := self.outbox.get()) is not None:
                _write_frame(stdin, item)
        except (BrokenPipeError, OSError):
            pass  # the child is gone; _collect fails what it owed
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def _collect(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        while (frame := _read_frame(stdout)) is not None:
            task_id, result = frame
            with self.lock:
                future = self.pending.pop(task_id, None)
            if future is not None:
                _settle(future, result=result)
        code = self.process.wait()
        error = RenderWorkerError(f"render worker {self.process.pid} exited with code {code}")
        with self.lock:
            self.exited = error
            owed, self.pending = list(self.pending.values()), {}
        for future in owed:
            _settle(future, error=error)

    def close(self) -> None:
        self.outbox.put(None)
        self.writer.join()
        try:
            self.process.wait(_EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.reader.join()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _settle(future: Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled by the caller meanwhile


class RenderWorkers:
    """Composes chunks of claimed rows in ``workers`` child processes.

    Each child builds its own :class:`TemplateStore` from the mailer's folder. The mailer's
    plain settings (addresses, tracking base URL and secret) go to the children once, at
    start-up. Rows go as plain dicts and messages come back as bytes, in order.
    """

    def __init__(self, mailer: ComposeSettings, workers: int) -> None:
        settings = {
            "templates": str(mailer.store.root),
            "from_address": mailer.from_address,
            "secret": mailer.secret,
            "tracking_url": mailer.tracking_url,
            "track": mailer.track,
            "unsubscribe_mailto": mailer.unsubscribe_mailto,
        }
        self.workers = [_Worker(settings) for _ in range(max(1, workers))]
        self._ids = itertools.count()

    def submit(self, rows: Sequence[Any], now: datetime) -> list[Future[list[Rendered]]]:
        """Start composing ``rows`` in contiguous slices, one per child.

        ``rows`` are ``delivery._load`` rows (anything with ``_mapping``) or plain dicts.
        """
        plain = [row if isinstance(row, dict) else dict(row._mapping) for row in rows]
        size = -(-len(plain) // len(self.workers)) or 1
        return [
            worker.submit(next(self._ids), plain[start : start + size], now)
            for worker, start in zip(self.workers, range(0, len(plain), size), strict=False)
        ]

    def close(self) -> None:
        """Stop the children (they finish the task in hand first)."""
        for worker in self.workers:
            worker.close()


def _serve(requests: IO[bytes], results: IO[bytes]) -> None:
    """The child's loop: settings first, then (task id, rows, now) until end of input."""
    settings = _read_frame(requests)
    if settings is None:
        return
    store = TemplateStore(Path(settings.pop("templates")))
    mailer = SimpleNamespace(store=store, **settings)
    while (task := _read_frame(requests)) is not None:
        task_id, rows, now = task
        _write_frame(results, (task_id, [compose(mailer, SimpleNamespace(**r), now) for r in rows]))


def main() -> None:
    """Entry point of a child: frames on stdin and stdout, anything else to stderr."""
    # Ctrl-C reaches the whole process group: let the parent stop us by closing stdin,
    # rather than print a KeyboardInterrupt traceback from every worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, results)


if __name__ == "__main__":
    main()
