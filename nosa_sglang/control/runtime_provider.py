"""RuntimeProvider: the control service over the real offload runtime (`NosaRuntime`).

`NosaRuntime` already has the control surface with the service's semantics (cheap snapshots that
never sync the GPU, a step-boundary knob queue, reset); this adapter only delegates, so the service
stays independent of torch and of how the runtime is driven.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nosa_sglang.config import NosaConfig
from nosa_sglang.control.provider import ControlProvider, KnobUpdate
from nosa_sglang.runtime.knobs import MAX_GPU_SLOTS, OffloadKnobs
from nosa_sglang.runtime.stats import StatsSnapshot

if TYPE_CHECKING:  # NOTE: the runtime imports torch; the control package must not need it to import
    from nosa_sglang.runtime.nosa_runtime import NosaRuntime


class RuntimeProvider(ControlProvider):
    """Serves one `NosaRuntime` to the control service.

    Queued knobs take effect in `NosaRuntime.step_boundary()`, which only the stepping thread may
    call. A decode loop calls it after every step; the owner must also call it while idle (with no
    step open it only applies queued knobs and publishes the counters), or an `UpdateConfig` waits
    for the next request. The demo and the benchmark never idle: they decode without pause and call
    it between requests.

    `request_knobs` raises the runtime's `KnobError` (e.g. `gpu_slots` above the slots the runtime
    allocated, `max_gpu_slots`): the service maps it to INVALID_ARGUMENT naming the field, as it does
    for its own validation, and nothing is queued.
    """

    def __init__(self, runtime: "NosaRuntime") -> None:
        self.runtime = runtime

    def snapshot(self) -> StatsSnapshot:
        return self.runtime.snapshot()

    def nosa_config(self) -> NosaConfig:
        return self.runtime.nosa_config()

    def knobs(self) -> OffloadKnobs:
        return self.runtime.knobs()

    def max_gpu_slots(self) -> int:
        rt = self.runtime
        return MAX_GPU_SLOTS if rt.gpu_only else rt.max_gpu_slots

    def requested_knobs(self) -> OffloadKnobs:
        return self.runtime.requested_knobs()

    def request_knobs(self, knobs: OffloadKnobs, timeout_s: float) -> KnobUpdate:
        return self.runtime.request_knobs(knobs, timeout_s)

    def reset_stats(self) -> None:
        self.runtime.reset_stats()
