"""``linattn eval MODEL_DIR --tasks T1,T2 [--limit N]``: lm-evaluation-harness on a saved model.

lm-eval's own CLI cannot load ``model_type`` ``linattn_*`` (nothing registers it); this command imports
:mod:`linattn_dsl.models` first, loads the model and tokenizer from ``MODEL_DIR`` and runs
``simple_evaluate`` with the local tasks of :mod:`linattn_dsl.eval_tasks` on the include path:
``linattn_shakespeare_mc`` (multiple choice), ``linattn_shakespeare_ppl`` (perplexity),
``linattn_shakespeare_gen`` (generation), or the tag ``linattn_shakespeare`` for all three. lm-eval's
offline synthetic tasks work too (``pip install wonderwords``), e.g.
``--tasks niah_single_1 --metadata '{"max_seq_lengths": [512]}'``; the tokenizer they size prompts with
defaults to ``MODEL_DIR``'s.

The same from Python, with a model object (no save needed)::

    import linattn_dsl.models  # registers model_type linattn_* with the Auto classes
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from linattn_dsl.eval_tasks import TASKS_DIR

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    results = simple_evaluate(lm, tasks=["linattn_shakespeare_mc"], limit=20,
                              task_manager=TaskManager(include_path=str(TASKS_DIR)))
    results["results"]["linattn_shakespeare_mc"]["acc,none"]

:func:`evaluate_model` wraps exactly this.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("eval", help="evaluate a trained model with lm-evaluation-harness (local tasks offline)")
    s.add_argument("model_dir", help="a save_pretrained folder holding the model and its tokenizer")
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (e.g. linattn_shakespeare)")
    s.add_argument("--limit", type=float, default=None, help="at most this many examples per task")
    s.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    s.add_argument("--num-fewshot", type=int, default=None, dest="num_fewshot")
    s.add_argument("--include-path", default=None, dest="include_path", help="another folder of task YAMLs")
    s.add_argument("--metadata", default=None, help='JSON passed to tasks, e.g. \'{"max_seq_lengths": [512]}\'')
    s.add_argument("--output", default=None, help="write the results (JSON) here")
    s.set_defaults(fn=run)


def evaluate_model(model, tokenizer, tasks: list[str], limit: float | None = None, batch_size: int = 8,
                   num_fewshot: int | None = None, include_path: str | None = None,
                   metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """``simple_evaluate`` of a model object on ``tasks``; returns lm-eval's results dict (``results``,
    ``configs``, ...). ``metadata`` goes to the tasks (synthetic ones need ``tokenizer`` as a name or path)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import linattn_dsl.models  # noqa: F401  (registers the model types)
    from linattn_dsl.eval_tasks import TASKS_DIR

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    # indexing lm-eval's ~15k built-in task YAMLs takes ~10 s: skip it when only local tasks are asked for
    builtin = include_path is not None or not all(t.startswith("linattn_") for t in tasks)
    manager = TaskManager(include_path=paths, include_defaults=builtin, metadata=metadata or {})
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; local tasks: "
                         f"{sorted(t for t in manager.all_tasks if t.startswith('linattn_'))}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                           log_samples=False, bootstrap_iters=0)


def run(args: argparse.Namespace) -> int:
    from lm_eval.utils import make_table

    from .generate import load

    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--metadata: not valid JSON ({e}): {args.metadata!r}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"--metadata: expected a JSON object, got {args.metadata!r}")
    metadata.setdefault("tokenizer", str(Path(args.model_dir).resolve()))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    model, tokenizer = load(args.model_dir)
    results = evaluate_model(model, tokenizer, tasks, limit, args.batch_size, args.num_fewshot, args.include_path,
                             metadata)
    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"results": results["results"], "n-samples": results.get("n-samples")}, indent=1, default=str))
        print(f"results written to {args.output}")
    return 0
