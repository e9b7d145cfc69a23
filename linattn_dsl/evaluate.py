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

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, backend="causal")
    results = simple_evaluate(lm, tasks=["linattn_shakespeare_mc"], limit=20,
                              task_manager=TaskManager(include_path=str(TASKS_DIR)))
    results["results"]["linattn_shakespeare_mc"]["acc,none"]

:func:`evaluate_model` wraps exactly this.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("eval", help="evaluate a trained model with lm-evaluation-harness (local tasks offline)")
    s.add_argument("model_dir", help="a save_pretrained folder holding the model and its tokenizer")
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (e.g. linattn_shakespeare)")
    s.add_argument("--limit", type=float, default=None, help="at most this many examples per task (< 1: a fraction)")
    s.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    s.add_argument("--num-fewshot", type=int, default=None, dest="num_fewshot")
    s.add_argument("--include-path", default=None, dest="include_path", help="another folder of task YAMLs")
    s.add_argument("--metadata", default=None, help='JSON passed to tasks, e.g. \'{"max_seq_lengths": [512]}\'')
    s.add_argument("--output", default=None, help="write the results (JSON) here")
    s.set_defaults(fn=run)


def check_args(limit: float | None, batch_size: int, num_fewshot: int | None, include_path: str | None) -> None:
    """The cheap checks of :func:`evaluate_model`'s arguments (named as ``linattn eval`` spells them)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {batch_size!r}")
    if limit is not None and not limit > 0:
        raise ValueError(f"--limit: expected a positive number (examples per task, or a fraction < 1), got {limit!r}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot: expected an int >= 0, got {num_fewshot!r}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path: {include_path}: no such folder (expected a folder of lm-eval task YAMLs)")


def task_manager(tasks: list[str], include_path: str | None = None, metadata: dict[str, Any] | None = None):
    """lm-eval's ``TaskManager`` over the local tasks (and ``include_path``); raises ``ValueError`` naming any
    task it does not know. Cheap when every task is local: lm-eval's ~15k built-in YAMLs (~10 s to index) are
    only read when another task or folder is asked for."""
    from lm_eval.tasks import TaskManager

    from linattn_dsl.eval_tasks import TASKS_DIR

    if not tasks:
        raise ValueError("--tasks: expected at least one task name")
    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    builtin = include_path is not None or not all(t.startswith("linattn_") for t in tasks)
    manager = TaskManager(include_path=paths, include_defaults=builtin, metadata=metadata or {})
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; local tasks: "
                         f"{sorted(t for t in manager.all_tasks if t.startswith('linattn_'))}")
    return manager


def evaluate_model(model, tokenizer, tasks: list[str], limit: float | None = None, batch_size: int = 8,
                   num_fewshot: int | None = None, include_path: str | None = None,
                   metadata: dict[str, Any] | None = None, quiet: bool = False, manager=None) -> dict[str, Any]:
    """``simple_evaluate`` of a model object on ``tasks``; returns lm-eval's results dict (``results``,
    ``configs``, ...). ``metadata`` goes to the tasks (synthetic ones need ``tokenizer`` as a name or path);
    ``manager``: a :func:`task_manager` built beforehand. ``quiet`` (the CLI and the demo): one progress bar of
    ours per request type instead of lm-eval's bars, and none of lm-eval's stderr (see :func:`filtered_stderr`)."""
    from lm_eval import simple_evaluate

    import linattn_dsl.models  # noqa: F401  (registers the model types)

    check_args(limit, batch_size, num_fewshot, include_path)
    manager = manager or task_manager(tasks, include_path, metadata)
    with filtered_stderr() if quiet else contextlib.nullcontext(None) as progress_stream:
        lm = make_lm(model, tokenizer, batch_size, progress_stream)
        return simple_evaluate(lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                               log_samples=False, bootstrap_iters=0)


def make_lm(model, tokenizer, batch_size: int, progress_stream: TextIO | None = None):
    """lm-eval's ``HFLM`` around a model object; with ``progress_stream``, its request bars are switched off
    (lm-eval's own ``disable_tqdm``) and one bar of ours, on that stream, counts the requests run."""
    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    if progress_stream is None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")

    class ProgressHFLM(HFLM):
        bar = None  # advanced by the rows of each batch the model runs (one row per request, or fewer)

        @contextlib.contextmanager
        def progress(self, kind: str, requests: list, rows_are_requests: bool = True) -> Iterator[None]:
            self.bar = tqdm(total=len(requests), desc=kind, unit="req", file=progress_stream,
                            dynamic_ncols=True)
            self.rows_are_requests = rows_are_requests
            try:
                yield
                self.bar.update(self.bar.total - self.bar.n)  # requests that shared a context ran as one row
            finally:
                self.bar.close()
                self.bar = None

        def advance(self, rows: int) -> None:
            if self.bar is not None and self.rows_are_requests:
                self.bar.update(min(rows, self.bar.total - self.bar.n))

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            with self.progress("loglikelihood", requests):
                return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            # a document spans a number of windows not known beforehand: the bar jumps to its end when done
            with self.progress("loglikelihood (rolling)", requests, rows_are_requests=False):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            with self.progress("generate", requests):
                return super().generate_until(requests, disable_tqdm=True)

        def _model_call(self, inps, *args, **kwargs):
            self.advance(inps.shape[0])
            return super()._model_call(inps, *args, **kwargs)

        def _model_generate(self, context, *args, **kwargs):
            self.advance(context.shape[0])
            return super()._model_generate(context, *args, **kwargs)

    return ProgressHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")


# what lm-eval leaves on stderr that a user cannot act on: tqdm frames of its request building (which has no
# switch) and git's answer when lm-eval asks for the commit hash of the current folder (it always does)
NOISE = re.compile(r"^\s*(?:[^|]*: ?)?\s*\d+%\|.*\|\s*\d+/\d+ \[|^fatal: not a git repository")


@contextlib.contextmanager
def filtered_stderr() -> Iterator[TextIO]:
    """Run the body with file descriptor 2 (this process's stderr and that of its children) going to a
    temporary file; afterwards copy it to the real stderr less the lines :data:`NOISE` matches. Yields a
    stream on the real stderr for the caller's own progress."""
    sys.stderr.flush()
    real = os.dup(2)
    own = os.fdopen(os.dup(real), "w")
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield own
        finally:
            sys.stderr.flush()
            os.dup2(real, 2)
            os.close(real)
            own.close()
            captured.seek(0)
            kept = [line for line in re.split(r"[\r\n]", captured.read().decode(errors="replace"))
                    if line.strip() and not NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from lm_eval.utils import make_table

    from .generate import check_model_dir, load

    # every cheap check before the model loads: arguments, the model folder, the task names
    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--metadata: not valid JSON ({e}): {args.metadata!r}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"--metadata: expected a JSON object, got {args.metadata!r}")
    check_args(args.limit, args.batch_size, args.num_fewshot, args.include_path)
    check_model_dir(args.model_dir)
    metadata.setdefault("tokenizer", str(Path(args.model_dir).resolve()))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    manager = task_manager(tasks, args.include_path, metadata)
    model, tokenizer = load(args.model_dir)
    results = evaluate_model(model, tokenizer, tasks, limit, args.batch_size, args.num_fewshot, args.include_path,
                             metadata, quiet=True, manager=manager)
    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"results": results["results"], "n-samples": results.get("n-samples")}, indent=1, default=str))
        print(f"results written to {args.output}")
    return 0
