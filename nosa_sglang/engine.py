"""`nosa_sglang.Engine(...)`: SGLang's offline engine with NOSA, for scripts and the frontend language.

The same contract as the launcher: NOSA settings as NosaServerFlags, any other ServerArgs field as a
keyword; the fields NOSA owns (attention backend, page size, CUDA graphs) are set here and refused when
given; SGLang settings NOSA cannot serve are refused before the scheduler starts.
"""

from __future__ import annotations

from nosa_sglang.server_flags import (
    DEFAULT_MAX_RUNNING_REQUESTS, NOSA_SERVER_ARGS, NosaServerFlags, check_owned_fields, check_server_args,
)


def engine_server_args(nosa: NosaServerFlags | None = None, **kwargs):
    """The ServerArgs of a NOSA engine (also exports the NOSA settings for its scheduler process)."""
    from sglang.srt.server_args import ServerArgs

    from nosa_sglang.plugin import register

    check_owned_fields(kwargs)
    (nosa or NosaServerFlags()).export()
    register()  # here too: ServerArgs must accept attention_backend="nosa" in this process
    kwargs.setdefault("max_running_requests", DEFAULT_MAX_RUNNING_REQUESTS)
    kwargs.setdefault("log_level", "error")
    server_args = ServerArgs(**NOSA_SERVER_ARGS, **kwargs)
    check_server_args(server_args)
    return server_args


def Engine(nosa: NosaServerFlags | None = None, **kwargs):
    """A started `sglang.Engine` serving a NOSA checkpoint through the NOSA backend."""
    import sglang

    return sglang.Engine(server_args=engine_server_args(nosa, **kwargs))
