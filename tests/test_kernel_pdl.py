"""Programmatic dependent launch (kernels/pdl.py): every kernel that may be launched as a programmatic
dependent waits for its predecessor before touching memory.

On CPU: the source of every such kernel starts with the wait (an AST check), and kernels compiled for
sm_90 by the real NVIDIA backend (PTX; no GPU needed) issue `griddepcontrol.wait` before their first
global load, store, atomic or async copy. The GPU twins (bit-for-bit outputs with PDL on and off) are in
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
    for path in sorted(p for p in KERNELS.glob("*.py") if p.name != "pdl.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list):
                if "WAIT" in {a.arg for a in fn.args.args}:
                    yield path.name, fn


def _statements(fn: ast.FunctionDef) -> list:
    """The body without its docstring (not a statement that runs)."""
    doc = isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
    return fn.body[1:] if doc else fn.body


def test_every_waiting_kernel_waits_first():
    found = list(_jit_functions_with_wait())
    assert len(found) == 8, [f"{p}:{fn.name}" for p, fn in found]  # the decode chain (kernels/pdl.py)
    for path, fn in found:
        assert ast.unparse(_statements(fn)[0]) == "pdl.prologue(WAIT)", f"{path}:{fn.name}"
    prologue = next(fn for fn in ast.walk(ast.parse((KERNELS / "pdl.py").read_text()))
                    if isinstance(fn, ast.FunctionDef) and fn.name == "prologue")
    (only,) = _statements(prologue)
    assert isinstance(only, ast.If) and ast.unparse(only.test) == "WAIT"
    assert [ast.unparse(s) for s in only.body] == ["tl_cuda.gdc_wait()", "tl_cuda.gdc_launch_dependents()"]


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
    import nosa_sglang.kernels.residency as RES
    import nosa_sglang.kernels.selection as SEL
    import nosa_sglang.kernels.sparse_decode as SD
    import nosa_sglang.kernels.token_write as TW
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
                      PAD_K=64, NOSA=True, WAIT=True)
        out[f"topk radix {nb}"] = ptx(T._topk_kernel, topk_sig, consts, num_warps=max(4, min(16, nb // 256)))
    packed = dict(consts, ROWS=8, RADIX=False, BLOCK_NB=256)  # prefill's packed rows: the binary search
    out["topk binary packed"] = ptx(T._topk_kernel, topk_sig, packed, num_warps=8)
    merge_sig = {"O_PART": "*fp32", "LSE_PART": "*fp32", "O": "*bf16", "LSE": "*fp32", "n_q_heads": "i32",
                 "n_splits": "i32", "s_ob": "i32", "s_oh": "i32"}
    out["merge"] = ptx(SD._merge_kernel, merge_sig, dict(HEAD_DIM=128, BLOCK_SPLITS=8, WAIT=True), num_warps=4)
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    out["decode"] = ptx(SD._decode_kernel, {
        "Q": "*bf16", "K": "*bf16", "V": "*bf16", "C": "*fp32", "SLOT": "*i64", "BLK": "*i32", "SEQ": "*i64",
        "O": "*bf16", "LSE": "*fp32", "O_PART": "*fp32", "LSE_PART": "*fp32", "scale_log2": "fp32",
        **ints("n_kv_heads", "n_entries", "per_split", "s_qb", "s_qh", "s_ks", "s_kt", "s_vs", "s_vt", "s_cs",
               "s_ct", "s_ib", "s_ih", "s_in", "s_bb", "s_bh", "s_bn", "s_ob", "s_oh")},
        dict(G=8, BLOCK_G=16, HEAD_DIM=128, BLOCK_SIZE=64, SPLIT=True, IEEE=False, ENTRIES=2, WAIT=True),
        num_warps=4, num_stages=2)
    out["token write"] = ptx(TW._write_token_kernel, {
        "KV": "*bf16", "CS": "*fp32", "RING": "*bf16", "CT": "*fp32", "SLOTS": "*i64", "OFF": "*i64",
        "ROWS": "*i64", "POS": "*i64", "K": "*bf16", "V": "*bf16", "C": "*fp32",
        **ints("n_heads", "d", "ring_len", "s_kv_t", "s_kv_s", "s_cs", "s_r_r", "s_r_k", "s_r_h", "s_ct_r",
               "s_ct_h", "s_sl_b", "s_sl_h", "s_k_b", "s_k_h", "s_v_b", "s_v_h", "s_c_b", "s_c_h")},
        dict(BLOCK_D=128, WAIT=True), num_warps=1)
    out["chunk logits"] = ptx(SEL._chunk_logits_kernel, {
        "Q": "*bf16", "CK": "*bf16", "NCH": "*i32", "ROWS": "*i32", "W": "*fp32", "M": "*fp32", "L": "*fp32", "scale_log2": "fp32",
        **ints("n_kv_heads", "cmax", "per_split", "s_qb", "s_qh", "s_cb", "s_cc", "s_ch")},
        dict(G=8, BLOCK_G=16, HEAD_DIM=128, BLOCK_C=SEL.CHUNK_TILE, DOT="native", HAS_ROWS=False, WAIT=True),
        num_warps=4)
    out["group probs"] = ptx(SEL._group_probs_kernel, {
        "W": "*fp32", "M": "*fp32", "L": "*fp32", "NCH": "*i32", "P": "*fp32",
        **ints("n_kv_heads", "cmax", "n_splits")},
        dict(BLOCK_C=SEL.PROB_TILE, BLOCK_G=8, G=8, BLOCK_SPLITS=4, WAIT=True))
    out["pool"] = ptx(SEL._pool_kernel, {
        "X": "*fp32", "NCH": "*i32", "SEQ": "*i32", "ROWS": "*i32", "OUT": "*fp32", **ints("n_kv_heads", "nb", "s_xb", "s_xc", "s_xh")},
        dict(R=4, R_PAD=4, BLOCK_NB=SEL.BLOCK_TILE, FORCED=True, HAS_ROWS=False, BLOCK_SIZE=64, INIT=1, LOCAL=2,
             WAIT=True))
    out["residency"] = ptx(RES._resolve_kernel, {
        "SEL": "*i32", "BS": "*i32", "SB": "*i32", "LS": "*i32", "SE": "*fp32", "E": "*fp32", "INACT": "*i1",
        "STEP": "*i32", "BASE": "*i64", "SLOT_IDS": "*i64", "MISS": "*i1", "DST": "*i64", "COUNTS": "*i64",
        "SCR": "*i64", **ints("n_heads", "K", "S", "MB", "NB", "trash", "s_sel_b", "s_sel_h", "s_bs_b", "s_bs_h",
                               "s_sb_b", "s_sb_h", "s_ls_b", "s_ls_h", "s_se_b", "s_se_h", "s_e_b", "s_e_h"),
        "C": "*fp32", "C_ROWS": "*i64", "C_SLOTS": "*fp32", **ints("s_c_r", "s_c_h"), "H_TABLE": "*i32",
        "H_ROWS": "*i64", "s_ht": "i32", "FETCH": "*i64", "n_out": "i32", "ROW_COUNTS": "*i64",
        "LAYER_COUNTS": "*i64", "T_ROWS": "*i64"},
        dict(K_PAD=64, S_PAD=128, LRU=True, STORE_E=False, COPY_C=True, HOST_RUNS=True, TALLY=True, BLOCK=64,
             BLOCK_PAD=64, WAIT=True), num_warps=4)
    json.dump(out, sys.stdout)
""")


def test_compiled_for_sm90_the_wait_precedes_every_memory_access():
    """The real backend (not the interpreter): every kernel of the chain compiles for sm_90 with PDL (the
    radix top-k's histogram at 16 and 2048 blocks too), and in each no global access comes before the
    wait."""
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
        accesses = ("ld.global", "st.global", "atom.global", "red.global", "cp.async")
        first = min((i for i in (ptx.find(op) for op in accesses) if i >= 0), default=-1)
        assert 0 <= wait < first, f"{name}: wait at {wait}, first global access at {first}"
        assert "griddepcontrol.launch_dependents" in ptx, name
