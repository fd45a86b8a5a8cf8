"""KnobQueue: hand a new OffloadKnobs from a control thread to the stepping thread at a step boundary.

The runtime sizes slots, picks copy paths and victim policies from the knobs in force; changing them
mid-step would mix two configurations in one step. Control threads queue a whole, validated
OffloadKnobs (a newer request replaces a queued one) and may wait; `NosaRuntime.step_boundary()`
swaps it in. Same protocol as `nosa_sglang.control.boundary.KnobSwap` (the runtime cannot import the
control package, which sits above it).
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from nosa_sglang.runtime.knobs import OffloadKnobs


class KnobRequest(NamedTuple):
    """What `request_knobs` reports: the knobs in force, and the still-queued ones (None if applied)."""

    in_force: OffloadKnobs
    pending: OffloadKnobs | None


class KnobQueue:
    """The knobs in force plus at most one queued replacement; thread-safe."""

    def __init__(self, initial: OffloadKnobs) -> None:
        self._cond = threading.Condition()
        self._in_force = initial
        self._pending: OffloadKnobs | None = None
        self._requested = 0
        self._applied = 0

    def in_force(self) -> OffloadKnobs:
        with self._cond:
            return self._in_force

    def latest(self) -> OffloadKnobs:
        """The queued knobs if any, else those in force."""
        with self._cond:
            return self._pending if self._pending is not None else self._in_force

    def pending(self) -> OffloadKnobs | None:
        """The queued knobs, or None when nothing waits for a boundary."""
        with self._cond:
            return self._pending

    def request(self, knobs: OffloadKnobs, timeout_s: float = 0.0) -> KnobRequest:
        """Queue `knobs` and wait up to `timeout_s` for a step boundary to apply them."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._requested += 1
            ticket = self._requested
            self._pending = knobs
            while self._applied < ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return KnobRequest(self._in_force, self._pending)

    def take(self) -> OffloadKnobs | None:
        """Step boundary (stepping thread): the queued knobs, now in force, or None."""
        with self._cond:
            if self._pending is None:
                return None
            self._in_force, self._pending = self._pending, None
            self._applied = self._requested
            self._cond.notify_all()
            return self._in_force
