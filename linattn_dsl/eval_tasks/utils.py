"""Functions the task YAMLs name with ``!function utils.<name>`` (lm-eval imports this file by path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load_jsonl(data_file: str, **metadata) -> datasets.DatasetDict:
    """The YAML's ``dataset_kwargs.data_file`` (next to this file) as a ``test`` split; ``metadata`` (what
    lm-eval passes from ``--metadata``) is not needed."""
    rows = [json.loads(line) for line in (HERE / data_file).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def perplexity_results(doc: dict, results: list) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
