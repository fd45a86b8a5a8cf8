"""NOSA Triton kernels (imported as nosa_sglang.kernels)."""
