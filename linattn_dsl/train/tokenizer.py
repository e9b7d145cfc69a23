"""Tokenizers that need no network: a byte tokenizer, a byte-level BPE trained on the data, or a local
Hugging Face tokenizer folder. All three are ``PreTrainedTokenizerFast`` objects that ``save_pretrained``
writes and ``AutoTokenizer`` reloads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # one special token serves as end-of-document, beginning and padding (as in GPT-2)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1 << 30, clean_up_tokenization_spaces=False)


def _byte_level(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (GPT-2's byte-to-unicode alphabet) and ``<|endoftext|>`` (id 256); no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _BYTE_OF[c])
    vocab = {c: i for i, c in enumerate(alphabet)}
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([EOS])
    return _wrap(tokenizer)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` is id 0) trained on ``texts``."""
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_chunks(texts), trainer=trainer)
    return _wrap(tokenizer)


def load_pretrained(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer.path: {path}: the tokenizer has no eos_token (needed between documents)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    for text in texts:
        for i in range(0, len(text), size):
            yield text[i:i + size]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel pre-tokenizes into)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}
