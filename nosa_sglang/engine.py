"""`nosa_sglang.Engine(...)` / `nosa_sglang.Runtime(...)`: SGLang's offline engine and its frontend-language
runtime (a server in a child process, `sgl.set_default_backend(runtime)`) with NOSA.

The same contract as the launcher: NOSA settings as NosaServerFlags, any other ServerArgs field as a
keyword; the fields NOSA owns (attention backend, page size, CUDA graphs) are set here and refused when
given; SGLang settings NOSA cannot serve are refused before anything starts.
"""

from __future__ import annotations

from nosa_sglang.server_flags import (
    DECODE_GRAPHS_OFF, DEFAULT_MAX_RUNNING_REQUESTS, NosaServerFlags, check_owned_fields, check_server_args,
    field_of, nosa_server_args,
)


def server_arg_fields(nosa: NosaServerFlags | None = None, **kwargs) -> dict:
    """The ServerArgs fields of a NOSA server, validated (a ServerArgs is built and checked), and the NOSA
    settings exported for the processes it starts."""
    from sglang.srt.server_args import ServerArgs

    from nosa_sglang.plugin import register

    check_owned_fields(kwargs)
    graphs_off = any(kwargs.get(field_of(flag)) for flag in DECODE_GRAPHS_OFF)
    nosa = (nosa or NosaServerFlags()).under_sglang_graph_switch(graphs_off)
    nosa.export()
    register()  # here too: ServerArgs must accept attention_backend="nosa" in this process
    fields = {**nosa_server_args(nosa), "max_running_requests": DEFAULT_MAX_RUNNING_REQUESTS, "log_level": "error",
              **kwargs}
    check_server_args(ServerArgs(**fields))
    return fields


def engine_server_args(nosa: NosaServerFlags | None = None, **kwargs):
    """The ServerArgs of a NOSA engine (also exports the NOSA settings for its scheduler process)."""
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(**server_arg_fields(nosa, **kwargs))


def Engine(nosa: NosaServerFlags | None = None, **kwargs):
    """A started `sglang.Engine` serving a NOSA checkpoint through the NOSA backend."""
    import sglang

    return sglang.Engine(server_args=engine_server_args(nosa, **kwargs))


def Runtime(nosa: NosaServerFlags | None = None, launch_timeout: float = 300.0, **kwargs):
    """A started `sglang.Runtime` (an HTTP server in a child process, for the frontend language:
    `sgl.set_default_backend(runtime)` or `runtime.endpoint`) serving a NOSA checkpoint; `shutdown()` ends it."""
    from sglang.lang.backend.runtime_endpoint import Runtime as SGLangRuntime

    fields = server_arg_fields(nosa, **kwargs)
    return SGLangRuntime(launch_timeout=launch_timeout, **fields)
