"""Programmatic dependent launch (kernels/pdl.py): every kernel that may be launched as a programmatic
dependent waits for its predecessor before touching memory.

On CPU: the source of every such kernel starts with the wait (an AST check), and kernels compiled for
sm_90 by the real NVIDIA backend (PTX; no GPU needed) issue `griddepcontrol.wait` before their first
global load, store or atomic. The GPU twins (bit-for-bit outputs with PDL on and off) are in
test_kernel_sparse_decode.py and test_runtime_gpu.py.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _jit_functions_with_wait():
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list):
                if "WAIT" in {a.arg for a in fn.args.args}:
                    yield path.name, fn


def test_every_waiting_kernel_waits_first():
    found = list(_jit_functions_with_wait())
    assert len(found) == 8, [f"{p}:{fn.name}" for p, fn in found]  # the decode chain (kernels/pdl.py)
    for path, fn in found:
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) \
            else fn.body  # NOTE: a docstring is not a statement that runs
        first = body[0]
        assert isinstance(first, ast.If) and ast.unparse(first.test) == "WAIT", f"{path}:{fn.name}"
        calls = [ast.unparse(s) for s in first.body]
        assert calls == ["tl_cuda.gdc_wait()", "tl_cuda.gdc_launch_dependents()"], f"{path}:{fn.name}: {calls}"


def test_every_waiting_kernel_is_launched_with_pdl_options():
    """A kernel with a WAIT constexpr is launched with `**pdl.options(...)` (WAIT and launch_pdl together)."""
    for path, fn in _jit_functions_with_wait():
        source = (KERNELS / path).read_text()
        launches = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Subscript) and ast.unparse(n.func.value) == fn.name]
        assert launches, f"{path}:{fn.name} is never launched"
        for call in launches:
            assert any(k.arg is None and ast.unparse(k.value).startswith("pdl.options(") for k in call.keywords), \
                f"{path}:{fn.name} launched without **pdl.options(...)"


COMPILE = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import nosa_sglang.kernels.sparse_decode as SD
    import nosa_sglang.kernels.topk as T

    def ptx(fn, sig, consts, **opts):
        sig = {**sig, **{k: "constexpr" for k in consts}}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(launch_pdl=True, **opts))
        return k.asm["ptx"]

    out = {}
    topk_sig = {"S": "*fp32", "E": "*fp32", "SEQ": "*i32", "OUT": "*i32", "n_rows": "i32", "n_kv_heads": "i32",
                "nb": "i32"}
    for nb in (16, 2048):
        consts = dict(ROWS=1, RADIX=True, BLOCK_NB=nb, BLOCK_SIZE=64, INIT=1, LOCAL=2, QUERY_K=16, TOP_K=64,
                      PAD_K=64, NOSA=True, SEARCH_BITS=1, PASSES=32, WAIT=True)
        out[f"topk radix {nb}"] = ptx(T._topk_kernel, topk_sig, consts, num_warps=max(4, min(16, nb // 256)))
    merge_sig = {"O_PART": "*fp32", "LSE_PART": "*fp32", "O": "*bf16", "LSE": "*fp32", "n_q_heads": "i32",
                 "n_splits": "i32", "s_ob": "i32", "s_oh": "i32"}
    out["merge"] = ptx(SD._merge_kernel, merge_sig, dict(HEAD_DIM=128, BLOCK_SPLITS=8, WAIT=True), num_warps=4)
    json.dump(out, sys.stdout)
""")


def test_compiled_for_sm90_the_wait_precedes_every_memory_access():
    """The real backend (not the interpreter): the radix top-k (the histogram at 16 and 2048 blocks) and
    the split merge compile for sm_90 with PDL, and no global access comes before the wait."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300)
    if run.returncode != 0 and "ptxas" not in run.stderr and "libdevice" not in run.stderr and \
            "No module named" not in run.stderr:
        raise AssertionError(run.stderr[-2000:])
    if run.returncode != 0:
        pytest.skip(f"this Triton cannot compile for sm_90 here: {run.stderr.strip().splitlines()[-1]}")
    for name, ptx in json.loads(run.stdout).items():
        wait = ptx.find("griddepcontrol.wait")
        first = min((i for i in (ptx.find(op) for op in ("ld.global", "st.global", "atom.")) if i >= 0), default=-1)
        assert 0 <= wait < first, f"{name}: wait at {wait}, first global access at {first}"
        assert "griddepcontrol.launch_dependents" in ptx, name
