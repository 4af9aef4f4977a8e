"""Text to train and evaluate a tuned lens on, offline: a text file, a JSONL file with a `text`
field, or (the default) the Python reference manual's topics that ship with every Python
(`pydoc_data.topics`, ~465k characters of English prose and code: docs/tuned-lens.md "Usage" says why).

Documents are tokenised, joined with the end-of-text token and cut into sequences of equal
length (the tuned-lens package's chunking); every HELD_OUT_EVERY-th sequence is held out, a
split that depends on nothing but the corpus, the tokenizer and the length.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_lens.core.contract import Tokenizer
from mlx_lens.core.errors import LensError

DEFAULT = "pydoc-topics"
HELD_OUT_EVERY = 10  # sequences 9, 19, 29, ... are held out (10%)
MIN_SEQUENCES = 2 * HELD_OUT_EVERY


@dataclass(frozen=True)
class Corpus:
    name: str  # the --corpus value (a path, or DEFAULT)
    train: np.ndarray  # [N, T] token ids
    held_out: np.ndarray  # [M, T]


def documents(spec: str | None) -> list[str]:
    """The corpus's documents, in file order; a missing, empty or broken file is a LensError."""
    if spec in (None, DEFAULT):
        import pydoc_data.topics

        return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LensError(f"corpus not found: {spec}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LensError(f"unreadable corpus {spec}: {exc}") from exc
    if path.suffix != ".jsonl":
        docs = [text]
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise LensError(f"{spec}:{n}: not a JSON object with a \"text\" field") from None
            if not isinstance(doc, str):
                raise LensError(f"{spec}:{n}: \"text\" is not a string")
            docs.append(doc)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LensError(f"corpus {spec} holds no text")
    return docs


def load_corpus(spec: str | None, tokenizer: Tokenizer, seq_len: int) -> Corpus:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in documents(spec):
        ids += tokenizer.encode(doc, add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n < MIN_SEQUENCES:
        raise LensError(f"corpus {spec or DEFAULT} gives {n} sequences of {seq_len} tokens; "
                        f"at least {MIN_SEQUENCES} are needed (a longer text, or a smaller --seq-len)")
    seqs = np.asarray(ids[:n * seq_len], np.int64).reshape(n, seq_len)
    held = np.arange(n) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return Corpus(spec or DEFAULT, seqs[~held], seqs[held])
