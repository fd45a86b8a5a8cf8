"""KnobSwap: hand a new OffloadKnobs from a control thread to the stepping thread at a step boundary.

Why a queue of one and not a setter: the runtime sizes slot caches, picks copy paths and victim
policies from the knobs at the start of a step; changing them in the middle of a step would mix two
configs in one step. So a control thread only *queues* the new (whole, validated) knobs and may wait;
the stepping thread swaps them in between two steps, where nothing is in flight.
"""

from __future__ import annotations

import threading
import time

from nosa_sglang.control.provider import KnobUpdate
from nosa_sglang.runtime.knobs import OffloadKnobs


class KnobSwap:
    """The knobs in force plus at most one queued replacement; thread-safe.

    Control threads call `request` (and may wait for the boundary); the stepping thread calls
    `apply_pending` once per step boundary, before it reads `in_force`.
    """

    def __init__(self, initial: OffloadKnobs) -> None:
        self._cond = threading.Condition()
        self._in_force = initial
        self._pending: OffloadKnobs | None = None
        self._requested_seq = 0  # ticket of the latest request
        self._applied_seq = 0  # ticket of the latest request in force

    def in_force(self) -> OffloadKnobs:
        with self._cond:
            return self._in_force

    def latest(self) -> OffloadKnobs:
        """The queued knobs if any, else the knobs in force: the base for the next change."""
        with self._cond:
            return self._pending if self._pending is not None else self._in_force

    def pending(self) -> OffloadKnobs | None:
        with self._cond:
            return self._pending

    def request(self, knobs: OffloadKnobs, timeout_s: float) -> KnobUpdate:
        """Queue `knobs` (replacing any queued ones) and wait up to `timeout_s` for a boundary."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._requested_seq += 1
            ticket = self._requested_seq
            self._pending = knobs
            while self._applied_seq < ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return KnobUpdate(in_force=self._in_force, pending=self._pending)

    def apply_pending(self) -> OffloadKnobs | None:
        """Step boundary: put the queued knobs in force. Returns them, or None if none were queued.

        Called by the stepping thread only; wakes every `request` waiting for this boundary.
        """
        with self._cond:
            if self._pending is None:
                return None
            self._in_force, self._pending = self._pending, None
            self._applied_seq = self._requested_seq
            self._cond.notify_all()
            return self._in_force
