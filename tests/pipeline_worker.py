"""Run under `mlx.launch`: the pipeline backend's statistics of tiny models, one launch for all
of them (each launch costs the processes' start), saved by rank 0 as OUT_DIR/<folder name>.npz
(tests/test_pipeline.py compares them with one process's).

    mlx.launch --backend ring -n 2 PYTHON tests/pipeline_worker.py OUT_DIR MODEL [MODEL ...]
"""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlx_lens.core.lens import Lens  # noqa: E402
from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.core.contract import SweepOptions  # noqa: E402
from mlx_lens.core.steering import Steering  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402
from tests.lens_checks import PROMPT  # noqa: E402

PROMPTS = ["Berlin is the capital of", "The capital of France is called simply"]


def steering(d_model: int) -> Steering:
    """Vectors at row 0 (rank 0's embedding step) and row 2, for the steered sweep."""
    rng = np.random.default_rng(0)
    return Steering({row: rng.normal(size=d_model).astype(np.float32) for row in (0, 2)})


def main(out: Path, model: str) -> None:
    backend = backend_choice.load("mlx", resolve(model))
    ids = backend.tokenizer.encode(PROMPT)
    answer = backend.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    stats = backend.sweep(ids, SweepOptions(answer_ids=(answer,)))
    batch = backend.sweep_next_token([backend.tokenizer.encode(p) for p in PROMPTS],
                                     [((answer, 5),)] * len(PROMPTS), Lens("raw"))
    final = backend.final_logits([ids])
    with backend.steered(steering(backend.info.d_model)):
        steered = backend.sweep(ids, SweepOptions(answer_ids=(answer,)))
    if backend.rank == 0:
        arrays = {f"{name}_{k}": v for name, s in (("sweep", stats), ("steered", steered))
                  for k, v in vars(s).items() if isinstance(v, (np.ndarray, int))}
        for b, s in enumerate(batch):
            arrays |= {f"batch{b}_{k}": v for k, v in vars(s).items()
                       if isinstance(v, (np.ndarray, int))}
        np.savez(out / f"{Path(model).name}.npz", final=final, **arrays)


if __name__ == "__main__":
    for folder in sys.argv[2:]:
        main(Path(sys.argv[1]), folder)
