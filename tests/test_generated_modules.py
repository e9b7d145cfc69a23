"""What a generated module carries: everything its ops need is decided at `linattn regen`.

* Running the shipped ops imports neither the compiler nor sympy, and works with sympy's simplify, lambdify and
  sympify patched to raise (every op, every switch setting, forward and backward).
* The module of a user spec works after its folder is moved and its spec file deleted, imported from a path
  without being registered in ``sys.modules``.
* Importing a module whose spec file changed since it was generated warns once.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import warnings

import torch

from linattn_dsl import reference
from linattn_dsl.compiler import codegen, registry

CALL_EVERY_OP = r"""
import itertools, sys
import torch
import linattn_dsl.ops as ops
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "sympy" or m.startswith("linattn_dsl.compiler"))
assert not loaded, loaded
import sympy
def refuse(*a, **k):
    raise AssertionError("sympy called at op-call time")
sympy.simplify = sympy.lambdify = sympy.sympify = refuse
import linattn_dsl.generated as gen
calls = 0
for name in sorted(n for n in dir(gen) if n.startswith("chunk_")):
    spec_name = name[len("chunk_"):]
    mod = getattr(gen, spec_name)
    sig = mod.SIGNATURE
    sizes = dict(B=1, T=70)
    for dims in sig.args.values():
        for d in dims:
            sizes.setdefault(d, 2 if d in (sig.head_dims["H"], sig.head_dims["HQ"]) else 8)
    for mode, sw in itertools.product(("chunk", "fused_recurrent"), sig.variants()):
        torch.manual_seed(0)
        used = sig.reads(sw)
        t = {n: torch.randn([sizes[d] for d in dims]) for n, dims in sig.args.items() if n in used}
        for n, contract in sig.sign_contracts(sw, frozenset(n for n in sig.optional if n in t)).items():
            t[n] = -t[n].abs() if contract in ("nonpositive", "negative") else t[n].abs()
        if sig.decay != "none":
            for n in t:
                t[n] = t[n] * 0.1
        leaves = [x.requires_grad_() for x in t.values()]
        fn = getattr(mod, f"{mode}_{spec_name}")
        kw = {n: t[n] for n in sig.optional if n in t}
        o, ht = fn(*[t[n] for n in sig.required], **kw, **sw, output_final_state=True)
        (o.sum() + ht.sum()).backward()
        assert torch.isfinite(o).all(), (name, mode, sw)
        assert all(x.grad is not None for x in leaves), (name, mode, sw)
        calls += 1
print("calls", calls)
"""


def test_ops_run_without_the_compiler_or_sympy():
    r = subprocess.run([sys.executable, "-c", CALL_EVERY_OP], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    n_variants = sum(len(list(s.variants())) if s.switches else 1 for s in registry.all_specs())
    assert r.stdout.split()[-1] == str(2 * n_variants)


USER_SPEC = '''
from linattn_dsl import Arg, Decay, Recurrence

spec = Recurrence(
    name="moved_gate",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", f=Arg("B T H")),
    optional=dict(bias="H"),
    query="q", key="k", value="v",
    decay=Decay.scalar(log="-softplus(f + bias) / 4"),
)
'''


def _import_unregistered(path):
    """Import a module file under a name nobody registers in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location("not_registered_anywhere", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_user_module_works_moved_and_without_its_spec(tmp_path):
    src = tmp_path / "spec_dir" / "moved_gate.py"
    src.parent.mkdir()
    src.write_text(USER_SPEC)
    spec = registry.load(str(src))
    gen = tmp_path / "gen"
    codegen.regen([spec], gen, builtin=False, index=False)
    moved = tmp_path / "elsewhere"
    shutil.move(str(gen), str(moved))
    src.unlink()
    mod = _import_unregistered(moved / "moved_gate.py")
    torch.manual_seed(0)
    t = dict(q=torch.randn(2, 70, 2, 8), k=torch.randn(2, 70, 2, 8), v=torch.randn(2, 70, 2, 8),
             f=torch.randn(2, 70, 2), bias=torch.randn(2))
    for mode in ("chunk", "fused_recurrent"):
        o, ht = getattr(mod, f"{mode}_moved_gate")(t["q"], t["k"], t["v"], t["f"], bias=t["bias"],
                                                   output_final_state=True)
        o_ref, ht_ref = reference.run(spec, t["q"].double(), t["k"].double(), t["v"].double(), t["f"].double(),
                                      bias=t["bias"].double(), output_final_state=True, dtype=torch.float64)
        assert (o.double() - o_ref).abs().max() <= 1e-4 * o_ref.abs().max()
        assert (ht.double() - ht_ref).abs().max() <= 1e-4 * ht_ref.abs().max()


def test_stale_module_warns_once(tmp_path):
    src = tmp_path / "moved_gate.py"
    src.write_text(USER_SPEC)
    spec = registry.load(str(src))
    codegen.regen([spec], tmp_path / "gen", builtin=False, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _import_unregistered(tmp_path / "gen" / "moved_gate.py")   # up to date: silent
    src.write_text(USER_SPEC.replace("/ 4", "/ 8"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _import_unregistered(tmp_path / "gen" / "moved_gate.py")
        _import_unregistered(tmp_path / "gen" / "moved_gate.py")
    stale = [w for w in caught if "earlier version of its spec" in str(w.message)]
    assert len(stale) == 1, [str(w.message) for w in caught]


def test_generated_modules_define_every_helper_their_kernels_call():
    """A generated module holds only its form's stages: every helper a kernel calls must still be in it."""
    import ast
    from pathlib import Path

    import linattn_dsl.generated as gen

    for path in sorted(Path(list(gen.__path__)[0]).glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and any(getattr(d, "attr", None) == "jit" for d in fn.decorator_list):
                called = {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                missing = {n for n in called if n.startswith("_") and n not in defined}
                assert not missing, (path.name, fn.name, missing)
