"""Local lm-evaluation-harness tasks (held-out Shakespeare: Othello and King Lear), usable offline.

``TASKS_DIR`` is the ``include_path`` for lm-eval: ``linattn_shakespeare_mc`` (multiple_choice),
``linattn_shakespeare_ppl`` (loglikelihood_rolling: word/byte perplexity, bits per byte) and
``linattn_shakespeare_gen`` (generate_until, exact match of the next word); the group
``linattn_shakespeare`` runs all three.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
LOCAL_TASKS = ("linattn_shakespeare_mc", "linattn_shakespeare_ppl", "linattn_shakespeare_gen")
