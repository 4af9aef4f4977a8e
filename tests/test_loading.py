"""Resolving model arguments, and the real loading paths: GGUF files and hub ids."""
from pathlib import Path

import numpy as np
import pytest

from mlx_lens.core.lens import FINAL_NORM
from mlx_lens.loading.default_model import gguf_path
from mlx_lens.core.errors import LensError
from mlx_lens.loading.sources import resolve


def test_resolve_kinds(tiny_model_dirs, tmp_path):
    folder = resolve(str(tiny_model_dirs["llama"]))
    assert folder.name == "llama" and folder.path.is_dir() and not folder.is_gguf
    hub = resolve("mistralai/Mistral-7B-v0.1")
    assert hub.hub_id == "mistralai/Mistral-7B-v0.1" and hub.name == "Mistral-7B-v0.1"
    gguf = resolve(str(gguf_path()))
    assert gguf.is_gguf and gguf.name == "SmolLM2-135M-Instruct.Q4_1"
    (tmp_path / "weights.bin").write_bytes(b"")
    for bad, message in [("no-such-model", "model not found"), (str(tmp_path), "no config.json"),
                         (str(tmp_path / "weights.bin"), "not a .gguf file")]:
        with pytest.raises(LensError, match=message):
            resolve(bad)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_hub_id_without_a_hub_is_one_clear_error(backend):
    from mlx_lens import backend_choice

    with pytest.raises(LensError, match="mlx-lens-test/does-not-exist"):
        backend_choice.load(backend, resolve("mlx-lens-test/does-not-exist"))


def test_packaged_gguf_on_both_backends(smollm2_dir):
    """torch reads the GGUF itself (dequantised by transformers); MLX reads the cached fp32
    folder made from it. Both are fp32 from the same dequantised weights, so their final logits
    agree within the parity bound of two fp32 backends (docs/numerics.md §4), and so does their
    top-1 unless that bound allows a swap."""
    from mlx_lens import backend_choice
    from mlx_lens.core import bounds
    from mlx_lens.checks.parity import logit_bound

    source = resolve(str(gguf_path()))
    ids = None
    loaded, logits = {}, {}
    for name in ("torch", "mlx"):
        loaded[name] = b = backend_choice.load(name, source)
        ids = ids or b.tokenizer.encode("The capital of Germany is called")
        logits[name] = b.final_logits([ids])[0]
    reference = loaded["torch"]
    z = reference.layer_logits(ids, FINAL_NORM)
    bound = logit_bound(reference, ids, FINAL_NORM, z, reference.head_row_norms())[-1, -1]
    assert np.all(np.abs(logits["torch"] - logits["mlx"]) <= bound)
    top = logits["torch"].argmax()
    assert logits["mlx"].argmax() == top or bounds.may_swap(z[-1, -1], bound, np.array(top)).any()


def test_a_gguf_converts_quietly_once_per_content(tmp_path, monkeypatch):
    """Two copies of the packaged GGUF share one cached folder (keyed on the file's content, not
    its path); the first conversion, with stderr a pipe as in a log, shows no library progress
    bar (transformers' conversion and loading bars)."""
    import os
    import shutil
    import subprocess
    import sys

    from mlx_lens.loading import default_model

    cache = tmp_path / "cache"
    copies = [tmp_path / kind / default_model.GGUF_NAME for kind in ("a", "b")]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copyfile(gguf_path(), copy)
    code = ("import sys; from pathlib import Path; "
            "from mlx_lens.loading.default_model import gguf_folder; "
            "print(gguf_folder(Path(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, str(copies[0])], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MLX_LENS_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it/s" not in proc.stderr and "|" not in proc.stderr, proc.stderr[-2000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.parent == cache and (folder / "model.safetensors").is_file()

    def no_build(*_args):
        raise AssertionError("converted again")

    monkeypatch.setenv("MLX_LENS_CACHE", str(cache))
    monkeypatch.setattr(default_model, "_build", no_build)
    said = []
    assert default_model.gguf_folder(copies[1], progress=said.append) == folder and said == []


def _no_network(monkeypatch) -> list:
    """The hub unreachable (its probe refused), offline mode not yet on; the probes made."""
    from mlx_lens.loading import hub

    probes = []

    def refuse(address, timeout):
        probes.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # restored after the test
    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    return probes


def test_an_unreachable_hub_is_one_line_after_one_probe(tmp_path, capsys, monkeypatch):
    """No retries: one refused probe turns the hub client's offline mode on, and a model that is
    not in its cache is one line naming the cause."""
    import os

    from mlx_lens.cli.main import main

    probes = _no_network(monkeypatch)
    code = main(["run", "mlx-lens-test/not-cached", "--backend", "torch", "--out_dir",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and len(probes) == 1
    assert ("cannot fetch mlx-lens-test/not-cached: the model hub cannot be reached (no "
            "connection to") in err and "Network is unreachable) and the model is not in" in err
    assert os.environ["HF_HUB_OFFLINE"] == "1" and not (tmp_path / "out").exists()


def test_several_hub_models_probe_the_hub_once(tmp_path, capsys, monkeypatch):
    """--all offline: the run probes once and its children start in offline mode."""
    from mlx_lens.cli.main import main

    probes = _no_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "mlx-lens-test/one", "mlx-lens-test/two", "--no-probes"])
    out, err = capsys.readouterr()
    assert code == 1 and len(probes) == 1
    assert out.count("failed: cannot fetch mlx-lens-test/") == 4  # per model: its line, the table
    assert "model hub: no connection to " in out and "HF_HUB_OFFLINE is set" in out


def test_a_cached_hub_model_runs_without_the_hub(tiny_model_dirs, tmp_path, monkeypatch):
    """A hub id in the hub client's cache (its layout: models--org--name/snapshots/<rev>, refs)
    is read from there when the hub cannot be reached."""
    import shutil

    from huggingface_hub import constants

    from mlx_lens.cli.main import main

    _no_network(monkeypatch)
    cache = tmp_path / "hub"
    repo = cache / "models--mlx-lens-test--llama"
    revision = "0" * 40
    shutil.copytree(tiny_model_dirs["llama"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "out"
    assert main(["run", "mlx-lens-test/llama", "--backend", "torch", "--no-probes", "--no-plots",
                 "--out_dir", str(out)]) == 0
    assert (out / "output-llama.json").is_file()


def test_a_cache_folder_another_process_finished_meanwhile_stays(tmp_path, monkeypatch):
    """Two runs converting one GGUF at once: the one that finishes second keeps the first's
    folder (a reader may be using it) and throws its own away."""
    from mlx_lens.loading import default_model

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setenv("MLX_LENS_CACHE", str(tmp_path / "cache"))
    final = tmp_path / "cache" / f"m-{default_model.content_digest(gguf)[:12]}"
    stamp = f"sha256 {default_model.content_digest(gguf)}\n"

    def build(gguf_path, out):  # meanwhile, another process publishes a complete folder
        (out / "ours").write_text("ours")
        final.mkdir()
        (final / "theirs").write_text("theirs")
        (final / default_model._MARKER).write_text(stamp)

    monkeypatch.setattr(default_model, "_build", build)
    assert default_model.gguf_folder(gguf, progress=lambda line: None) == final
    assert sorted(p.name for p in final.iterdir()) == [default_model._MARKER, "theirs"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["gguf-digests.json", final.name]
