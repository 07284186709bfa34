"""Crash recovery of the outbox: a dead sender's ``claimed`` rows go back to the queue and
only its ``sending`` rows (bytes may be on the wire) become ``unknown``, never resent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    select,
    update,
)

from nurture.store.db import session_scope
from nurture.store.models import (
    Delivery,
    DeliveryStatus,
)
from nurture.store.sql import affected

WallClock = Callable[[], datetime]


def wall_clock() -> datetime:
    """The real time, used only for claim leases (never for business time)."""
    return datetime.now(UTC)


# Claimants (worker ids) of this process that are inside send_due right now.
_ACTIVE: set[str] = set()


@contextmanager
def sending_as(worker: str) -> Iterator[None]:
    """While inside, ``worker`` counts as alive for crash recovery in this process."""
    _ACTIVE.add(worker)
    try:
        yield
    finally:
        _ACTIVE.discard(worker)


# The states in which a row belongs to its claimant.
_IN_HAND = (DeliveryStatus.claimed.value, DeliveryStatus.sending.value)
# A claimed row given back to the queue (no byte of it was sent): its claim and the
# attempt the claim counted are undone. Used by crash recovery and by a clean stop.
GIVEN_BACK: dict[str, Any] = {
    "status": DeliveryStatus.queued.value,
    "claimed_by": None,
    "claimed_at": None,
    "attempts": Delivery.attempts - 1,
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_claimants(
    claims: Iterable[tuple[str | None, datetime | None]],
    *,
    worker: str,
    lease: timedelta,
    wall: datetime,
) -> set[str]:
    """The claimants among ``claims`` (claimant, wall-clock claim time) that are dead.

    A claimant on this host is dead when its pid is gone, or, for this very process, when no
    tick of it is sending under that name any more; on another host, when its lease
    (wall-clock claim time + ``lease``) has expired. ``worker`` (the caller) is never dead.
    """
    host = socket.gethostname()
    dead: set[str] = set()
    for claimant, claimed_at in claims:
        if not claimant or claimant == worker:
            continue
        c_host, _, rest = claimant.partition(":")
        pid = rest.split(":", 1)[0]
        if c_host == host and pid.isdigit():
            if int(pid) == os.getpid():
                if claimant in _ACTIVE:
                    continue  # a tick of this process is sending them right now
            elif _pid_alive(int(pid)):
                continue
        elif claimed_at is not None and claimed_at + lease > wall:
            continue
        dead.add(claimant)
    return dead


def recover_in_flight(
    engine: Engine,
    *,
    worker: str,
    lease: timedelta = timedelta(minutes=15),
    clock: WallClock = wall_clock,
) -> int:
    """Recover the rows of claimants that died: ``claimed`` rows (no byte sent) go back to
    the queue; ``sending`` rows (bytes may have reached the server) become ``unknown``,
    reported and never resent. Which claimants are dead: :func:`dead_claimants`.

    Returns:
        How many rows became ``unknown``.
    """
    wall = clock()
    with session_scope(engine) as session:
        rows = session.execute(
            select(Delivery.claimed_by, Delivery.claimed_at)
            .where(Delivery.status.in_(_IN_HAND))
            .distinct()
        ).all()
        dead = dead_claimants(rows, worker=worker, lease=lease, wall=wall)
        if not dead:
            return 0
        session.execute(
            update(Delivery)
            .where(
                Delivery.status == DeliveryStatus.claimed.value,
                Delivery.claimed_by.in_(dead),
            )
            .values(**GIVEN_BACK, updated_at=wall)
        )
        result = session.execute(
            update(Delivery)
            .where(
                Delivery.status == DeliveryStatus.sending.value,
                Delivery.claimed_by.in_(dead),
            )
            .values(
                status=DeliveryStatus.unknown.value,
                error="in flight when its sender died; not resent",
                updated_at=wall,
            )
        )
        return affected(result)
