"""Tuned lens files (both layouts), the corpus, training, checkpoints and `mlx-lens tune` on tiny
models (torch; the MLX side and parity: parity_tests/test_tuned.py)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mlx_lens.core import bounds
from mlx_lens.tuned import corpus
from mlx_lens.tuned import lens_file
from mlx_lens.tuned import training
from mlx_lens.api import load
from mlx_lens.core.training import Recipe
from mlx_lens.core.errors import LensError
from mlx_lens.core.lens import Lens
from mlx_lens.loading.sources import resolve
from mlx_lens.tuned.lens_file import TunedLens
from mlx_lens.tuned.training import TuneOptions
from parity_tests.test_tuned import random_lens
from tests.lens_checks import PROMPT
from tests.test_cli import run_main
from tests.tiny_models import corpus_file
from torch_ref.backend import TorchBackend

OPTS = TuneOptions(steps=6, tokens_per_step=128, seq_len=32, checkpoint_every=2)


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return TorchBackend(resolve(str(tiny_model_dirs["llama_untied"])))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return corpus_file(tmp_path_factory.mktemp("corpus"))


def _theirs(folder, lens: TunedLens, backend, unembed_hash: str | None = None):
    """A lens in the tuned-lens package's layout, written as the package writes it: config.json
    and torch.save of a ModuleList of Linear(d, d) translators' state dict."""
    n, d = lens.weight.shape[:2]
    translators = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))
    with torch.no_grad():
        for t, a, b in zip(translators, lens.weight, lens.bias):
            t.weight.copy_(torch.from_numpy(a))
            t.bias.copy_(torch.from_numpy(b))
    folder.mkdir(parents=True)
    torch.save(translators.state_dict(), folder / "params.pt")
    w = backend.model.get_output_embeddings().weight.detach().float().numpy()
    config = {"base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": n,
              "bias": True, "base_model_revision": None, "lens_type": "linear_tuned_lens",
              "unembed_hash": unembed_hash or hashlib.sha256(
                  str.encode(np.array_str(w, precision=1))).hexdigest()}
    (folder / "config.json").write_text(json.dumps(config))
    return translators


def test_the_packages_layout_decodes_as_the_package_does(llama, tmp_path):
    """tuned-lens's TunedLens.forward is unembed(h + translator_i(h)), unembed = lm_head(final
    norm): here with the package's own modules (nn.Linear translators from params.pt, the
    model's norm and head) on transformers' hidden_states, against the lens's decode."""
    lens = random_lens(llama.info.n_layers, llama.info.d_model, seed=3)
    translators = _theirs(tmp_path / "theirs", lens, llama)
    read = lens_file.read(tmp_path / "theirs")
    assert np.array_equal(read.weight, lens.weight) and np.array_equal(read.bias, lens.bias)
    ids = llama.tokenizer.encode(PROMPT)
    got = llama.layer_logits(ids, Lens.tuned(read))
    out = llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    norm, head = llama.model.model.norm, llama.model.get_output_embeddings()
    h = llama.residuals(ids)
    x_norm = np.linalg.norm(llama.lens_inputs(ids, Lens.tuned(read)).astype(np.float64), axis=-1)
    # Two fp32 evaluations of translator, norm and head (bounds.translated_products at r = 0:
    # the residuals are the same ones), one norm each (half a dot product): docs/numerics.md §4.
    products = 2 * bounds.translated_products(h[:1].repeat(len(h), 0), lens.weight, lens.bias) + 1
    bound = (bounds.dot_bound(x_norm, llama.head_row_norms(), llama.info.d_model, products[..., None])
             + 2 * bounds.elementwise_bound(got, None))
    for i, hidden in enumerate(out.hidden_states[:-1]):
        with torch.no_grad():
            want = head(norm(hidden[0] + translators[i](hidden[0]))).numpy()
        assert np.all(np.abs(got[i] - want) <= bound[i]), i


def test_their_hash_is_the_packages(llama):
    w = llama.model.get_output_embeddings().weight.detach().float().numpy()
    want = hashlib.sha256(str.encode(np.array_str(w, precision=1))).hexdigest()
    assert lens_file.their_hash(llama.unembedding, llama.info.vocab, llama.info.d_model) == want


def test_our_layout_round_trips_whole_and_readable(llama, tmp_path):
    lens = random_lens(llama.info.n_layers, llama.info.d_model)
    lens = TunedLens(lens.weight, lens.bias, {"unembed_sha256": lens_file.unembedding_hash(
        llama.unembedding, llama.info.vocab)})
    saved = lens_file.save(lens, tmp_path / "ours")
    back = lens_file.read(saved.path)
    assert np.array_equal(back.weight, lens.weight) and np.array_equal(back.bias, lens.bias)
    assert back.name == f"tuned:{tmp_path / 'ours'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]  # no temporary left
    for path in (tmp_path / "ours", *(tmp_path / "ours").iterdir()):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path, oct(mode))  # readable by colleagues, like runs
    with pytest.raises(LensError, match="never overwritten"):
        lens_file.save(lens, tmp_path / "ours")


def test_a_lens_for_another_model_is_refused_in_one_line(llama, tmp_path, tiny_model_dirs,
                                                           capsys):
    n, d = llama.info.n_layers, llama.info.d_model
    cases = {"wide": TunedLens.identity(n, d + 32), "deep": TunedLens.identity(n + 1, d),
             "ours": TunedLens.identity(n, d, {"unembed_sha256": "0" * 64})}
    for name, lens in cases.items():
        lens_file.save(lens, tmp_path / name)
    _theirs(tmp_path / "theirs", TunedLens.identity(n, d), llama, unembed_hash="f" * 64)
    for name in (*cases, "theirs"):
        with pytest.raises(LensError, match="was made for"):
            load(str(tiny_model_dirs["llama_untied"]), "torch", f"tuned:{tmp_path / name}")
    code, out, err = run_main(["run", str(tiny_model_dirs["llama_untied"]), "--backend", "torch",
                               "--lens", f"tuned:{tmp_path / 'wide'}", "--out_dir",
                               str(tmp_path / "run")], tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "was made for a model with d_model 128" in err
    assert not (tmp_path / "run").exists()


def test_broken_lens_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LensError, match="config.json is missing"):
        lens_file.read(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(LensError, match="neither translators.safetensors nor params.pt"):
        lens_file.read(tmp_path / "empty")
    (tmp_path / "empty" / "translators.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LensError, match="unreadable tuned lens"):
        lens_file.read(tmp_path / "empty")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_params_pt_is_read_without_running_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil").mkdir()
    torch.save({"0.weight": _Payload()}, tmp_path / "evil" / "params.pt")
    (tmp_path / "evil" / "config.json").write_text(json.dumps({"d_model": 4, "num_hidden_layers": 1}))
    with pytest.raises(LensError, match="unreadable tuned lens .*params.pt"):
        lens_file.read(tmp_path / "evil")
    assert not (tmp_path / "PWNED").exists()


def test_the_corpus_is_split_deterministically(llama, text, tmp_path):
    a = corpus.load_corpus(str(text), llama.tokenizer, 32)
    b = corpus.load_corpus(str(text), llama.tokenizer, 32)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.held_out, b.held_out)
    whole = len(a.train) + len(a.held_out)
    assert len(a.held_out) == whole // corpus.HELD_OUT_EVERY
    lines = text.read_text().splitlines()
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(lines)))
    assert len(corpus.load_corpus(str(jsonl), llama.tokenizer, 32).train) > 0
    default = corpus.load_corpus(None, llama.tokenizer, 128)  # Python's own pydoc topics
    assert default.name == corpus.DEFAULT and len(default.held_out) >= 2


@pytest.mark.parametrize("content, message", [
    ("", "holds no text"),
    ("short text", "at least 20 are needed"),
    ('{"text": "a"}\n{"txt": "b"}\n', r"c.jsonl:2: not a JSON object with a \"text\" field"),
])
def test_bad_corpora_are_one_line_errors(llama, tmp_path, content, message):
    path = tmp_path / ("c.jsonl" if content.startswith("{") else "c.txt")
    path.write_text(content)
    with pytest.raises(LensError, match=message):
        corpus.load_corpus(str(path), llama.tokenizer, 32)
    with pytest.raises(LensError, match="corpus not found"):
        corpus.load_corpus(str(tmp_path / "missing.txt"), llama.tokenizer, 32)


def test_training_beats_the_logit_lens_on_held_out_text(llama, text, tmp_path):
    data = corpus.load_corpus(str(text), llama.tokenizer, OPTS.seq_len)
    lens = training.train(llama, data, TuneOptions(steps=20, tokens_per_step=256, seq_len=32),
                        tmp_path / "lens")
    frame = training.evaluate(llama, lens, data.held_out)
    inner = frame.iloc[:-1]
    assert (inner.kl_tuned_bits < inner.kl_logit_bits).all(), frame
    assert frame.kl_tuned_bits.iloc[-1] == frame.kl_logit_bits.iloc[-1] == 0
    assert lens.config["training"]["step"] == 20 and lens.config["d_model"] == llama.info.d_model


def test_untrained_translators_evaluate_as_the_logit_lens(llama, text):
    data = corpus.load_corpus(str(text), llama.tokenizer, 32)
    frame = training.evaluate(llama, TunedLens.identity(llama.info.n_layers, llama.info.d_model),
                            data.held_out)
    assert np.array_equal(frame.kl_tuned_bits, frame.kl_logit_bits)
    assert np.array_equal(frame.ce_tuned_bits, frame.ce_logit_bits)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(llama, text, tmp_path, monkeypatch):
    data = corpus.load_corpus(str(text), llama.tokenizer, OPTS.seq_len)
    whole = training.train(llama, data, OPTS, tmp_path / "whole")
    assert not training.checkpoint_path(tmp_path / "whole").exists()  # removed once done

    from torch_ref.tune import TorchTuner

    calls, real = [], TorchTuner.gradients

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 4:  # during step 4: steps 1-3 are whole
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(TorchTuner, "gradients", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(llama, data, OPTS, tmp_path / "resumed")
    ckpt = training.checkpoint_path(tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()  # no half-trained lens under the lens's name
    assert lens_file.read(ckpt).config["training"]["step"] == 3
    monkeypatch.setattr(TorchTuner, "gradients", real)
    resumed = training.train(llama, data, OPTS, tmp_path / "resumed")
    assert np.array_equal(resumed.weight, whole.weight) and np.array_equal(resumed.bias, whole.bias)
    assert not ckpt.exists()


def test_a_checkpoint_of_other_settings_is_refused(llama, text, tmp_path, monkeypatch):
    data = corpus.load_corpus(str(text), llama.tokenizer, OPTS.seq_len)
    from torch_ref.tune import TorchTuner

    def stop(self, batch):
        raise KeyboardInterrupt

    real = TorchTuner.gradients
    monkeypatch.setattr(TorchTuner, "gradients", stop)
    with pytest.raises(KeyboardInterrupt):
        training.train(llama, data, OPTS, tmp_path / "lens")
    monkeypatch.setattr(TorchTuner, "gradients", real)
    other = TuneOptions(steps=6, tokens_per_step=128, seq_len=32, recipe=Recipe(lr_scale=2.0))
    with pytest.raises(LensError, match="checkpoint of another training run"):
        training.train(llama, data, other, tmp_path / "lens")


def test_signals_wait_for_an_optimizer_step():
    got = []
    previous = signal.signal(signal.SIGINT, lambda *_: got.append("signal"))
    try:
        with training.deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            got.append("step done")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert got == ["step done", "signal"]


def test_tune_eval_and_run_from_the_command_line(tiny_model_dirs, text, tmp_path, capsys):
    model = str(tiny_model_dirs["llama_untied"])
    code, out, err = run_main(["tune", model, "--backend", "torch", "--corpus", str(text),
                               "--steps", "3", "--tokens-per-step", "64", "--seq-len", "32"],
                              tmp_path, capsys)
    assert code == 0, err
    lens_dir = tmp_path / "lenses" / "llama_untied"
    assert (lens_dir / "translators.safetensors").is_file()
    code, out, err = run_main(["tune", model, "--backend", "torch", "--corpus", str(text),
                               "--steps", "3", "--seq-len", "32"], tmp_path, capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    code, out, err = run_main(["tune", model, "--backend", "torch", "--eval", str(lens_dir)],
                              tmp_path, capsys)
    assert code == 0, err
    assert "kl_tuned_bits" in out and (lens_dir / "eval.csv").is_file()
    # its KL named by its direction, the reverse of a run's KL(layer || final) (#31 item 9)
    assert "bits per token: kl_* KL(model output || lens), ce_* the next token" in out
    assert (lens_dir / "eval.png").stat().st_size > 10_000
    code, out, err = run_main(["run", model, "--backend", "torch", "--no-probes", "--facts",
                               "default", "--lens", f"tuned:{lens_dir}", "--out_dir", "run"],
                              tmp_path, capsys)
    assert code == 0, err
    payload = json.loads((tmp_path / "run" / "output-llama_untied.json").read_text())
    assert payload["diagnostics"]["lens"] == f"tuned:{lens_dir}"
    for bad, message in ((f"tuned:{tmp_path / 'nothing'}", "config.json is missing"),
                         ("sideways", "unknown lens 'sideways'")):
        code, out, err = run_main(["run", model, "--backend", "torch", "--lens", bad,
                                   "--out_dir", "bad"], tmp_path, capsys)
        assert code == 2 and message in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--seq-len", "1"),
                                         ("--tokens-per-step", "-3")])
def test_bad_tune_settings_are_one_line_errors(tiny_model_dirs, flag, value, tmp_path, capsys):
    code, out, err = run_main(["tune", str(tiny_model_dirs["llama"]), flag, value], tmp_path, capsys)
    assert code == 2 and err.startswith("mlx-lens: error: --") and err.count("\n") == 1


def test_a_missing_corpus_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The arguments are checked first, as `run --facts` does: no model is loaded."""
    from mlx_lens.cli import main as cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    code, out, err = run_main(["tune", "--corpus", str(tmp_path / "missing.txt")], tmp_path, capsys)
    assert code == 2 and err == f"mlx-lens: error: corpus not found: {tmp_path / 'missing.txt'}\n"
    assert "backend:" not in out


@pytest.mark.parametrize("vocab, d", [(20, 8), (5000, 64)])  # printed whole / summarised
def test_their_hash_ignores_the_callers_print_options(vocab, d):
    """The package's formula, evaluated under numpy's defaults, on a small and a large head,
    while the caller's global print options (a notebook's) say otherwise."""
    w = np.random.default_rng(0).standard_normal((vocab, d)).astype(np.float32)
    with np.printoptions(**lens_file._NUMPY_PRINT_DEFAULTS):
        want = hashlib.sha256(str.encode(np.array_str(w, precision=1))).hexdigest()
    with np.printoptions(threshold=10**9, edgeitems=5, linewidth=200, precision=3):
        got = lens_file.their_hash(lambda a, b: w[a:b], vocab, d)
    assert got == want


def test_the_head_is_hashed_once_per_loaded_model(tiny_model_dirs):
    """Every tuner() and evaluate() checks the lens against the head; the hash that reads the
    whole fp32 head is computed once per loaded model, not per check."""
    from torch_ref.backend import TorchBackend

    backend = TorchBackend(resolve(str(tiny_model_dirs["llama"])))
    reads = []
    rows = backend.unembedding
    backend.unembedding = lambda start, stop: reads.append((start, stop)) or rows(start, stop)
    backend._head_hashes = lens_file.HeadHashes(backend.unembedding, backend.info.vocab,
                                                backend.info.d_model)
    info = backend.info
    lens = TunedLens.identity(info.n_layers, info.d_model,
                              {"unembed_sha256": lens_file.unembedding_hash(rows, info.vocab)})
    backend.tuner(lens, Recipe())
    first = len(reads)
    assert first > 0
    for _ in range(3):
        backend.tuner(lens, Recipe())
        backend.check_lens(Lens.tuned(TunedLens(lens.weight, lens.bias, lens.config)))
    assert len(reads) == first


def _broken_folders(root, llama):
    """name -> (a tuned lens folder broken so, the message naming it)."""
    n, d = llama.info.n_layers, llama.info.d_model
    out = {}
    lens = TunedLens.identity(n, d)
    nan = lens_file.save(TunedLens(lens.weight.copy(), lens.bias.copy()), root / "nan")
    weight = nan.weight.copy()
    weight[1, 0, 0] = np.nan
    lens_file.save(TunedLens(weight, nan.bias), root / "nan", replace=True)
    out["nan"] = (root / "nan", "the translators of rows 1 hold NaN or inf")
    bias = lens.bias.copy()
    bias[0, 3] = np.inf
    _theirs(root / "inf", TunedLens(lens.weight, bias), llama)
    out["inf"] = (root / "inf", "the translators of rows 0 hold NaN or inf")
    for name, layout in (("cut_ours", lens_file.OURS), ("cut_theirs", lens_file.THEIRS)):
        if layout == lens_file.OURS:
            lens_file.save(lens, root / name)
        else:
            _theirs(root / name, lens, llama)
        file = root / name / layout
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        out[name] = (root / name, f"unreadable tuned lens {file}")
    for name, config, message in (("list", [], "not a JSON object"),
                                  ("types", {"num_hidden_layers": "3", "d_model": d},
                                   "num_hidden_layers is str '3', not int"),
                                  ("hash", {"unembed_sha256": 7}, "unembed_sha256 is int 7")):
        lens_file.save(lens, root / name)
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = (root / name, message)
    return out


def test_broken_lens_folders_are_one_line_and_write_nothing(llama, tiny_model_dirs, tmp_path,
                                                           capsys):
    """NaN or inf translators (a training run on another corpus that diverged), a truncated
    translators file in either layout, a config.json of wrong types: one line naming the file
    and the problem, exit 2, no run folder."""
    for name, (folder, message) in _broken_folders(tmp_path / "lenses", llama).items():
        with pytest.raises(LensError, match=re.escape(message)):
            lens_file.read(folder)
        code, out, err = run_main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch",
                                   "--lens", f"tuned:{folder}", "--out_dir", str(tmp_path / "run")],
                                  tmp_path, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (name, err)
        assert not (tmp_path / "run").exists(), name


def test_a_second_tune_into_the_same_folder_is_refused_while_the_first_lives(
        llama, tiny_model_dirs, text, tmp_path, capsys):
    """One trains, the other refuses in one line and writes nothing; a lock left by a process
    that died is taken over."""
    import subprocess
    import sys

    out = tmp_path / "lens"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lens.lock").write_text(str(other.pid))  # as that process's tune holds it
        code, _, err = run_main(["tune", str(tiny_model_dirs["llama_untied"]), "--backend", "torch",
                                 "--corpus", str(text), "--steps", "1", "--out", str(out)],
                                tmp_path, capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"the lens folder {out} is in use by another process (pid {other.pid})" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.lock"]
    finally:
        other.kill()
        other.wait()
    data = corpus.load_corpus(str(text), llama.tokenizer, OPTS.seq_len)
    training.train(llama, data, OPTS, out)  # its holder is dead: the lock is taken over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]


KILLED_MID_CHECKPOINT = """
import os, sys
from pathlib import Path
import safetensors.numpy
from mlx_lens.loading.sources import resolve
from mlx_lens.tuned import corpus, training
from torch_ref.backend import TorchBackend
from tests.test_tuned import OPTS

backend = TorchBackend(resolve(sys.argv[1]))
data = corpus.load_corpus(sys.argv[2], backend.tokenizer, OPTS.seq_len)
real, writes = safetensors.numpy.save_file, []

def dies(tensors, path, *args, **kwargs):  # the second checkpoint (step 4): one file, then death
    writes.append(path)
    real(tensors, path, *args, **kwargs)
    if len(writes) == 3:
        os._exit(9)  # as SIGKILL: no cleanup of any kind runs

safetensors.numpy.save_file = dies
training.train(backend, data, OPTS, Path(sys.argv[3]))
"""


def test_a_tune_killed_while_writing_a_checkpoint_resumes_from_the_one_before(
        llama, tiny_model_dirs, text, tmp_path):
    """Killed in the middle of a checkpoint write: the lens folder does not exist, the previous
    checkpoint is intact, the next run resumes from it to the uninterrupted result and sweeps
    the dead process's half-written folder away."""
    import subprocess
    import sys

    data = corpus.load_corpus(str(text), llama.tokenizer, OPTS.seq_len)
    whole = training.train(llama, data, OPTS, tmp_path / "whole")
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_CHECKPOINT,
                           str(tiny_model_dirs["llama_untied"]), str(text), str(out)],
                          cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    ckpt = training.checkpoint_path(out)
    assert not out.exists() and lens_file.read(ckpt).config["training"]["step"] == 2
    assert any(p.name.startswith(f".{ckpt.name}.tmp-") for p in tmp_path.iterdir())
    resumed = training.train(llama, data, OPTS, out)
    assert np.array_equal(resumed.weight, whole.weight) and np.array_equal(resumed.bias, whole.bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "whole"]
