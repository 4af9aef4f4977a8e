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
def large_vocab_dir(tmp_path_factory):
    """The tiny llama_untied body with a 151,936-token head (tests/tiny_models.py)."""
    return tiny_models.build_model("llama_untied", tmp_path_factory.mktemp("large") / "llama_152k",
                                   vocab_size=tiny_models.LARGE_VOCAB)


@pytest.fixture(scope="session")
def real_vocab_logits(large_vocab_dir, smollm2_dir):
    """fp32 lens logits [R, T, V] with realistic vocabularies, as fixed inputs for the
    reductions: the 151,936-token tiny model (final-norm and raw lens) and SmolLM2's real
    weights (49,152 tokens)."""
    from mlx_lens.core.lens import Lens
    from mlx_lens.loading.sources import resolve
    from tests.lens_checks import PROMPT
    from torch_ref.backend import TorchBackend

    out = []
    for folder, rules in ((large_vocab_dir, ("final-norm", "raw")), (smollm2_dir, ("final-norm",))):
        backend = TorchBackend(resolve(str(folder)))
        ids = backend.tokenizer.encode(PROMPT)
        out += [backend.layer_logits(ids, Lens(rule)) for rule in rules]
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """The packaged SmolLM2-135M, prepared in the per-user cache exactly as `mlx-lens run` does
    (built once, reused by later sessions and by the README's run command)."""
    from mlx_lens.loading import default_model

    return default_model.default_model_dir()
