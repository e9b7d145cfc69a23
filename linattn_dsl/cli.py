"""The `linattn` command: list, show, new, regen, verify, demo, train, generate, eval, convert.

Errors the user can act on (a bad argument, config, file or checkpoint: ``ValueError`` / ``OSError``) print
one ``linattn: error: ...`` line and exit 2. The commands that load models (train, generate, eval, demo)
print their own progress: transformers' and lm-eval's bars and notes are off while one runs
(:func:`quiet_libraries`), and back as they were afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from . import evaluate, generate
from .compiler import codegen, registry
from .compiler.spec import SpecError
from .train import cli as train_cli


class CliError(Exception):
    pass


def _load(name: str):
    try:
        return registry.load(name)
    except (registry.SpecNotFound, SpecError) as e:
        raise CliError(str(e)) from None


def _is_builtin(name: str) -> bool:
    return name.isidentifier() and name in registry.builtin_names()


def cmd_list(args) -> int:
    print(f"{'spec':<18} {'decay':<9} {'transition':<11} ops")
    for name in registry.builtin_names():
        s = _load(name)
        print(f"{s.name:<18} {s.decay.kind:<9} {s.transition.kind:<11} chunk_{s.name}, fused_recurrent_{s.name}")
    return 0


def cmd_show(args) -> int:
    print(_load(args.spec).describe())
    return 0


def cmd_regen(args) -> int:
    names = args.specs or registry.builtin_names()
    builtin = all(_is_builtin(n) for n in names)
    if not builtin and any(_is_builtin(n) for n in names):
        raise CliError("give either shipped spec names or spec files, not both")
    specs = [_load(n) for n in (registry.builtin_names() if builtin else names)]
    if builtin and args.out is None:
        out = codegen.default_out_dir()
    else:
        out = Path(args.out or "linattn_generated")
    if builtin and args.specs and args.out is None:
        # regenerate only the named specs, but keep the index of all of them
        specs_to_write = [s for s in specs if s.name in names]
        stale = codegen.regen(specs_to_write, out, check=args.check, index=False)
        stale += codegen.regen(specs, out, check=True, index=True) if args.check else \
            [r.filename for r in [codegen.render_index(sorted(s.name for s in specs))] if _write(out, r)]
    else:
        stale = codegen.regen(specs, out, check=args.check, builtin=builtin)
    if args.check:
        stale = sorted(set(stale))
        if stale:
            print(f"generated code in {out} is stale; run `linattn regen`:")
            for f in stale:
                print(f"  {f}")
            return 1
        print(f"{out}: up to date ({len(specs)} specs)")
        return 0
    print(f"{out}: wrote {len(stale)} file(s)" + (f": {', '.join(stale)}" if stale else " (all up to date)"))
    return 0


def _write(out: Path, r) -> bool:
    p = out / r.filename
    if p.exists() and p.read_text() == r.text:
        return False
    p.write_text(r.text)
    return True


def cmd_verify(args) -> int:
    import importlib
    import tempfile

    import torch

    from .reference import verify

    # the cheap checks first: a bad device or count fails before any code is generated
    verify.check_args(args.examples, args.max_t, args.device, ("--examples", "--max-t", "--device"))
    spec = _load(args.spec)
    dtype = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "bfloat16": torch.bfloat16}[args.dtype]
    print(f"verify {spec.name}: {args.examples} hypothesis examples per backend, {args.dtype} vs float64 oracle"
          f" on {args.device}", flush=True)
    tmp = None
    try:
        if _is_builtin(args.spec):
            module = importlib.import_module(f"linattn_dsl.generated.{spec.name}")
        else:   # a user's spec: generate it into a temporary folder (removed after) and import the result
            tmp = Path(tempfile.mkdtemp(prefix="linattn_verify_"))
            codegen.regen([spec], tmp, builtin=False, index=False)
            module = _import_file(tmp / f"{spec.name}.py")
        results = verify.verify(spec, module, examples=args.examples, dtype=dtype, max_T=args.max_t,
                                device=args.device)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(verify.table(results, verify.TOLERANCE[dtype]))
    return 0 if all(r.ok for r in results) else 1


def _import_file(path: Path):
    import importlib.util

    name = f"linattn_generated_{path.stem}_{abs(hash(str(path)))}"
    ls = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(ls)
    sys.modules[name] = mod
    ls.loader.exec_module(mod)
    return mod


NEW_SPEC = '''"""{name}: a recurrence spec with the layer that feeds it (written by `linattn new`; edit freely).

    S_t = diag(exp(g_t)) S_{{t-1}} + beta_t k_t (v_t - k_t^T diag(exp(g_t)) S_{{t-1}})^T    o_t = S_t^T (scale q_t)

Next: `linattn show {file}`, `linattn verify {file}`, `linattn regen {file} --out gen/` (the ops
chunk_{name} / fused_recurrent_{name}), and a model: `linattn train --model.spec {file}`, or
`linattn_dsl.models.register_spec("{file}")` (docs/adding_a_spec.md).
"""
from linattn_dsl import Arg, Decay, Layer, Param, Proj, Recurrence, Transition

spec = Recurrence(
    name="{name}",
    # every input's shape in symbols: B batch, T time, H value heads, HK q/k heads (they group), K / V head dims
    inputs=dict(q="B T HK K", k="B T HK K", v="B T H V",
                a="B T H",                       # the decay's logit, per token and head
                beta="B T H"),                   # the delta rule's write strength, before its sigmoid
    optional=dict(dt_bias="H"),                  # None at call time means 0
    query="q", key="k", value="v",
    # Decay.none() / .constant(log=...) per head / .scalar(log=...) per token / .vector(log=...) per channel;
    # the log-decay must be provably <= 0 (sympy checks it)
    decay=Decay.scalar(log="-softplus(a + dt_bias)"),
    # Transition.none() (additive), .delta(beta=...), .general(a=..., b=...)
    transition=Transition.delta(beta="sigmoid(beta)"),
    qk_l2norm=True,
)

# How a token-mixing layer feeds the op: every input the declaration leaves out gets the default derived from
# the spec (linattn_dsl.compiler.layer); delete this block to use the default for all of them. Any value may be
# Option("field", default) (or Option("field", default, {{value: declared value, ...}})): a field of the model's
# config, e.g. conv=Option("use_short_conv", True). Modules are named FLA-style: q_proj, q_conv1d, ..., o_proj.
layer = Layer(
    inputs=dict(
        q=Proj(conv=True),                       # W x, then a short causal conv (config.conv_size) and silu
        k=Proj(conv=True),
        v=Proj(conv=True),
        a=Proj(),                                # a plain projection (rank=16 for a low-rank one, bias=True)
        beta=Proj(),
        dt_bias=Param(init="zeros"),             # a learned per-head parameter: zeros, ones, normal, log_uniform
    ),
    output_gate="swish",                         # rms_norm(o) * swish(W_g x) per head; "sigmoid"; None
    mlp=True,                                    # a SwiGLU MLP after the mixer in every block; False: mixer only
    name="{name}",                               # the model type: linattn_{name}
)
'''


def cmd_new(args) -> int:
    if not args.name.isidentifier():
        print(f"linattn new: NAME must be an identifier (the spec's and the model's name), got {args.name!r}",
              file=sys.stderr)
        return 2
    path = Path(args.out or f"{args.name}.py")
    if path.exists():
        print(f"linattn new: {path} exists; not overwritten (give --out another path)", file=sys.stderr)
        return 1
    path.write_text(NEW_SPEC.format(name=args.name, file=path.as_posix()))
    print(f"wrote {path}: a Gated-DeltaNet-like spec {args.name!r} with its layer declaration; see its docstring "
          "for what to run next")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_convert(args) -> int:
    from .models.convert import convert_fla, convert_hf_mamba

    dst = convert_fla(args.from_fla, args.dst) if args.from_fla else convert_hf_mamba(args.from_hf_mamba, args.dst)
    print(f"wrote {dst}: load it with linattn_dsl.models.from_pretrained({str(dst)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linattn", description="linattn-dsl: a compiler for linear attention")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the shipped specs").set_defaults(fn=cmd_list)
    s = sub.add_parser("show", help="show a spec: inputs, roles, shapes")
    s.add_argument("spec", help="a spec name or a path to a spec file")
    s.set_defaults(fn=cmd_show)
    s = sub.add_parser("regen", help="regenerate generated/ from the specs and templates")
    s.add_argument("specs", nargs="*", help="spec names or spec files (default: every shipped spec)")
    s.add_argument("--out", default=None, help="output folder (default: the package's generated/)")
    s.add_argument("--check", action="store_true", help="write nothing; exit 1 listing stale files")
    s.set_defaults(fn=cmd_regen)
    s = sub.add_parser("verify", help="property-based equivalence of a spec's ops against the oracle")
    s.add_argument("spec")
    s.add_argument("--examples", type=int, default=20)
    s.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    s.add_argument("--max-t", type=int, default=80, dest="max_t")
    s.add_argument("--device", default="cpu", help="cpu (the PyTorch twin, or the Triton kernels under "
                   "TRITON_INTERPRET=1) or cuda (the compiled Triton kernels)")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("new", help="write a commented spec file with a layer declaration to start from")
    s.add_argument("name", help="the spec's name (an identifier)")
    s.add_argument("--out", default=None, help="the file to write (default: NAME.py)")
    s.set_defaults(fn=cmd_new)
    s = sub.add_parser("demo", help="the main job: regenerate, verify, run a tiny model on CPU")
    s.add_argument("--out", default="linattn_demo", help="folder for the demo's artefacts")
    s.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("convert", help="convert a checkpoint saved by FLA (flash-linear-attention) or by "
                       "transformers' MambaForCausalLM into ours")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-fla", metavar="SRC", dest="from_fla",
                        help="a folder saved by FLA's save_pretrained (config.json + safetensors)")
    source.add_argument("--from-hf-mamba", metavar="SRC", dest="from_hf_mamba",
                        help="a folder saved by transformers' MambaForCausalLM.save_pretrained (family mamba)")
    s.add_argument("dst", metavar="DST", help="the folder to write (AutoModelForCausalLM.from_pretrained loads it)")
    s.set_defaults(fn=cmd_convert)
    train_cli.register(sub)  # train, generate, eval: each module registers and runs its own subcommand
    generate.register(sub)
    evaluate.register(sub)
    return p


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """For one command: transformers' (and huggingface_hub's) progress bars off and its log at errors only,
    lm-eval's log at errors only; each restored afterwards, so nothing outside the command changes.

    What these hide are notes the user cannot act on ("Writing model shards", "Loading weights", lm-eval's
    "`pretrained` model kwarg is not of type `str`" for the model object we pass on purpose)."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    hf_bars, hub_bars_off, verbosity = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(),
                                        hf_logging.get_verbosity())
    lm_eval_log = logging.getLogger("lm_eval")
    lm_eval_level = lm_eval_log.level
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    lm_eval_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_eval_log.setLevel(lm_eval_level)
        hf_logging.set_verbosity(verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if hub_bars_off:
            hub_utils.disable_progress_bars()
        elif hub_utils.are_progress_bars_disabled():
            hub_utils.enable_progress_bars()


# the commands that load models and libraries that print progress of their own
QUIET_COMMANDS = ("train", "generate", "eval", "demo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with quiet_libraries() if args.cmd in QUIET_COMMANDS else contextlib.nullcontext():
            return args.fn(args)
    except (CliError, OSError, ValueError) as e:
        print(f"linattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
