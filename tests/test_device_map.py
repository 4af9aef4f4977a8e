"""torch: a model placed by accelerate's device map (what --device auto does on GPUs that only
together hold a model), tested here by offloading blocks (and an untied head) to CPU and disk:
the lens reads each row where its block ran and decodes it on the head's device, and gives what
the same model in one piece gives, bit for bit (the same fp32 kernels on the same CPU, in the
same order: accelerate only moves the weights)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_lens.core.lens import Lens
from mlx_lens.core.contract import SweepOptions
from tests.lens_checks import LENSES
from mlx_lens.loading.placement import GIB, LENS_BYTES, Footprint, split_across
from mlx_lens.loading.sources import resolve
from tests.lens_checks import PROMPT
from tests.test_cli import run_main
from torch_ref.backend import TorchBackend, _attr


def offloading_map(backend: TorchBackend) -> dict[str, str]:
    """Block 0 and everything but the other blocks on the CPU, the other blocks on disk; an
    untied head on disk too (a tied one stays with the embeddings, as accelerate requires)."""
    parent, blocks = backend.layout.blocks.rsplit(".", 1)
    out = {}
    for name, _ in _attr(backend.model, parent).named_children():
        if name == blocks:
            out |= {f"{parent}.{name}.{i}": "cpu" if i == 0 else "disk"
                    for i in range(len(backend.blocks))}
        else:
            out[f"{parent}.{name}"] = "cpu"
    tied = backend.model.config.tie_word_embeddings
    for name, _ in backend.model.named_children():
        if name != parent.split(".")[0]:
            out[name] = "cpu" if tied else "disk"
    return out


@pytest.mark.parametrize("name", ["llama_untied", "gemma2", "gpt2"])
def test_an_offloaded_model_gives_the_whole_models_lens(tiny_model_dirs, name):
    source = resolve(str(tiny_model_dirs[name]))
    whole = TorchBackend(source)
    split = TorchBackend(source, device_map=offloading_map(whole))
    assert split.split and "disk" in split.run_diagnostics()["device_map"].values()
    assert any(p.device.type == "meta" for p in split.model.parameters())  # really offloaded
    ids = whole.tokenizer.encode(PROMPT)
    answer = whole.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    for lens in LENSES:
        assert np.array_equal(split.layer_logits(ids, lens), whole.layer_logits(ids, lens)), lens.name
        a, b = (be.sweep(ids, SweepOptions(lens=lens, answer_ids=(answer,))) for be in (split, whole))
        for key in ("entropy", "topk_ids", "topk_probs", "kl_to_final", "p_answer", "finite_residual"):
            assert np.array_equal(getattr(a, key), getattr(b, key)), (lens.name, key)
    prompts = [ids, whole.tokenizer.encode("Berlin is the capital of")]
    a, b = (be.sweep_next_token(prompts, [((answer,),), ((answer,),)], Lens("raw"))
            for be in (split, whole))
    assert all(np.array_equal(x.entropy, y.entropy) and np.array_equal(x.p_answer, y.p_answer)
               for x, y in zip(a, b))
    assert np.array_equal(split.final_logits(prompts), whole.final_logits(prompts))
    for ref in ("final", 1):
        assert np.array_equal(split.norm_spec(ref).scale, whole.norm_spec(ref).scale)
    assert np.array_equal(split.residuals(ids), whole.residuals(ids))


def test_the_device_map_is_recorded_and_bad_maps_are_one_line_errors(tiny_model_dirs, tmp_path,
                                                                     capsys):
    model = str(tiny_model_dirs["llama_untied"])
    device_map = offloading_map(TorchBackend(resolve(model)))
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    code, out, err = run_main(["run", model, "--backend", "torch", "--device-map", "map.json",
                               "--no-plots", "--out_dir", "out"], tmp_path, capsys)
    assert code == 0, err
    payload = json.loads((tmp_path / "out" / "output-llama_untied.json").read_text())
    assert payload["diagnostics"]["device_map"] == device_map
    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad, message in (("bad.json", "is not a JSON object"), ("none.json", "unreadable device map")):
        code, out, err = run_main(["run", model, "--backend", "torch", "--device-map", bad,
                                   "--out_dir", "bad"], tmp_path, capsys)
        assert code == 2 and message in err and err.count("\n") == 1
    code, out, err = run_main(["run", model, "--backend", "mlx", "--device-map", "map.json",
                               "--out_dir", "bad"], tmp_path, capsys)
    assert code == 2 and "for the torch backend" in err
    assert not (tmp_path / "bad").exists()


def test_gpus_that_only_together_hold_a_model_split_it():
    fp = Footprint(n_params=int(20e9), stored_bytes=int(40e9))  # 40 GB in fp16
    free = 30 * GIB
    assert split_across(fp, [("cuda:0", free)], "auto") is None  # one GPU: nothing to split
    dtype, room = split_across(fp, [("cuda:0", free), ("cuda:1", free)], "auto")
    assert dtype == "fp16" and room == {0: free - LENS_BYTES, 1: free - LENS_BYTES}
    assert split_across(fp, [("cuda:0", 10 * GIB), ("cuda:1", 10 * GIB)], "auto") is None


def test_auto_splits_over_gpus_before_falling_back_to_the_cpu(monkeypatch, tiny_model_dirs):
    """No GPU here: the placement decision alone, with the GPUs' free memory mocked."""
    from torch_ref import placement

    monkeypatch.setattr(placement, "candidates",
                        lambda device: [("cuda", 1 * GIB), ("cpu", 1000 * GIB)])
    monkeypatch.setattr(placement, "gpus", lambda: [("cuda:0", 4 * GIB), ("cuda:1", 4 * GIB)])
    monkeypatch.setattr(placement, "footprint",
                        lambda source: Footprint(n_params=int(1e9), stored_bytes=int(2e9)))
    source = resolve(str(tiny_model_dirs["llama"]))
    placed = placement.place(source, "fp16", "auto", "auto", None)
    assert placed.kwargs["device_map"] == "auto" and placed.dtype == "fp16"
    assert placed.kwargs["max_memory"] == {0: 4 * GIB - LENS_BYTES, 1: 4 * GIB - LENS_BYTES}
    monkeypatch.setattr(placement, "gpus", lambda: [("cuda:0", 3 * GIB), ("cuda:1", 3 * GIB)])
    placed = placement.place(source, "fp16", "auto", "auto", None)
    assert placed.kwargs == {} and placed.device == "cpu"  # too small together: the CPU


def test_a_map_that_leaves_modules_unplaced_is_one_short_line(tiny_model_dirs, tmp_path, capsys):
    """The first few unplaced tensors and their count, not every parameter of the model; checked
    on an empty (meta) model before anything loads, and nothing is written."""
    from mlx_lens.cli.main import main

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "cpu"}))
    code = main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch", "--device-map",
                 str(path), "--out_dir", str(tmp_path / "out"), "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and len(err) < 300
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs["llama"]))
    names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]]
    missing = [n for n in names if not n.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert f"places {len(missing)} of the model's {len(names)} tensors nowhere ({missing[0]}, " in err
    assert err.rstrip().endswith(', ...): name every module, or "" for the rest')
    assert not (tmp_path / "out").exists()
