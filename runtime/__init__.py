"""NOSA offload runtime (imported as nosa_sglang.runtime)."""
