"""`linattn demo`: the README's main job, on a CPU in a few minutes.

1. regenerate every shipped spec into a scratch folder and check it matches `generated/`;
2. verify one spec's ops against the oracle (property-based, outputs, states, gradients);
3. run every op forward and backward on a small batch and report the time;
4. train a tiny hybrid model (GLA blocks, one softmax-attention block) on the shipped Shakespeare sample
   with a byte-level BPE trained offline, printing the loss as it falls;
5. generate a sample from the exported model;
6. score it with lm-evaluation-harness on the local held-out tasks (small limits);
then a summary table with where every artefact was written. About 5 minutes on a 2-core CPU
(``--quick``: under 2 minutes). Each step prints one line when it starts and then its result; the training
prints its loss and the time left as it goes, the evaluation one progress bar per request type.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from . import ops
from .compiler import codegen, registry
from .reference import drawing as testing
from .reference import verify


def announce(step: int, text: str) -> None:
    print(f"[{step}/6] {text}", flush=True)


def run_demo(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    specs = registry.all_specs()
    scratch = out / "generated"
    announce(1, f"regenerate {len(specs)} specs into {scratch}")
    codegen.regen(specs, scratch, builtin=True)
    stale = codegen.regen(specs, codegen.default_out_dir(), check=True)
    print("      " + ("identical to the package's generated/" if not stale else f"package copy is stale: {stale}"))
    rows.append(("regen", f"{len(specs)} specs", "ok" if not stale else "STALE", str(scratch)))

    spec = registry.load("gla")
    n = 3 if args.quick else 10
    announce(2, f"verify {spec.name} against the float64 oracle ({n} hypothesis examples per backend)")
    t = time.time()
    res = verify.verify(spec, examples=n, max_T=48 if args.quick else 96)
    print(verify.table(res, verify.TOLERANCE[torch.float32]) + f"\n      ({time.time() - t:.0f} s)")
    rows.append(("verify gla", f"{n} examples x {len(res)} backends", "ok" if all(r.ok for r in res) else "FAIL", "-"))

    announce(3, "every op, forward + backward, B=2 T=64 H=2 D=16 on cpu (timings in the table at the end)")
    for s in specs:
        case = testing.draw_case(s, B=2, T=64, heads=2, K=16, V=16, seed=1)
        for mode in ("chunk", "fused_recurrent"):
            op = getattr(ops, f"{mode}_{s.name}")
            leaves = {k: (v.requires_grad_() if v is not None else None) for k, v in case.tensors.items()}
            t = time.time()
            o, st = case.call(op, leaves)
            (o.sum() + st.sum()).backward()
            dt = time.time() - t
            ok = torch.isfinite(o).all().item()
            rows.append((f"{mode}_{s.name}", f"o {list(o.shape)}", "ok" if ok else "NON-FINITE", f"{dt * 1e3:.0f} ms"))
    artefacts = {"generated code (regen)": scratch}
    rows += model_stages(out, args.quick, artefacts)
    print()
    print(f"{'step':<34} {'what':<34} {'status':<10} where / time")
    for r in rows:
        print(f"{r[0]:<34} {r[1]:<34} {r[2]:<10} {r[3]}")
    print()
    print(f"{'artefact':<34} path")
    for name, path in artefacts.items():
        print(f"{name:<34} {Path(path).resolve()}")
    print(f"demo finished in {time.time() - t0:.0f} s; artefacts under {out.resolve()}")
    return 0 if all(r[2] == "ok" for r in rows) else 1


# (steps, seq_len, batch, hidden, layers, BPE vocab, eval limit of the multiple-choice task)
SIZES = {"quick": (150, 64, 8, 64, 2, 512, 8), "full": (600, 128, 8, 128, 4, 1024, 40)}


def model_stages(out: Path, quick: bool, artefacts: dict) -> list[tuple[str, str, str, str]]:
    """Steps 4-6: train, generate, evaluate. Returns summary rows; fills ``artefacts`` (name -> path)."""
    from .data import SHAKESPEARE
    from .evaluate import evaluate_model
    from .generate import generate_text, load
    from .train import load_config, train

    steps, seq_len, batch, hidden, layers, vocab, mc_limit = SIZES["quick" if quick else "full"]
    dump = out / "train"
    shutil.rmtree(dump, ignore_errors=True)  # the demo's own folder: a re-run starts afresh
    cfg = load_config(None, [
        ("job.dump_folder", str(dump)), ("data.files", [str(SHAKESPEARE)]),
        ("tokenizer.kind", "bpe"), ("tokenizer.vocab_size", vocab),
        ("model.family", "gla"), ("model.hidden_size", hidden), ("model.num_hidden_layers", layers),
        ("model.num_heads", 2), ("model.attn", {"layers": [layers // 2], "num_heads": 2}),
        ("training.steps", steps), ("training.seq_len", seq_len), ("training.batch_size", batch),
        ("training.eval_interval", steps // 3), ("training.eval_batches", 4), ("optimizer.lr", 3e-3),
        ("lr_scheduler.warmup_steps", steps // 10), ("checkpoint.interval", steps // 3),
        ("checkpoint.keep_latest_k", 1), ("metrics.log_freq", 5),
    ])
    announce(4, f"train a {layers}-layer hybrid GLA (attention at layer {layers // 2}, hidden {hidden}) on "
                f"{SHAKESPEARE.name}: {steps} steps of {batch} x {seq_len} BPE tokens")
    print(f"      {'step':>6} {'loss':>8} {'held-out':>9} {'tokens/s':>9} {'left':>6}", flush=True)
    t = time.time()
    after_first: list[float] = []  # when step 1 ended: it includes one-off warm-up, left out of the estimate

    def show(step: int, record: dict) -> None:
        if step == 1:
            after_first.append(time.time())
        if step == 1 or step % max(1, steps // 10) == 0 or "val_loss" in record:
            val = f"{record['val_loss']:9.3f}" if "val_loss" in record else " " * 9
            left = f"{(time.time() - after_first[0]) / (step - 1) * (steps - step):5.0f}s" if step > 1 else ""
            print(f"      {step:>6} {record['loss']:8.3f} {val} {record['tokens_per_s']:9,.0f} {left:>6}", flush=True)

    result = train(cfg, on_step=show, progress=False)
    first, last = result.losses[1], sum(result.losses[s] for s in range(steps - 9, steps + 1)) / 10
    falling = last < first - 1.0
    print(f"      loss {first:.2f} -> {last:.2f} (mean of the last 10 steps), held-out {result.val_loss:.2f}; "
          f"{result.num_params / 1e6:.2f} M parameters, {time.time() - t:.0f} s")
    artefacts.update({"training log (JSONL)": result.log_path, "loss curve (PNG)": result.plot_path,
                      "checkpoints": result.checkpoint_dir, "trained model + tokenizer": result.final_dir})
    rows = [("train hybrid GLA", f"loss {first:.2f} -> {last:.2f}", "ok" if falling else "NOT FALLING",
             str(result.final_dir))]

    model, tokenizer = load(result.final_dir, device="cpu")
    prompt = "ROMEO.\n"
    announce(5, f"generate (temperature 0.8, top-p 0.95) from {prompt!r}:")
    print("      " + "-" * 60)
    text = generate_text(model, tokenizer, prompt, max_new_tokens=48 if quick else 96, temperature=0.8, top_p=0.95,
                         stream=True)
    print("\n      " + "-" * 60)
    sample = out / "sample.txt"
    sample.write_text(prompt + text)
    artefacts["generated sample"] = sample
    rows.append(("generate", f"{len(tokenizer(text).input_ids)} new tokens", "ok" if text.strip() else "EMPTY",
                 str(sample)))

    limits = {"linattn_shakespeare_mc": mc_limit, "linattn_shakespeare_ppl": 2 if quick else 10}
    announce(6, f"lm-evaluation-harness, local held-out tasks (Othello, King Lear): {limits}")
    results = {}
    for task, limit in limits.items():
        results.update(evaluate_model(model, tokenizer, [task], limit=limit, batch_size=8, quiet=True)["results"])
    acc = results["linattn_shakespeare_mc"]["acc,none"]
    bpb = results["linattn_shakespeare_ppl"]["bits_per_byte,none"]
    print(f"      next-line multiple choice: acc {acc:.3f} (chance 0.25); perplexity task: {bpb:.3f} bits per byte")
    scores = out / "eval_results.json"
    scores.write_text(json.dumps(results, indent=1, default=str))
    artefacts["lm-eval results (JSON)"] = scores
    rows.append(("lm-eval (local tasks)", f"mc acc {acc:.2f}, {bpb:.2f} bits/byte",
                 "ok" if 0 <= acc <= 1 and 0 < bpb < 8 else "FAIL", str(scores)))
    return rows
