"""Run under `mlx.launch`: the pipeline backend's statistics of one tiny model, saved by rank 0
(tests/test_pipeline.py compares them with one process's). Also a rank that dies, on request.

    mlx.launch --backend ring -n 2 PYTHON tests/pipeline_worker.py MODEL OUT.npz [die]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlx_lens.core.lens import Lens  # noqa: E402
from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.core.contract import SweepOptions  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402
from tests.lens_checks import PROMPT  # noqa: E402

PROMPTS = ["Berlin is the capital of", "The capital of France is called simply"]


def main(model: str, out: str, die: bool = False) -> None:
    backend = backend_choice.load("mlx", resolve(model))
    if die and backend.rank == 1:
        os._exit(1)  # before sending its residual on: rank 0 waits for the statistics
    ids = backend.tokenizer.encode(PROMPT)
    answer = backend.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    stats = backend.sweep(ids, SweepOptions(answer_ids=(answer,)))
    batch = backend.sweep_next_token([backend.tokenizer.encode(p) for p in PROMPTS],
                                     [((answer, 5),)] * len(PROMPTS), Lens("raw"))
    final = backend.final_logits([ids])
    if backend.rank == 0:
        arrays = {f"sweep_{k}": v for k, v in vars(stats).items() if isinstance(v, (np.ndarray, int))}
        for b, s in enumerate(batch):
            arrays |= {f"batch{b}_{k}": v for k, v in vars(s).items()
                       if isinstance(v, (np.ndarray, int))}
        np.savez(out, final=final, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "die")
