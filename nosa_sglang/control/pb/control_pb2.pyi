import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RuntimeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNTIME_MODE_UNSPECIFIED: _ClassVar[RuntimeMode]
    RUNTIME_MODE_OFFLOAD: _ClassVar[RuntimeMode]
    RUNTIME_MODE_GPU_ONLY: _ClassVar[RuntimeMode]

class TransferMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_MODE_UNSPECIFIED: _ClassVar[TransferMode]
    TRANSFER_MODE_ZERO_COPY: _ClassVar[TransferMode]
    TRANSFER_MODE_COPY_ENGINE: _ClassVar[TransferMode]

class VictimPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VICTIM_POLICY_UNSPECIFIED: _ClassVar[VictimPolicy]
    VICTIM_POLICY_EVICTION_SCORE: _ClassVar[VictimPolicy]
    VICTIM_POLICY_LRU: _ClassVar[VictimPolicy]
RUNTIME_MODE_UNSPECIFIED: RuntimeMode
RUNTIME_MODE_OFFLOAD: RuntimeMode
RUNTIME_MODE_GPU_ONLY: RuntimeMode
TRANSFER_MODE_UNSPECIFIED: TransferMode
TRANSFER_MODE_ZERO_COPY: TransferMode
TRANSFER_MODE_COPY_ENGINE: TransferMode
VICTIM_POLICY_UNSPECIFIED: VictimPolicy
VICTIM_POLICY_EVICTION_SCORE: VictimPolicy
VICTIM_POLICY_LRU: VictimPolicy

class TransferCounters(_message.Message):
    __slots__ = ("hits", "misses", "hit_rate", "prefetched", "bytes_h2d", "bytes_d2h", "transfer_seconds", "stall_seconds", "host_wait_seconds")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PREFETCHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_H2D_FIELD_NUMBER: _ClassVar[int]
    BYTES_D2H_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOST_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    hit_rate: float
    prefetched: int
    bytes_h2d: int
    bytes_d2h: int
    transfer_seconds: float
    stall_seconds: float
    host_wait_seconds: float
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., prefetched: _Optional[int] = ..., bytes_h2d: _Optional[int] = ..., bytes_d2h: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., stall_seconds: _Optional[float] = ..., host_wait_seconds: _Optional[float] = ...) -> None: ...

class LayerStats(_message.Message):
    __slots__ = ("layer", "counters")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    counters: TransferCounters
    def __init__(self, layer: _Optional[int] = ..., counters: _Optional[_Union[TransferCounters, _Mapping]] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("taken_at", "steps", "running_requests", "totals", "layers", "resident_blocks", "gpu_slot_capacity", "host_blocks_used", "host_blocks_total", "host_bytes_used", "host_capacity_bytes", "device", "mode", "stats_epoch")
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GPU_SLOT_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATS_EPOCH_FIELD_NUMBER: _ClassVar[int]
    taken_at: _timestamp_pb2.Timestamp
    steps: int
    running_requests: int
    totals: TransferCounters
    layers: _containers.RepeatedCompositeFieldContainer[LayerStats]
    resident_blocks: int
    gpu_slot_capacity: int
    host_blocks_used: int
    host_blocks_total: int
    host_bytes_used: int
    host_capacity_bytes: int
    device: str
    mode: RuntimeMode
    stats_epoch: int
    def __init__(self, taken_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., steps: _Optional[int] = ..., running_requests: _Optional[int] = ..., totals: _Optional[_Union[TransferCounters, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ..., resident_blocks: _Optional[int] = ..., gpu_slot_capacity: _Optional[int] = ..., host_blocks_used: _Optional[int] = ..., host_blocks_total: _Optional[int] = ..., host_bytes_used: _Optional[int] = ..., host_capacity_bytes: _Optional[int] = ..., device: _Optional[str] = ..., mode: _Optional[_Union[RuntimeMode, str]] = ..., stats_epoch: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: Stats
    def __init__(self, stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class WatchStatsRequest(_message.Message):
    __slots__ = ("interval", "max_updates")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATES_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    max_updates: int
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_updates: _Optional[int] = ...) -> None: ...

class Rates(_message.Message):
    __slots__ = ("steps_per_second", "hits_per_second", "misses_per_second", "h2d_bytes_per_second", "d2h_bytes_per_second", "stall_fraction")
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    HITS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MISSES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    H2D_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    D2H_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STALL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    steps_per_second: float
    hits_per_second: float
    misses_per_second: float
    h2d_bytes_per_second: float
    d2h_bytes_per_second: float
    stall_fraction: float
    def __init__(self, steps_per_second: _Optional[float] = ..., hits_per_second: _Optional[float] = ..., misses_per_second: _Optional[float] = ..., h2d_bytes_per_second: _Optional[float] = ..., d2h_bytes_per_second: _Optional[float] = ..., stall_fraction: _Optional[float] = ...) -> None: ...

class StatsDelta(_message.Message):
    __slots__ = ("interval_seconds", "steps", "totals", "layers", "rates", "counters_reset")
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RATES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_RESET_FIELD_NUMBER: _ClassVar[int]
    interval_seconds: float
    steps: int
    totals: TransferCounters
    layers: _containers.RepeatedCompositeFieldContainer[LayerStats]
    rates: Rates
    counters_reset: bool
    def __init__(self, interval_seconds: _Optional[float] = ..., steps: _Optional[int] = ..., totals: _Optional[_Union[TransferCounters, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ..., rates: _Optional[_Union[Rates, _Mapping]] = ..., counters_reset: bool = ...) -> None: ...

class WatchStatsResponse(_message.Message):
    __slots__ = ("stats", "delta")
    STATS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    stats: Stats
    delta: StatsDelta
    def __init__(self, stats: _Optional[_Union[Stats, _Mapping]] = ..., delta: _Optional[_Union[StatsDelta, _Mapping]] = ...) -> None: ...

class RequestStats(_message.Message):
    __slots__ = ("request_id", "seq_len_tokens", "host_blocks", "resident_blocks", "hits", "misses", "hit_rate")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    seq_len_tokens: int
    host_blocks: int
    resident_blocks: int
    hits: int
    misses: int
    hit_rate: float
    def __init__(self, request_id: _Optional[str] = ..., seq_len_tokens: _Optional[int] = ..., host_blocks: _Optional[int] = ..., resident_blocks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("taken_at", "requests")
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    taken_at: _timestamp_pb2.Timestamp
    requests: _containers.RepeatedCompositeFieldContainer[RequestStats]
    def __init__(self, taken_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests: _Optional[_Iterable[_Union[RequestStats, _Mapping]]] = ...) -> None: ...

class OffloadKnobs(_message.Message):
    __slots__ = ("gpu_slots", "transfer_mode", "prefetch", "host_capacity_bytes", "victim_policy")
    GPU_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MODE_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    HOST_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VICTIM_POLICY_FIELD_NUMBER: _ClassVar[int]
    gpu_slots: int
    transfer_mode: TransferMode
    prefetch: bool
    host_capacity_bytes: int
    victim_policy: VictimPolicy
    def __init__(self, gpu_slots: _Optional[int] = ..., transfer_mode: _Optional[_Union[TransferMode, str]] = ..., prefetch: bool = ..., host_capacity_bytes: _Optional[int] = ..., victim_policy: _Optional[_Union[VictimPolicy, str]] = ...) -> None: ...

class NosaConstants(_message.Message):
    __slots__ = ("block_size", "kernel_size", "kernel_stride", "init_blocks", "local_blocks", "query_blocks", "topk_blocks")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_STRIDE_FIELD_NUMBER: _ClassVar[int]
    INIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUERY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOPK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    kernel_size: int
    kernel_stride: int
    init_blocks: int
    local_blocks: int
    query_blocks: int
    topk_blocks: int
    def __init__(self, block_size: _Optional[int] = ..., kernel_size: _Optional[int] = ..., kernel_stride: _Optional[int] = ..., init_blocks: _Optional[int] = ..., local_blocks: _Optional[int] = ..., query_blocks: _Optional[int] = ..., topk_blocks: _Optional[int] = ...) -> None: ...

class KnobLimits(_message.Message):
    __slots__ = ("min_gpu_slots", "max_gpu_slots", "max_host_capacity_bytes")
    MIN_GPU_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_HOST_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    min_gpu_slots: int
    max_gpu_slots: int
    max_host_capacity_bytes: int
    def __init__(self, min_gpu_slots: _Optional[int] = ..., max_gpu_slots: _Optional[int] = ..., max_host_capacity_bytes: _Optional[int] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("knobs", "nosa", "limits")
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    NOSA_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    knobs: OffloadKnobs
    nosa: NosaConstants
    limits: KnobLimits
    def __init__(self, knobs: _Optional[_Union[OffloadKnobs, _Mapping]] = ..., nosa: _Optional[_Union[NosaConstants, _Mapping]] = ..., limits: _Optional[_Union[KnobLimits, _Mapping]] = ...) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConfigResponse(_message.Message):
    __slots__ = ("config", "pending")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    config: Config
    pending: OffloadKnobs
    def __init__(self, config: _Optional[_Union[Config, _Mapping]] = ..., pending: _Optional[_Union[OffloadKnobs, _Mapping]] = ...) -> None: ...

class UpdateConfigRequest(_message.Message):
    __slots__ = ("knobs", "update_mask", "apply_timeout")
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    APPLY_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    knobs: OffloadKnobs
    update_mask: _field_mask_pb2.FieldMask
    apply_timeout: _duration_pb2.Duration
    def __init__(self, knobs: _Optional[_Union[OffloadKnobs, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., apply_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class UpdateConfigResponse(_message.Message):
    __slots__ = ("config", "applied", "pending")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    config: Config
    applied: bool
    pending: OffloadKnobs
    def __init__(self, config: _Optional[_Union[Config, _Mapping]] = ..., applied: bool = ..., pending: _Optional[_Union[OffloadKnobs, _Mapping]] = ...) -> None: ...

class ResetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetStatsResponse(_message.Message):
    __slots__ = ("stats_epoch",)
    STATS_EPOCH_FIELD_NUMBER: _ClassVar[int]
    stats_epoch: int
    def __init__(self, stats_epoch: _Optional[int] = ...) -> None: ...
