"""`mlx-lens chat`: the original's basic chat check, one user message answered greedily."""
from __future__ import annotations

from mlx_lens.core.contract import Backend, InspectableBackend, require
from mlx_lens.core.errors import LensError

CHAT_PROMPT = "The capital of Germany is"
MAX_TOKENS = 64


def chat(backend: Backend, prompt: str = CHAT_PROMPT, max_tokens: int = MAX_TOKENS) -> str:
    backend = require(backend, InspectableBackend, "chat")
    tok = backend.tokenizer
    if not getattr(tok, "chat_template", None):
        raise LensError(f"{backend.info.name} has no chat template; `mlx-lens chat` needs one")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)  # the template already holds BOS if any
    return tok.decode(backend.generate(ids, max_tokens)).strip()
