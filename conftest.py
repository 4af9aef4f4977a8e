"""Fixtures shared by tests/ and parity_tests/: everything offline, on the CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here or in CI
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """name -> folder of a tiny random model (safetensors + locally trained tokenizer)."""
    return tiny_models.build_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The packaged SmolLM2-135M, prepared in the per-user cache exactly as `mlx-lens run` does
    (built once, reused by later sessions and by the README's run command)."""
    from mlx_lens import default_model

    return default_model.default_model_dir()
