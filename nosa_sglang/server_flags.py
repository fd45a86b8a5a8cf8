"""NosaServerFlags: the `--nosa-*` flags of `nosa_sglang.launch_server`, validated before any GPU work.

SGLang's `ServerArgs` has no room for them, so the launcher parses its own flags, checks the SGLang flags
NOSA cannot run with, and hands its settings to every scheduler process in one environment variable
(`NOSA_SGLANG_FLAGS`, JSON) that the plugin reads there. Without that variable the plugin stays inactive.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from nosa_sglang.runtime.knobs import MAX_GPU_SLOTS, TRANSFER_MODES, VICTIM_POLICIES

ENV_VAR = "NOSA_SGLANG_FLAGS"
TOKEN_ENV_VAR = "NOSA_GRPC_TOKEN"  # the token on a command line would show in `ps`
ON_OFF = ("on", "off")
#: how SGLang's decode graphs hold NOSA (`--nosa-model-graphs`; `on` is kept as a name of `breakable`)
MODEL_GRAPHS = ("full", "breakable", "off")
MODEL_GRAPHS_CHOICES = ("auto", *MODEL_GRAPHS, "on")
CK_DTYPES = ("float32", "model")

DEFAULT_MAX_RUNNING_REQUESTS = 32  # each running request holds GPU slots in every layer
#: SGLang's switches that turn its decode graphs off (their ServerArgs fields: `field_of`)
DECODE_GRAPHS_OFF = ("--disable-cuda-graph", "--disable-decode-cuda-graph")

#: SGLang flags the launcher sets itself; a user value would break NOSA (page = NOSA block, our backend)
OWNED_SGLANG_FLAGS = {
    "--attention-backend": "NOSA sets it to 'nosa'",
    "--prefill-attention-backend": "NOSA attends prefill itself",
    "--decode-attention-backend": "NOSA attends decode itself",
    "--page-size": "a page is a NOSA block (64 tokens); the launcher sets it",
}

#: SGLang settings this first version cannot serve: (ServerArgs field, allowed value, flag, why)
UNSUPPORTED = (
    ("tp_size", 1, "--tp-size", "tensor parallelism is not supported by the NOSA backend yet"),
    ("dp_size", 1, "--dp-size", "data parallel replicas are not supported yet"),
    ("pp_size", 1, "--pp-size", "pipeline parallelism is not supported"),
    ("speculative_algorithm", None, "--speculative-algorithm", "speculative decoding is not supported"),
    ("enable_mixed_chunk", False, "--enable-mixed-chunk", "NOSA decode runs in decode batches only"),
    ("enable_two_batch_overlap", False, "--enable-two-batch-overlap", "a decode step is one NOSA batch"),
    ("enable_dp_attention", False, "--enable-dp-attention", "not supported"),
    ("enable_hierarchical_cache", False, "--enable-hierarchical-cache", "NOSA has its own host tier"),
    ("enable_hisparse", False, "--enable-hisparse", "NOSA is the sparse attention"),
    ("enable_lora", None, "--enable-lora", "not supported"),
    ("kv_cache_dtype", "auto", "--kv-cache-dtype", "the NOSA kernels read the model dtype"),
    ("enable_torch_compile", False, "--enable-torch-compile",
     "the decode graphs hold the NOSA runtime's Python, which torch.compile has never been run over"),
)


def nosa_server_args(flags: "NosaServerFlags") -> dict:
    """SGLang settings NOSA sets itself (ServerArgs field -> value): its decode graphs as
    `--nosa-model-graphs` says (`model_graphs.py`); prefill graphs are off."""
    return {"attention_backend": "nosa", "page_size": 64,
            "cuda_graph_backend_decode": "disabled" if flags.model_graphs == "off" else flags.model_graphs,
            "cuda_graph_backend_prefill": "disabled"}


class NosaFlagError(ValueError):
    """A NOSA flag (or an SGLang flag NOSA cannot run with) is invalid; the message names the flag."""


@dataclass(frozen=True)
class NosaServerFlags:
    """What the NOSA plugin needs in each scheduler process.

    Attributes:
        offload: decode from the pinned host store through the GPU slot cache (off: NOSA fully on GPU).
        slots: GPU slots per (request, layer, KV head) at start (None: the model's topk_blocks).
        max_slots: slots allocated per (request, layer, KV head); `nosa-ctl config set gpu_slots=N`
            may go up to it (None: `slots`).
        host_memory_gb: offloading, the KV pool lives in pinned host memory and this is its size, SGLang's
            token budget (None: what SGLang would give the KV cache in GPU memory, at most half of the
            machine's RAM). Running out is SGLang's own back-pressure (requests wait for pages).
        transfer_mode, prefetch, victim_policy: the runtime's OffloadKnobs at start.
        grpc_port, grpc_host, grpc_token: the control API in the scheduler process of TP rank 0.
        ck_dtype: storage of the compressed keys K~ on the GPU: "float32" selects exactly as the reference;
            "model" (the model dtype) halves their memory, the largest part of a request row's GPU
            state, at the price of rare near-tie flips in the selection.
        graphs: replay each decode layer's runtime work as CUDA graphs (segments captured once per batch
            shape; CUDA only): an eager layer is dozens of small launches. Results are the same.
        model_graphs: how SGLang's decode CUDA graphs hold a step (`model_graphs.py`): "full", the whole
            step with NOSA's layers inside as one graph (decoding from the pool's pages: not offloaded);
            "breakable", the model's norms, projections and MLP as graphs broken at the NOSA attention,
            which runs eagerly between them (its copies and host plan stay outside); "off". None (auto):
            full when not offloading, breakable when offloading ("on" is read as breakable).
    """

    offload: bool = True
    slots: int | None = None
    max_slots: int | None = None
    host_memory_gb: float | None = None
    transfer_mode: str = "zero_copy"
    prefetch: bool = False
    victim_policy: str = "lru"
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    grpc_token: str | None = None
    ck_dtype: str = "float32"
    graphs: bool = True
    model_graphs: str | None = None

    def __post_init__(self) -> None:
        graphs = {"auto": None, "on": "breakable"}.get(self.model_graphs, self.model_graphs)
        if graphs is None:
            graphs = "breakable" if self.offload else "full"
        if graphs not in MODEL_GRAPHS:
            raise NosaFlagError(f"--nosa-model-graphs={self.model_graphs!r}: allowed values are "
                                f"{list(MODEL_GRAPHS_CHOICES)}")
        if graphs == "full" and self.offload:
            raise NosaFlagError("--nosa-model-graphs=full: needs --nosa-offload off (offloaded, blocks are copied "
                                "between layers, outside any graph); allowed with offloading: breakable, off")
        object.__setattr__(self, "model_graphs", graphs)
        for name in ("slots", "max_slots"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_GPU_SLOTS):
                raise NosaFlagError(f"--nosa-{name.replace('_', '-')}={v!r}: allowed range is [1, {MAX_GPU_SLOTS}]")
        if self.slots is not None and self.max_slots is not None and self.max_slots < self.slots:
            raise NosaFlagError(f"--nosa-max-slots={self.max_slots}: allowed range is >= --nosa-slots={self.slots}")
        if self.host_memory_gb is not None and not 0 < self.host_memory_gb <= 1 << 14:
            raise NosaFlagError(f"--nosa-host-memory-gb={self.host_memory_gb}: allowed range is (0, 16384]")
        if self.transfer_mode not in TRANSFER_MODES:
            raise NosaFlagError(f"--nosa-transfer-mode={self.transfer_mode!r}: allowed values are {list(TRANSFER_MODES)}")
        if self.victim_policy not in VICTIM_POLICIES:
            raise NosaFlagError(f"--nosa-victim-policy={self.victim_policy!r}: allowed values are {list(VICTIM_POLICIES)}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise NosaFlagError(f"--nosa-grpc-port={self.grpc_port}: allowed range is [0, 65535] (0 picks a free port)")
        if self.ck_dtype not in CK_DTYPES:
            raise NosaFlagError(f"--nosa-ck-dtype={self.ck_dtype!r}: allowed values are {list(CK_DTYPES)}")
        if self.grpc_port is None and self.grpc_token:
            raise NosaFlagError("--nosa-grpc-token: needs --nosa-grpc-port (there is no control API to protect)")

    def under_sglang_graph_switch(self, decode_graphs_off: bool) -> "NosaServerFlags":
        """SGLang's own off-switch (`--disable-cuda-graph`, `--disable-decode-cuda-graph`) also turns the
        model graphs off: NOSA passes `--cuda-graph-backend-decode`, which would otherwise win over it."""
        return dataclasses.replace(self, model_graphs="off") if decode_graphs_off else self

    def to_env(self) -> str:
        """JSON for ENV_VAR; the token is left out (it travels in TOKEN_ENV_VAR)."""
        return json.dumps({**dataclasses.asdict(self), "grpc_token": None})

    def export(self, environ=os.environ) -> None:
        """Hand these flags to the processes started from here (the scheduler): the inverse of from_env."""
        environ[ENV_VAR] = self.to_env()
        if self.grpc_token:
            environ[TOKEN_ENV_VAR] = self.grpc_token

    @classmethod
    def from_env(cls, environ=os.environ) -> "NosaServerFlags | None":
        """The flags the launcher handed down, or None when NOSA is not enabled in this process."""
        raw = environ.get(ENV_VAR)
        if not raw:
            return None
        values = json.loads(raw)
        return cls(**{**values, "grpc_token": environ.get(TOKEN_ENV_VAR) or None})


def add_nosa_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("NOSA", "NOSA sparse attention with an offloaded KV cache")
    g.add_argument("--enable-nosa", action="store_true", help="serve a NOSA model with the NOSA backend")
    g.add_argument("--nosa-offload", choices=ON_OFF, default="on",
                   help="keep the KV cache in pinned host memory, GPU slots as its cache (default on)")
    g.add_argument("--nosa-slots", type=int, help="GPU slots per request, layer and KV head (default: topk_blocks)")
    g.add_argument("--nosa-max-slots", type=int, help="slots allocated, the ceiling of the gpu_slots knob")
    g.add_argument("--nosa-host-memory-gb", type=float,
                   help="offloading: the KV pool in pinned host memory, SGLang's token budget (default: SGLang's "
                        "GPU KV budget, at most half the RAM)")
    g.add_argument("--nosa-transfer-mode", choices=TRANSFER_MODES, default="zero_copy")
    g.add_argument("--nosa-prefetch", choices=ON_OFF, default="off")
    g.add_argument("--nosa-victim-policy", choices=VICTIM_POLICIES, default="lru")
    g.add_argument("--nosa-ck-dtype", choices=CK_DTYPES, default="float32",
                   help="compressed keys on the GPU: float32 (exact selection) or the model dtype (half the memory)")
    g.add_argument("--nosa-graphs", choices=ON_OFF, default="on",
                   help="replay each decode layer's runtime work as CUDA graphs (default on; CUDA only)")
    g.add_argument("--nosa-model-graphs", choices=MODEL_GRAPHS_CHOICES, default="auto",
                   help="SGLang's decode CUDA graphs: full (the whole step, NOSA inside; needs --nosa-offload off), "
                        "breakable (graphs broken at the NOSA attention; 'on' is the same), off (default auto: full "
                        "without offloading, breakable with it)")
    g.add_argument("--nosa-grpc-port", type=int, help="serve the NOSA control API (gRPC) on this port")
    g.add_argument("--nosa-grpc-host", default="127.0.0.1", help="address of the control API (default loopback)")
    g.add_argument("--nosa-grpc-token", help=f"bearer token of the control API (or env {TOKEN_ENV_VAR})")


def flags_from_args(ns: argparse.Namespace) -> NosaServerFlags:
    return NosaServerFlags(
        offload=ns.nosa_offload == "on", slots=ns.nosa_slots, max_slots=ns.nosa_max_slots,
        host_memory_gb=ns.nosa_host_memory_gb, transfer_mode=ns.nosa_transfer_mode,
        prefetch=ns.nosa_prefetch == "on", victim_policy=ns.nosa_victim_policy, grpc_port=ns.nosa_grpc_port,
        grpc_host=ns.nosa_grpc_host, grpc_token=ns.nosa_grpc_token or os.environ.get(TOKEN_ENV_VAR) or None,
        ck_dtype=ns.nosa_ck_dtype, graphs=ns.nosa_graphs == "on",
        model_graphs=ns.nosa_model_graphs,
    )


def check_owned_flags(sglang_argv: list[str]) -> None:
    """Reject the SGLang flags the launcher owns, before SGLang parses anything."""
    for token in sglang_argv:
        flag = token.split("=", 1)[0]
        if flag in OWNED_SGLANG_FLAGS:
            raise NosaFlagError(f"{flag}: not allowed with --enable-nosa ({OWNED_SGLANG_FLAGS[flag]})")


def field_of(flag: str) -> str:
    """The ServerArgs field of an SGLang flag: --page-size -> page_size."""
    return flag.removeprefix("--").replace("-", "_")


def check_owned_fields(server_kwargs) -> None:
    """Reject the ServerArgs fields NOSA owns (the engine's twin of check_owned_flags)."""
    for flag, why in OWNED_SGLANG_FLAGS.items():
        if field_of(flag) in server_kwargs:
            raise NosaFlagError(f"{field_of(flag)}: not allowed with NOSA ({why})")


def check_server_args(server_args) -> None:
    """Reject SGLang settings the NOSA backend cannot serve (after SGLang parsed them)."""
    for field, allowed, flag, why in UNSUPPORTED:
        value = getattr(server_args, field, allowed)
        if value != allowed and not (allowed is None and not value):
            raise NosaFlagError(f"{flag}={value!r}: not supported with --enable-nosa ({why}); allowed: {allowed!r}")
