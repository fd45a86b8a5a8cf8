"""The SGLang plugin (entry point `nosa` in group `sglang.srt.plugins`).

SGLang calls `register()` in every process that loads plugins (the launcher, each scheduler). It does
nothing unless `nosa_sglang.launch_server --enable-nosa` put the NOSA flags in the environment, so
installing this package never changes a plain SGLang server. When active it registers, once per
process: the attention backend `nosa` (and makes `--attention-backend nosa` parse), the model classes
`NosaLlamaForCausalLM` / `SparseLlamaForCausalLM`, the KV pool in NOSA's layout (`kv_pool.NosaKVPool`,
built where SGLang builds its MHA pool; offloading, sized by host memory) and the scheduler hooks (idle housekeeping, the
counters in `/server_info`).
"""

from __future__ import annotations

from nosa_sglang.server_flags import NosaServerFlags

BACKEND_NAME = "nosa"
_registered = False


def register() -> bool:
    """Register NOSA with SGLang if NOSA is enabled in this process; True when it is registered."""
    global _registered
    if _registered:
        return True
    flags = NosaServerFlags.from_env()
    if flags is None:
        return False
    from sglang.srt import server_args
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from nosa_sglang.backend import create_nosa_backend
    from nosa_sglang.kv_pool import BUILD_MHA_POOL, KV_BUDGET, build_mha_pool, host_kv_budget
    from nosa_sglang.models.nosa_llama import EntryClass
    from nosa_sglang.scheduler_control import add_internal_state, on_scheduler_idle

    if BACKEND_NAME not in server_args.ATTENTION_BACKEND_CHOICES:
        server_args.add_attention_backend_choices([BACKEND_NAME])
    ATTENTION_BACKENDS[BACKEND_NAME] = create_nosa_backend
    for cls in EntryClass:
        ModelRegistry.models[cls.__name__] = cls
    HookRegistry.register(BUILD_MHA_POOL, build_mha_pool, HookType.AROUND)
    HookRegistry.register(KV_BUDGET, host_kv_budget, HookType.AROUND)
    if flags.model_graphs != "off":
        from nosa_sglang import model_graphs as mg

        HookRegistry.register(mg.LOAD_BATCH, mg.stash_decode_rids, HookType.AROUND)
        if flags.model_graphs == "full":
            HookRegistry.register(mg.EXECUTE, mg.end_full_graph_step, HookType.AFTER)
        else:
            HookRegistry.register(mg.CAPTURE_ONE, mg.capture_logits_as_tuple, HookType.AROUND)
            HookRegistry.register(mg.REPLAY, mg.replay_logits_output, HookType.AROUND)
    scheduler = "sglang.srt.managers.scheduler.Scheduler"
    HookRegistry.register(f"{scheduler}.on_idle", on_scheduler_idle, HookType.AFTER)
    HookRegistry.register(f"{scheduler}.get_internal_state", add_internal_state, HookType.AFTER)
    _registered = True
    return True
