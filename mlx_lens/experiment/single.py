"""One model through the experiment: tokenise, sweep, metrics, probes -> the artifacts' content.

Backend-neutral: it sees a `Backend` and numpy arrays only.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from mlx_lens.experiment import health
from mlx_lens.experiment.frames import (TokenNames, pure_next_token_frame, records_frame,
                                       verbose_positions)
from mlx_lens.core.contract import Backend, InspectableBackend, SweepOptions, require
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.core.numerics import log_softmax64
from mlx_lens.core.errors import LensError
from mlx_lens.experiment.metrics import CollapseSettings, layer_summary, next_token_flags
from mlx_lens.experiment.probes import (ANSWER, PROMPT, TEMPERATURES, TEST_PROMPTS, TOP_K_RECORDS,
                             TOP_K_VERBOSE)


@dataclass(frozen=True)
class ExperimentOptions:
    prompt: str = PROMPT
    answer: str = ANSWER
    lens: Lens = FINAL_NORM
    collapse: CollapseSettings = field(default_factory=CollapseSettings)
    probes: bool = True  # extra test prompts and temperature exploration
    keep_residuals: bool = False

    def __post_init__(self):  # fail before any model is loaded
        if not self.prompt.strip():
            raise LensError("empty prompt: give some text to decode")
        if not self.answer.strip():
            raise LensError("empty answer: give the gold answer's text")


@dataclass
class ModelResult:
    payload: dict  # the JSON artifact
    records: pd.DataFrame
    pure: pd.DataFrame
    residuals: np.ndarray | None = None  # [R, T, d] with --keep-residuals
    prompt_ids: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went

    @property
    def summary(self) -> dict:
        """The headline numbers: final answer and its probability, L_copy, L_copy_H,
        L_semantic, delta_layers, the first layers by KL and answer rank."""
        d = self.payload["diagnostics"]
        top = final_answer(self.payload)
        keys = ("L_copy", "L_copy_H", "L_semantic", "delta_layers", "first_kl_below_0.5",
                "first_kl_below_1.0", "first_rank_le_1", "first_rank_le_5", "first_rank_le_10")
        return {"model": d["model"], "answer": top[0], "p": top[1],
                **{k: d[k] for k in keys if k in d}}

    def plot(self, colour: str = "entropy") -> dict:
        """matplotlib Figures: the logit-lens grid (cells coloured by `colour`: entropy or p1)
        and the next-token trajectory (mlx_lens/view/grid.py, trajectory.py)."""
        from mlx_lens.view.grid import grid  # matplotlib is imported only to draw
        from mlx_lens.view.trajectory import trajectory

        return {"grid": grid(self.records, self.payload, colour),
                "trajectory": trajectory(self.pure, self.payload)}


def final_answer(payload: dict) -> tuple[str | None, float]:
    """The final top-1 token and its probability (none when the numeric-health check blanked
    the model's output row)."""
    token, p = (payload["final_prediction"]["topk"] or [[None, math.nan]])[0]
    return token, p


def encode_prompt(tokenizer, prompt: str, n_ctx: int | None = None) -> list[int]:
    """Token ids of prompt; n_ctx is the model's context (None: no limit)."""
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise LensError(f"the prompt {prompt!r} encodes to no tokens")
    if n_ctx is not None and len(ids) > n_ctx:
        raise LensError(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                        f"{n_ctx} tokens")
    return ids


def answer_token_id(tokenizer, prompt_ids: list[int], prompt: str, answer: str) -> int:
    """The first token the model would have to emit to answer: tokenise prompt + ' answer' and
    take the token after the prompt (robust to SentencePiece's and BPE's space conventions)."""
    full = list(tokenizer.encode(f"{prompt} {answer}"))
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        token_id = full[len(prompt_ids)]
    else:
        token_id = (list(tokenizer.encode(f" {answer}", add_special_tokens=False)) or [None])[0]
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise LensError(f"the tokenizer cannot encode the answer {answer!r}")
    return int(token_id)


def distribution(logits: np.ndarray, k: int, names: TokenNames, temperature: float = 1.0) -> dict:
    """Entropy (bits) and top-k of softmax(logits / T), in float64."""
    logp = log_softmax64(logits.astype(np.float64) / temperature)
    p = np.exp(logp)
    top = np.argsort(-logp, kind="stable")[:k]
    return {"entropy": float(-(p * logp).sum() / np.log(2)), "topk": names.topk(top, p[top], k)}


def run_experiment(backend: Backend, opts: ExperimentOptions, extra_diagnostics: dict) -> ModelResult:
    tok, info = backend.tokenizer, backend.info
    ids = encode_prompt(tok, opts.prompt, info.n_ctx)
    # the probes too, so that one too long for the model fails before the sweep
    probes = {p: encode_prompt(tok, p, info.n_ctx) for p in TEST_PROMPTS} if opts.probes else {}
    answer_id = answer_token_id(tok, ids, opts.prompt, opts.answer)
    names = TokenNames(tok.decode)
    prompt_tokens = [names(i) for i in ids]
    wide = tuple(bool(w) for w in verbose_positions(prompt_tokens))
    started = time.perf_counter()
    stats = backend.sweep(ids, SweepOptions(lens=opts.lens, answer_id=answer_id, wide=wide,
                                            narrow_k=TOP_K_RECORDS, top_k=TOP_K_VERBOSE))
    seconds = {"sweep": time.perf_counter() - started}
    stats, numeric_health = health.checked(stats)
    flags = next_token_flags(stats, ids, answer_id, opts.collapse)

    final = {"entropy": float(stats.entropy[-1, -1]),
             "topk": names.topk(stats.topk_ids[-1, -1], stats.topk_probs[-1, -1], 20)}
    diagnostics = {
        "model": info.name, "architecture": info.architecture, "backend": info.backend,
        "device": info.device, "compute_dtype": info.compute_dtype,
        "unembed_dtype": info.unembed_dtype,
        "use_fp32_unembed": info.unembed_dtype == "float32",
        "lens": opts.lens.name, "norm_types": info.norm_types,
        **asdict(opts.collapse),
        "context_prompt": opts.prompt, "answer": opts.answer,
        "answer_token_id": answer_id, "answer_token": names(answer_id),
        "prompt_token_ids": ids,
        **layer_summary(stats, flags),
        # fixes the error bound of every reported statistic (docs/numerics.md §2)
        "summation_depth": stats.summation_depth,
        **numeric_health,
        **extra_diagnostics,
    }
    payload = {
        "diagnostics": diagnostics,
        "prompt": {"context_prompt": opts.prompt, "ground_truth": opts.answer},
        "final_prediction": final,
        "model_stats": {"num_layers": info.n_layers, "d_model": info.d_model,
                        "n_heads": info.n_heads, "d_vocab": info.vocab, "n_ctx": info.n_ctx,
                        "architecture": info.architecture},
    }
    if opts.probes:
        # One batched forward pass for the 14 probes and the main prompt (its logits serve every
        # temperature).
        started = time.perf_counter()
        *probe_logits, main_logits = backend.final_logits([*probes.values(), ids])
        payload["test_prompts"] = [{"prompt": p, **distribution(z, 10, names)}
                                   for p, z in zip(probes, probe_logits)]
        payload["temperature_exploration"] = [
            {"temperature": t, **distribution(main_logits, 15, names, t)} for t in TEMPERATURES]
        seconds["probes"] = time.perf_counter() - started
    residuals = (require(backend, InspectableBackend, "--keep-residuals").residuals(ids)
                 if opts.keep_residuals else None)
    return ModelResult(payload, records_frame(stats, prompt_tokens, names),
                       pure_next_token_frame(stats, flags, names), residuals, ids, seconds)
