"""NOSA offload runtime (imported as nosa_sglang.runtime): where NOSA's KV bytes live and how they move.

`NosaRuntime` is the one API (nosa_runtime.py); the pieces behind it, one residency or concern each:
HostKVStore (pinned host blocks), GpuSlotCache / FullResidency (GPU slots and block maps),
TransferEngine (streams and copies), SelectionState (compressed keys, biases), Counters (stats).

Exports resolve lazily (PEP 562): `nosa_sglang.runtime.knobs` / `.stats` stay importable without torch,
so the control client (`nosa-ctl`) starts fast.
"""

from __future__ import annotations

from nosa_sglang._lazy import lazy_exports

_EXPORTS = {
    "Admission": "types",
    "Admitted": "types",
    "GpuSlotsExhausted": "types",
    "ModelShape": "types",
    "RequestTooLarge": "types",
    "RuntimeUsageError": "types",
    "Counters": "counters",
    "FullResidency": "full_residency",
    "GpuSlotCache": "slot_cache",
    "PrefetchPlan": "slot_cache",
    "ResidencyDiff": "slot_cache",
    "HostKVStore": "host_store",
    "HostMemoryExhausted": "host_store",
    "KnobQueue": "knob_queue",
    "KnobRequest": "knob_queue",
    "KnobError": "knobs",
    "OffloadKnobs": "knobs",
    "NosaRuntime": "nosa_runtime",
    "MicroBatches": "micro_batches",
    "StepGraphs": "step_graphs",
    "PaddedSteps": "padded_steps",
    "SELECTION_POLICIES": "nosa_runtime",
    "LayerStats": "stats",
    "RequestStats": "stats",
    "StatsSnapshot": "stats",
    "TransferEngine": "transfer",
    "EvictionScoreVictims": "victim",
    "LruVictims": "victim",
    "VictimPolicy": "victim",
    "make_victim_policy": "victim",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
