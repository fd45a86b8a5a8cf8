"""`nosa_sglang.Engine(...)`: SGLang's offline engine with NOSA, for scripts and the frontend language.

The same contract as the launcher: NOSA settings as NosaServerFlags, any other ServerArgs field as a
keyword; the fields NOSA owns (attention backend, page size, CUDA graphs) are set here and refused when
given; SGLang settings NOSA cannot serve are refused before the scheduler starts.
"""

from __future__ import annotations

import os

from nosa_sglang.launch_server import DEFAULT_MAX_RUNNING_REQUESTS
from nosa_sglang.server_flags import ENV_VAR, TOKEN_ENV_VAR, NosaFlagError, NosaServerFlags, check_server_args

OWNED_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend", "page_size")


def engine_server_args(nosa: NosaServerFlags | None = None, **kwargs):
    """The ServerArgs of a NOSA engine (also exports the NOSA settings for its scheduler process)."""
    from sglang.srt.server_args import ServerArgs

    from nosa_sglang.plugin import register

    owned = [k for k in OWNED_FIELDS if k in kwargs]
    if owned:
        raise NosaFlagError(f"{owned[0]}: not allowed with NOSA (the NOSA engine sets it)")
    flags = nosa or NosaServerFlags()
    os.environ[ENV_VAR] = flags.to_env()
    if flags.grpc_token:
        os.environ[TOKEN_ENV_VAR] = flags.grpc_token
    register()  # here too: ServerArgs must accept attention_backend="nosa" in this process
    kwargs.setdefault("max_running_requests", DEFAULT_MAX_RUNNING_REQUESTS)
    kwargs.setdefault("log_level", "error")
    server_args = ServerArgs(attention_backend="nosa", page_size=64, cuda_graph_backend_decode="disabled",
                             cuda_graph_backend_prefill="disabled", **kwargs)
    check_server_args(server_args)
    return server_args


def Engine(nosa: NosaServerFlags | None = None, **kwargs):
    """A started `sglang.Engine` serving a NOSA checkpoint through the NOSA backend."""
    import sglang

    return sglang.Engine(server_args=engine_server_args(nosa, **kwargs))
