"""How a tick runs its stages: directly (the CLI) or as Prefect tasks (the flow).

The tick (:func:`nurture.tick.tick`) and its send loop
(:func:`nurture.outbox.delivery.send_due`) are written once, and call each stage through
a :class:`Steps`. The CLI uses :data:`DIRECT`; the ``nurture_tick`` flow passes steps that
run each stage as a task with retries and each send batch as a task holding an ``smtp``
concurrency slot, without retries. The core never imports Prefect: it only knows this
protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Steps(Protocol):
    """Runs the stages of one tick."""

    def stage(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run one stage. Every stage is safe to retry: a rerun after a failure repeats
        no step (enrollment, queueing and promotions are keyed; scores are recomputed)."""
        ...

    def send(self, batch: Callable[[], T]) -> T:
        """Transmit one claimed batch. Never retried: its rows may be on the wire."""
        ...


class DirectSteps:
    """Run every stage in this thread, as plain calls."""

    def stage(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call ``fn``."""
        return fn(*args, **kwargs)

    def send(self, batch: Callable[[], T]) -> T:
        """Call ``batch``."""
        return batch()


DIRECT: Steps = DirectSteps()
