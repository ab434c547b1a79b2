"""Whether ``GET /instances/{name}?wait=<state>`` can still be answered by waiting.

Pure: the instance's current state and desired state decide. An instance at
rest stays where it is until someone calls the API, so waiting for any other
state could only end in a timeout; the route answers at once instead.
"""

from __future__ import annotations

import enum

from ..instances import Desired
from ..supervision import ChildState

__all__ = ["WaitVerdict", "wait_verdict"]


class WaitVerdict(enum.Enum):
    """What a waiter does next."""

    #: The instance is in the wanted state: answer 200.
    REACHED = "reached"
    #: It may still get there by itself: keep waiting.
    PENDING = "pending"
    #: It cannot get there without a call (start, restart, ...): answer 409 now.
    UNREACHABLE = "unreachable"


def wait_verdict(current: ChildState, desired: Desired, wanted: ChildState) -> WaitVerdict:
    """The verdict for an instance in ``current`` whose user last asked for
    ``desired``, awaited in ``wanted``.

    At rest without a call: ``failed`` (its restarts are spent; it stays until
    started), and ``stopped`` when the user stopped it. A ``stopped`` instance
    that should run is about to be started (at creation, or by the restore
    at start-up), so waiting for it goes on. Every other state is on its way
    somewhere, and any state may follow it (a crash, a restart, a give-up).
    """
    if current is wanted:
        return WaitVerdict.REACHED
    if current is ChildState.FAILED:
        return WaitVerdict.UNREACHABLE
    if current is ChildState.STOPPED and desired is Desired.STOPPED:
        return WaitVerdict.UNREACHABLE
    return WaitVerdict.PENDING
