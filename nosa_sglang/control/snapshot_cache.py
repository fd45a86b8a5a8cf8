"""SnapshotCache: build the provider's StatsSnapshot at most once per interval, whatever the load.

Why: every snapshot copies counters under a lock the stepping thread also takes. With 32 clients
polling and 8 streams watching, building one per call would put the readers on the decode loop's
critical path; one build per `min_interval_s` (default 50 ms) bounds that cost to ~20 short copies
per second. Readers that arrive while a snapshot is being built wait for it rather than build
another (single flight).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from nosa_sglang.runtime.stats import StatsSnapshot

#: default floor between two snapshot builds
DEFAULT_SNAPSHOT_INTERVAL_S = 0.05


class CachedSnapshot(NamedTuple):
    """A snapshot, the stats epoch it belongs to, and its wall-clock time (for Timestamp fields)."""

    snapshot: StatsSnapshot
    epoch: int
    taken_at_wall_s: float


def empty_snapshot() -> StatsSnapshot:
    """All zeros, taken now: what is served while the runtime has published nothing yet."""
    return StatsSnapshot(taken_at_s=time.monotonic(), steps=0, running_requests=0, resident_blocks=0,
                         gpu_slot_capacity=0, host_blocks_used=0, host_blocks_total=0,
                         host_bytes_used=0, host_capacity_bytes=0)


class SnapshotCache:
    """Thread-safe, single-flight cache of `build()` results; a None result (the runtime's counters
    before their first step boundary) is served as `empty_snapshot()`."""

    def __init__(
        self,
        build: Callable[[], StatsSnapshot | None],
        min_interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S,
    ) -> None:
        if not min_interval_s >= 0:
            raise ValueError(f"min_interval_s={min_interval_s}: allowed range is >= 0")
        self._build = build
        self._min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._cached: CachedSnapshot | None = None
        self._built_at_s = float("-inf")
        self._epoch = 0
        self.builds = 0  # number of build() calls so far (tests check the rate)

    @property
    def epoch(self) -> int:
        return self._epoch

    def get(self, max_age_s: float | None = None) -> CachedSnapshot:
        """A snapshot no older than `max_age_s` (never less than the build interval)."""
        max_age_s = self._min_interval_s if max_age_s is None else max(max_age_s, self._min_interval_s)
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._built_at_s >= max_age_s:
                snap = self._build() or empty_snapshot()
                self.builds += 1
                self._built_at_s = now
                wall_s = time.time() - (time.monotonic() - snap.taken_at_s)
                self._cached = CachedSnapshot(snap, self._epoch, wall_s)
            return self._cached

    def reset(self, reset_counters: Callable[[], None]) -> int:
        """Run `reset_counters()`, start a new epoch and drop the cached snapshot; returns the epoch.

        Under the cache lock, so no snapshot of the old counters is labelled with the new epoch.
        """
        with self._lock:
            reset_counters()
            self._epoch += 1
            self._cached = None
            return self._epoch
