"""The whole answer, teacher-forced: per-piece log-probabilities, ranks and leads against
computations that do not share the lens's capture (transformers' hidden states and head), the
prompt's rows with and without the appended answer, batched suites against single prompts, MLX
against torch, and the framework's own output against the lens's last row."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlx_lens.checks.parity import logit_bound
from mlx_lens.core import bounds
from mlx_lens.core.contract import SweepOptions
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.core.numerics import log_softmax64
from mlx_lens.experiment import single
from mlx_lens.experiment.facts import Fact
from mlx_lens.experiment.milestones import layer_or_never
from mlx_lens.experiment.suite import run_suite
from mlx_lens.loading.sources import resolve
from mlx_lens.mlx.backend import MlxBackend
from tests.lens_checks import LENSES, PROMPT, assert_stats_match_logits, backend_cache, gemm_bound
from tests.tiny_models import CONFIGS
from torch_ref.backend import TorchBackend

# Several pieces on the tiny tokenizer (and on SmolLM2's): a whole answer, not its first token.
ANSWER = "Berlin, Brandenburger Tor"
BACKENDS = {"torch": TorchBackend, "mlx": MlxBackend}


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    caches = {kind: backend_cache(cls, tiny_model_dirs) for kind, cls in BACKENDS.items()}
    return lambda kind, name: caches[kind](name)


def _pieces(backend, prompt=PROMPT, answer=ANSWER):
    ids = backend.tokenizer.encode(prompt)
    pieces = single.answer_token_ids(backend.tokenizer, ids, prompt, answer)
    assert len(pieces) >= 3, "the test needs a multi-token answer"
    return ids, pieces


def _hf_logits(backend, forward: list[int], lens: Lens, at: slice = slice(None)) -> np.ndarray:
    """[R, T', V] float64 from transformers' own hidden states (not the lens's hooks), each row
    through the norm its lens names and the model's own head; the last row is the model's own
    output logits. `at`: the positions kept (all by default)."""
    out = backend.model(input_ids=torch.tensor([forward]), output_hidden_states=True)
    hidden = out.hidden_states[:-1]  # the last one is already post-norm
    weight = backend.model.get_output_embeddings().weight
    rows = []
    for row, ref in enumerate(lens.norm_plan(len(hidden))[:-1]):
        h = hidden[row][0][at]
        x = (backend.final_norm(h) if ref == "final" else h if ref is None
             else backend.input_norms[ref](h))
        z = x @ weight.T
        if backend.softcap:
            z = torch.tanh(z / backend.softcap) * backend.softcap
        rows.append(z.detach().double().numpy())
    rows.append(out.logits[0][at].detach().double().numpy())
    return np.stack(rows)


def _expected(logits: np.ndarray, prompt_len: int, pieces: list[int]):
    """Per row and piece j at position prompt_len - 1 + j: log2 p, rank, lead (bits)."""
    pos = prompt_len - 1 + np.arange(len(pieces))
    z = logits[:, pos]  # [R, k, V]
    logp = log_softmax64(z) / np.log(2)
    a = np.asarray(pieces)[None, :, None]
    za = np.take_along_axis(z, a, -1)
    rank = (z > za).sum(-1) + 1
    others = z.copy()
    np.put_along_axis(others, np.broadcast_to(a, (*z.shape[:2], 1)), -np.inf, -1)
    lead = (za[..., 0] - others.max(-1)) / np.log(2)
    return np.take_along_axis(logp, a, -1)[..., 0], rank, lead, z


def _check_pieces(stats, logits, b, prompt_len, pieces):
    """The sweep's pieces against float64 statistics of `logits`, whose own logits may differ
    from the sweep's by at most b [R, T', V]: log p within the reductions' bound plus the shift
    (§2, §3), the rank exact but for tokens within the bounds of the piece (may_swap), the lead
    within the two logits' bounds (base-2 rounding inside elementwise_bound)."""
    want_logp, want_rank, want_lead, z = _expected(logits, prompt_len, pieces)
    pos = prompt_len - 1 + np.arange(len(pieces))
    bk = b[:, pos]
    red = bounds.reduction_bounds(z, stats.summation_depth)["logp"]
    a = np.asarray(pieces)[None, :, None]
    tol = np.take_along_axis(red + bk, a, -1)[..., 0] + bk.max(-1)
    assert np.all(np.abs(stats.piece_log2p - want_logp) <= bounds.nats_to_bits(tol))
    ties = bounds.may_swap(z, bk, np.broadcast_to(np.asarray(pieces), z.shape[:2])).sum(-1)
    assert np.all(np.abs(stats.piece_rank - want_rank) <= ties)
    assert np.all(np.abs(stats.piece_lead - want_lead) <= bounds.nats_to_bits(2 * bk.max(-1)))
    np.testing.assert_array_equal(stats.piece_rank[:, 0], stats.answer_rank)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_pieces_against_transformers_own_hidden_states(loaded, name):
    backend = loaded("torch", name)
    ids, pieces = _pieces(backend)
    forward = [*ids, *pieces[:-1]]
    for lens in LENSES:
        stats = backend.sweep(ids, SweepOptions(lens=lens, answer_ids=tuple(pieces)))
        assert stats.piece_log2p.shape == (backend.info.n_layers + 1, len(pieces))
        assert stats.entropy.shape[1] == len(ids)  # the prompt's positions only
        logits = _hf_logits(backend, forward, lens)
        # the sweep's GEMM and transformers' each within a product of exact (§1), and the norm
        b = gemm_bound(backend, forward, lens, logits, 3)
        _check_pieces(stats, logits, b, len(ids), pieces)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mlx_pieces_against_its_full_logits_and_torch(loaded, name):
    """MLX's pieces against float64 of its own full lens logits (layer_logits, itself held to
    mlx-lm's own rows in test_backends), and against torch's within the parity bound (§4)."""
    mlx, ref = loaded("mlx", name), loaded("torch", name)
    ids, pieces = _pieces(mlx)
    forward = [*ids, *pieces[:-1]]
    stats = mlx.sweep(ids, SweepOptions(answer_ids=tuple(pieces)))
    logits = mlx.layer_logits(forward, FINAL_NORM)
    _check_pieces(stats, logits, gemm_bound(mlx, forward, FINAL_NORM, logits, 2), len(ids),
                  pieces)
    torch_logits = ref.layer_logits(forward, FINAL_NORM)
    b = logit_bound(ref, forward, FINAL_NORM, torch_logits, ref.head_row_norms())
    _check_pieces(stats, torch_logits, b + gemm_bound(ref, forward, FINAL_NORM, torch_logits, 2),
                  len(ids), pieces)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_the_prompts_rows_do_not_move_with_the_appended_answer(loaded, kind, name):
    """Causal attention: the prompt's rows with the answer appended are its rows without, in
    exact arithmetic; the two forward passes are two fp32 computations of the same model, within
    the bound of §4 of each other, and so are the statistics (§2, §3). Where the kernels give
    the same bits, the artifacts' statistics are byte-identical: recorded, not required."""
    backend = loaded(kind, name)
    ids, pieces = _pieces(backend)
    alone = backend.layer_logits(ids, FINAL_NORM)
    forced = backend.layer_logits([*ids, *pieces[:-1]], FINAL_NORM)[:, :len(ids)]
    b = logit_bound(backend, ids, FINAL_NORM, alone, backend.head_row_norms())
    assert np.all(np.abs(forced.astype(np.float64) - alone) <= b)
    with_answer = backend.sweep(ids, SweepOptions(answer_ids=tuple(pieces)))
    first_only = backend.sweep(ids, SweepOptions(answer_ids=(pieces[0],)))
    gemms = gemm_bound(backend, ids, FINAL_NORM, alone, 2)
    assert_stats_match_logits(with_answer, alone, b + gemms, pieces[0])
    assert_stats_match_logits(first_only, alone, gemms, pieces[0])


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_single_piece_answer_is_the_first_piece(loaded, kind):
    """An answer of one token scores as p_answer always has: its log2 p is log2 p_answer."""
    backend = loaded(kind, "llama")
    ids = backend.tokenizer.encode(PROMPT)
    (piece,) = single.answer_token_ids(backend.tokenizer, ids, PROMPT, "Berlin")
    stats = backend.sweep(ids, SweepOptions(answer_ids=(piece,)))
    assert stats.piece_log2p.shape[1] == 1
    # one rounding each way between exp and log (p_answer is fp32 on the device)
    np.testing.assert_allclose(np.exp2(stats.piece_log2p[:, 0]), stats.p_answer, rtol=4e-7)


def test_surrounding_whitespace_is_not_part_of_the_answer(loaded):
    """`--answer " Berlin"` is the word Berlin, as a facts file's answer is: the pieces are the
    tokens after the prompt and one space, read off the tokenizer by hand, not a space piece
    followed by another token."""
    backend = loaded("torch", "llama")
    tok = backend.tokenizer
    ids = tok.encode(PROMPT)
    expected = tok.encode(PROMPT + " Berlin")[len(ids):]
    assert tok.decode(expected) == " Berlin"
    for answer in (" Berlin", "Berlin ", "\tBerlin\n"):
        assert single.answer_token_ids(tok, ids, PROMPT, answer) == expected
    run = single.run_experiment(backend, single.ExperimentOptions(PROMPT, " Berlin", probes=False),
                                {})
    assert run.payload["diagnostics"]["answer_token_ids"] == expected


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_batched_suite_is_its_single_prompts(loaded, kind):
    """Every fact's whole-answer log2 p per layer from the batched suite against the
    single-prompt run of the same prompt and answer: two fp32 computations of the same model
    (the batch pads and shapes differently), within the log p bound of §3 at the parity bound."""
    backend = loaded(kind, "llama")
    facts = [Fact("de", PROMPT, ANSWER),
             Fact("fr", "The capital of France is", "Paris, on the Seine",
                  control_prompt="The capital of Italy is", control_answer="Rome, by the Tiber"),
             Fact("short", "Berlin is", "the capital")]
    result = run_suite(backend, facts, batch=3)
    norms = backend.head_row_norms()
    for fact in facts:
        ids = backend.tokenizer.encode(fact.prompt)
        pieces = single.answer_token_ids(backend.tokenizer, ids, fact.prompt, fact.answer)
        alone = backend.sweep(ids, SweepOptions(answer_ids=tuple(pieces)))
        forward = [*ids, *pieces[:-1]]
        logits = backend.layer_logits(forward, FINAL_NORM)
        b = logit_bound(backend, forward, FINAL_NORM, logits, norms)
        pos = len(ids) - 1 + np.arange(len(pieces))
        # |d log p| <= b_piece + max b per piece (§3), both computations: twice, summed
        per_piece = 2 * (np.take_along_axis(b[:, pos], np.asarray(pieces)[None, :, None], -1)[..., 0]
                         + b[:, pos].max(-1))
        got = result.long.loc[result.long["fact_id"] == fact.id, "answer_log2p"].to_numpy()
        assert np.all(np.abs(got - alone.piece_log2p.sum(-1))
                      <= bounds.nats_to_bits(per_piece.sum(-1))), fact.id
    fr = result.per_fact.set_index("fact_id").loc["fr"]
    assert fr["answer_pieces"] >= 2 and not fr["control_shares_first_piece"]
    control = result.long.loc[result.long["fact_id"] == "fr", "control_log2p"]
    assert control.notna().all() and (control <= 0).all()
    assert result.long.loc[result.long["fact_id"] == "de", "control_log2p"].isna().all()


def test_the_framework_check_passes_and_bites(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    """The run's JSON records the lens's last row against transformers' own output, within the
    bound; a framework output moved by more than the bound warns in one line."""
    from mlx_lens.cli.main import main

    model = tiny_model_dirs["llama"]
    args = ["run", str(model), "--backend", "torch", "--no-probes", "--no-plots"]
    assert main([*args, "--out_dir", str(tmp_path / "a")]) == 0
    check = json.loads((tmp_path / "a" / f"output-{model.name}.json").read_text())[
        "diagnostics"]["framework_check"]
    assert check["available"] and check["within_bound"] and check["framework"] == "transformers"
    assert check["kl_bits"] <= check["kl_bound_bits"]
    capsys.readouterr()
    own = TorchBackend.framework_logits
    monkeypatch.setattr(TorchBackend, "framework_logits",
                        lambda self, ids: own(self, ids) + np.linspace(0, 1, self.info.vocab,
                                                                       dtype=np.float32))
    assert main([*args, "--out_dir", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "differ beyond their derived bound" in err and len(err.strip().splitlines()) == 1


def test_the_headline_names_the_rules(tiny_model_dirs, tmp_path, capsys):
    from mlx_lens.cli.main import main

    model = tiny_model_dirs["llama"]
    assert main(["run", str(model), "--backend", "torch", "--no-probes", "--no-plots",
                 "--answer", ANSWER, "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "whole answer 'Berlin, Brandenburger Tor'" in out.replace('" ', "'") or \
        "whole answer ' Berlin" in out
    assert "confirmed (every piece leads by > 0.72 bits at 2 layers in a row)" in out
    assert ("(layers decided within the fp32 decode's bound of this run's captured rows: "
            "another batch shape or backend can move a row by more)") in out
    d = json.loads((tmp_path / f"output-{model.name}.json").read_text())["diagnostics"]
    assert len(d["answer_token_ids"]) == len(d["answer_pieces"]) >= 3
    assert d["margin_bits"] == pytest.approx(0.5 / np.log(2))
    # the headline leads with copies from row 1; the original's rules come last, named so
    head = next(line for line in out.splitlines() if "final answer" in line)
    never = layer_or_never
    assert head.endswith(f"; L_copy_strict_k1={never(d['L_copy_strict_k1'])}, L_copy_soft_k1="
                         f"{never(d['L_copy_soft_k1'])}, L_semantic={never(d['L_semantic'])} "
                         f"of 3 layers")
    assert "L_copy=" not in head
    assert out.count("the original's rules (from row 0, a layer below 1 bit a copy): "
                     f"L_copy {never(d['L_copy'])}, L_copy_H {never(d['L_copy_H'])}, "
                     f"delta_layers {'none' if d['delta_layers'] is None else d['delta_layers']}"
                     ) == 1
    rules = d["milestone_rules"]
    assert all(rules[k].startswith("the original's rule") for k in ("L_copy", "L_copy_H",
                                                                      "delta_layers"))
    assert rules["L_copy_strict_k1"].startswith("from row 1")


def test_an_answer_past_the_context_is_one_line(loaded, tiny_model_dirs):
    """The prompt fits, the prompt with its teacher-forced answer does not: one line naming
    both lengths, before any sweep; in a suite, it names the fact's source line."""
    import dataclasses

    from mlx_lens.core.errors import LensError
    from mlx_lens.experiment.facts import encode_facts

    backend = loaded("torch", "llama")
    ids, pieces = _pieces(backend)
    info = backend.info
    backend.info = dataclasses.replace(info, n_ctx=len(ids))
    try:
        with pytest.raises(LensError) as caught:
            single.run_experiment(backend, single.ExperimentOptions(prompt=PROMPT, answer=ANSWER,
                                                                    probes=False), {})
    finally:
        backend.info = info
    message = str(caught.value)
    assert "\n" not in message and f"{len(ids) + len(pieces) - 1} tokens" in message
    assert f"context of {len(ids)} tokens" in message
    with pytest.raises(LensError, match=r"^facts.jsonl:3: the prompt and its teacher-forced"):
        encode_facts([Fact("de", PROMPT, ANSWER, source="facts.jsonl:3")], backend.tokenizer,
                     len(ids))


@pytest.mark.parametrize("folder", ["smollm2_dir", "large_vocab_dir"])
def test_real_vocabularies_pieces_against_transformers(request, folder):
    """Real sizes: SmolLM2's weights (49,152 tokens) and the tiny model with a Qwen2-sized head
    (151,936): the same check at the answer's positions only (the logits of every position
    would be R x T x V float64s)."""
    backend = TorchBackend(resolve(str(request.getfixturevalue(folder))))
    ids, pieces = _pieces(backend)
    forward = [*ids, *pieces[:-1]]
    at = slice(len(ids) - 1, len(forward))
    stats = backend.sweep(ids, SweepOptions(answer_ids=tuple(pieces)))
    logits = _hf_logits(backend, forward, FINAL_NORM, at)
    x_norm = np.linalg.norm(backend.lens_inputs(forward, FINAL_NORM)[:, at].astype(np.float64),
                            axis=-1)
    b = 3 * (bounds.dot_bound(x_norm, backend.head_row_norms(), backend.info.d_model, 1)
             + bounds.elementwise_bound(logits, backend.softcap))
    _check_pieces(stats, logits, b, 1, pieces)  # position 0 of the kept ones is the prompt's last
