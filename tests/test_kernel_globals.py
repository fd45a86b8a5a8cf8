"""Every global a Triton kernel reads is one the GPU compiler accepts.

The interpreter (TRITON_INTERPRET=1, how this suite runs the kernels) lets a @triton.jit function read
any module global; the compiler only takes tl.constexpr values, other jit functions and modules
("Cannot access global variable NEVER from within @jit'ed function", seen on an H200 after every CPU
test had passed). This scans the kernels' source so that such a kernel fails here, not on the GPU.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import pathlib
import types

import pytest
import triton.language as tl

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _jit_functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def bad_globals(module_name: str, source: str) -> list[str]:
    """'function: NAME (type)' for every non-constexpr global a jit function of the source reads."""
    module = importlib.import_module(module_name)
    found = []
    for fn in _jit_functions(ast.parse(source)):
        local = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for n in ast.walk(fn):
            if not isinstance(n, ast.Name) or not isinstance(n.ctx, ast.Load) or n.id in local:
                continue
            if n.id in vars(builtins):
                continue
            value = getattr(module, n.id, None)
            if isinstance(value, (types.ModuleType, tl.constexpr)):
                continue
            if type(value).__name__ in ("JITFunction", "InterpretedFunction"):
                continue
            found.append(f"{fn.name}: {n.id} ({type(value).__name__})")
    return found


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_jit_functions_read_only_constexpr_globals(path):
    assert bad_globals(f"nosa_sglang.kernels.{path.stem}", path.read_text()) == []


def test_the_scan_finds_a_plain_global():
    source = (KERNELS / "residency.py").read_text().replace("NEVER = tl.constexpr(3)", "NEVER = 3")
    assert "NEVER = 3" in source
    module = importlib.import_module("nosa_sglang.kernels.residency")
    saved = module.NEVER
    module.NEVER = 3  # what the module would hold with that source
    try:
        assert bad_globals("nosa_sglang.kernels.residency", source) == ["_resolve_kernel: NEVER (int)"]
    finally:
        module.NEVER = saved
