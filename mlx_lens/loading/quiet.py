"""The libraries' own progress bars (transformers' GGUF conversion, weight loading and shard
writing; huggingface_hub's downloads) only on a terminal, as mlx-lens's own
(mlx_lens/core/progress.py): no bar spam in logs, pipes or CI."""
from __future__ import annotations

import contextlib
import functools
from unittest import mock

from mlx_lens.core.progress import on_terminal


def quiet_library_bars() -> None:
    if on_terminal():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def quiet_gguf_conversion():
    """transformers' GGUF conversion bar is a bare tqdm that no switch of transformers turns
    off (docs/stack.md): off a terminal, it is disabled for the conversion."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if on_terminal() or not hasattr(gguf_utils, "tqdm"):
        return contextlib.nullcontext()
    return mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True))
