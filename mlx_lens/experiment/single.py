"""One model through the experiment: tokenise, sweep, metrics, probes -> the artifacts' content.

Backend-neutral: it sees a `Backend` and numpy arrays only.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from mlx_lens.experiment import health, lenses
from mlx_lens.experiment.frames import (TokenNames, pure_next_token_frame, records_frame,
                                       verbose_positions)
from mlx_lens.core.contract import (Backend, ComparingBackend, InspectableBackend, SweepOptions,
                                    require)
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.core.numerics import log_softmax64, top_k
from mlx_lens.core.errors import LensError
from mlx_lens.core.steering import Steering
from mlx_lens.core import bounds
from mlx_lens.experiment.metrics import CollapseSettings, layer_summary, next_token_flags, rules
from mlx_lens.experiment.milestones import (LEADING_COPIES, AnswerRows, MilestoneSettings,
                                            answer_milestones, copy_flags, copy_milestones,
                                            copy_rules)
from mlx_lens.experiment.probes import (ANSWER, PROMPT, TEMPERATURES, TOP_K_RECORDS, TOP_K_VERBOSE,
                                       probe_prompts, verbose_words_for)


@dataclass(frozen=True)
class ExperimentOptions:
    prompt: str = PROMPT
    answer: str = ANSWER
    lens: Lens = FINAL_NORM
    collapse: CollapseSettings = field(default_factory=CollapseSettings)
    milestones: MilestoneSettings = field(default_factory=MilestoneSettings)
    probes: bool = True  # extra test prompts and temperature exploration
    # the final-layer test prompts; None: the original's with its own prompt, none with another
    test_prompts: tuple[str, ...] | None = None
    keep_residuals: bool = False
    # more lenses decoded from the same forward pass (the primary `lens` first, added if
    # missing), and with `mid` the middle of each block: mlx_lens/experiment/lenses.py
    lenses: tuple[Lens, ...] = ()
    mid: bool = True
    steering: Steering | None = None  # vectors added to the residual (mlx_lens/core/steering.py)

    @property
    def compared(self) -> tuple[Lens, ...]:
        """The lenses side by side, the primary first; () for a run of one lens."""
        if not self.lenses:
            return ()
        return (self.lens, *[lens for lens in self.lenses if lens.name != self.lens.name])

    def __post_init__(self):  # fail before any model is loaded
        if not self.prompt.strip():
            raise LensError("empty prompt: give some text to decode")
        if not self.answer.strip():
            raise LensError("empty answer: give the gold answer's text")
        if self.test_prompts is not None and not self.probes:
            raise LensError("test prompts given with the probes off (--no-probes)")
        if self.test_prompts is not None and not all(p.strip() for p in self.test_prompts):
            raise LensError("empty test prompt: give some text to decode")


@dataclass
class ModelResult:
    payload: dict  # the JSON artifact
    records: pd.DataFrame
    pure: pd.DataFrame
    residuals: np.ndarray | None = None  # [R, T, d] with --keep-residuals
    prompt_ids: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went
    # with several lenses (mlx_lens/experiment/lenses.py): per (lens, site, layer), per pair of
    # lenses, and the report grid's top tokens per cell
    lenses: pd.DataFrame | None = None
    lens_pairs: pd.DataFrame | None = None
    lens_cells: pd.DataFrame | None = None

    @property
    def summary(self) -> dict:
        """The headline numbers: final answer and its probability, the first copies from
        row 1, L_semantic, the first layers by KL and answer rank, the whole answer's
        milestones (a layer, "undecided" or None), then the original's L_copy, L_copy_H and
        delta_layers (from row 0: diagnostics["milestone_rules"])."""
        d = self.payload["diagnostics"]
        top = final_answer(self.payload)
        keys = (*LEADING_COPIES, "L_semantic", "first_kl_below_0.5",
                "first_kl_below_1.0", "first_rank_le_1", "first_rank_le_5", "first_rank_le_10",
                "L_answer_top1", "L_answer_confirmed", "L_semantic_confirmed", "L_copy",
                "L_copy_H", "delta_layers")
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


def encode_prompt_and_answer(tokenizer, prompt: str, answer: str,
                             n_ctx: int | None) -> tuple[list[int], list[int]]:
    """The prompt's ids and the answer's; the prompt with its teacher-forced answer (all but
    the last piece) must fit the context."""
    ids = encode_prompt(tokenizer, prompt, n_ctx)
    pieces = answer_token_ids(tokenizer, ids, prompt, answer)
    n_tokens = len(ids) + len(pieces) - 1
    if n_ctx is not None and n_tokens > n_ctx:
        raise LensError(f"the prompt and its teacher-forced answer are {n_tokens} tokens, longer "
                        f"than the model's context of {n_ctx} tokens")
    return ids, pieces


def subject_span(tokenizer, ids: list[int], subject: str) -> tuple[int, int]:
    """The tokens [start, stop) of ids that hold the subject's first occurrence in their decoded
    text: every token with a character of it (ROME's find_token_range; each token's text is what
    it adds to the decoded prefix, so that a character split over tokens is not lost)."""
    text = tokenizer.decode(ids)
    at = text.find(subject)
    if not subject or at < 0:
        raise LensError(f"the subject {subject!r} is not in the prompt")
    ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    start = next(i for i, end in enumerate(ends) if end > at)
    stop = next((i for i, end in enumerate(ends) if end >= at + len(subject)), len(ids) - 1)
    return start, stop + 1


def answer_token_ids(tokenizer, prompt_ids: list[int], prompt: str, answer: str) -> list[int]:
    """The tokens the model would have to emit to answer: tokenise prompt + ' answer' and take
    the tokens after the prompt (robust to SentencePiece's and BPE's space conventions); where
    the prompt's tokens do not survive the join, ' answer' on its own. Special tokens a
    tokenizer appends (an end-of-sequence) are not part of the answer. The answer is a word:
    whitespace around it (`--answer " Berlin"`) would score a space piece, then another token."""
    answer = answer.strip()
    full = list(tokenizer.encode(f"{prompt} {answer}"))
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        pieces = full[len(prompt_ids):]
    else:
        pieces = list(tokenizer.encode(f" {answer}", add_special_tokens=False))
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    pieces = [int(i) for i in pieces if i not in special or i == unk]
    if not pieces or unk in pieces:
        raise LensError(f"the tokenizer cannot encode the answer {answer!r}")
    return pieces


def answer_token_id(tokenizer, prompt_ids: list[int], prompt: str, answer: str) -> int:
    """The answer's first token: the original's answer_token_id."""
    return answer_token_ids(tokenizer, prompt_ids, prompt, answer)[0]


def distribution(logits: np.ndarray, k: int, names: TokenNames, temperature: float = 1.0) -> dict:
    """Entropy (bits) and top-k of softmax(logits / T), in float64."""
    logp = log_softmax64(logits.astype(np.float64) / temperature)
    p = np.exp(logp)
    top = top_k(logp, k)
    return {"entropy": float(-(p * logp).sum() / np.log(2)), "topk": names.topk(top, p[top], k)}


def length_batches(lengths: list[int]) -> list[list[int]]:
    """The prompts of these lengths (their indices) in right-padded batches: sorted by length
    and cut where it saves padded tokens, at the price of one more forward pass costed as the
    longest prompt's tokens (an optimal cut, by dynamic programming over the sorted lengths).
    The 14 probes and the prompt on SmolLM2's tokenizer (5 to 18 tokens): 2 batches of 189
    tokens rather than one of 270."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, call = len(order), max(lengths, default=0)
    # best[j]: least cost of the first j prompts; cut[j]: where their last batch starts
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + call
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j:
        batches.insert(0, order[cut[j]:j])
        j = cut[j]
    return batches


def final_logits(backend: Backend, prompts: list[list[int]]) -> list[np.ndarray]:
    """Each prompt's last-row logits (the probes'), in batches of similar length: a causal
    model's rows do not depend on the pads after them, so what changes is the padding's cost
    (and the rounding, as another batch shape may round differently)."""
    out: list[np.ndarray | None] = [None] * len(prompts)
    for batch in length_batches([len(p) for p in prompts]):
        for i, z in zip(batch, backend.final_logits([prompts[i] for i in batch])):
            out[i] = z
    return out


def framework_check(backend: Backend, ids: list[int], lens_last: np.ndarray,
                    x_norm: float, w_norms: np.ndarray) -> dict:
    """The lens's last row against the framework's own output logits (mlx-lm's or
    transformers' forward, not the lens code): KL in bits and the largest |delta log p|, with
    their derived bounds (docs/numerics.md §4, reduced precision; Hoeffding for KL, §3)."""
    if not isinstance(backend, InspectableBackend):
        return {"available": False, "why": "the framework's forward needs the whole model in "
                                           "one process"}
    if not np.isfinite(x_norm):
        return {"available": False, "why": "the model's output row is not finite"}
    info = backend.info
    try:
        own = backend.framework_logits(ids)
    except LensError as exc:  # the framework's forward cannot compute the model's semantics
        return {"available": False, "why": str(exc)}
    b = float(bounds.framework_logit_bound(x_norm, w_norms, info.d_model, own, info.softcap,
                                           info.compute_dtype).max())
    lens_logp, own_logp = log_softmax64(lens_last), log_softmax64(own)
    kl = float((np.exp(lens_logp) * (lens_logp - own_logp)).sum() / np.log(2))
    delta = float(np.abs(lens_logp - own_logp).max())
    kl_bound, delta_bound = bounds.nats_to_bits(b * b / 2), 2 * b
    return {"available": True, "framework": "mlx-lm" if info.backend == "mlx" else "transformers",
            "kl_bits": kl, "kl_bound_bits": kl_bound, "max_abs_delta_logp": delta,
            "delta_logp_bound": delta_bound,
            "within_bound": bool(kl <= kl_bound and delta <= delta_bound)}


def framework_warning(check: dict) -> str | None:
    """One line for the console where the lens's last row and the framework's output differ
    beyond their derived bound."""
    if not check.get("available") or check["within_bound"]:
        return None
    return (f"the lens's last row and {check['framework']}'s own output differ beyond their "
            f"derived bound: KL(lens || {check['framework']}) {check['kl_bits']:.3g} bits "
            f"(bound {check['kl_bound_bits']:.3g}), "
            f"max |delta log p| {check['max_abs_delta_logp']:.3g} "
            f"(bound {check['delta_logp_bound']:.3g}); see docs/numerics.md §4")


def run_experiment(backend: Backend, opts: ExperimentOptions, extra_diagnostics: dict) -> ModelResult:
    """The experiment on one prompt; with opts.steering, every forward pass of it steered."""
    if opts.steering is None:
        return _experiment(backend, opts, extra_diagnostics)
    if not hasattr(backend, "steered"):
        raise LensError("steering needs the whole model in one process")
    with backend.steered(opts.steering):
        return _experiment(backend, opts, {**extra_diagnostics,
                                           "steering": opts.steering.describe()})


def _experiment(backend: Backend, opts: ExperimentOptions, extra_diagnostics: dict) -> ModelResult:
    tok, info = backend.tokenizer, backend.info
    ids, pieces = encode_prompt_and_answer(tok, opts.prompt, opts.answer, info.n_ctx)
    # the probes too, so that one too long for the model fails before the sweep
    test_prompts, test_prompts_source = probe_prompts(opts.prompt, opts.test_prompts)
    probes = ({p: encode_prompt(tok, p, info.n_ctx) for p in test_prompts} if opts.probes
              else {})
    answer_id = pieces[0]
    names = TokenNames(tok.decode)
    prompt_tokens = [names(i) for i in ids]
    verbose_words = verbose_words_for(opts.prompt)
    verbose = verbose_positions(prompt_tokens, verbose_words)
    wide = tuple(bool(w) for w in verbose)
    started = time.perf_counter()
    sweep_opts = SweepOptions(lens=opts.lens, answer_ids=tuple(pieces), wide=wide,
                              narrow_k=TOP_K_RECORDS, top_k=TOP_K_VERBOSE)
    compared = None
    if opts.compared:
        comparing = require(backend, ComparingBackend, "--lenses")
        compared = comparing.sweep_lenses(ids, sweep_opts, opts.compared, opts.mid)
        stats = compared.stats[opts.lens.name, "resid"]
    else:
        stats = backend.sweep(ids, sweep_opts)
    seconds = {"sweep": time.perf_counter() - started}
    stats, numeric_health = health.checked(stats)
    if compared is not None:  # every lens's tables blank its non-finite rows alike
        compared.stats = {key: health.checked(s)[0] for key, s in compared.stats.items()}
        compared.stats[opts.lens.name, "resid"] = stats
    flags = next_token_flags(stats, ids, answer_id, opts.collapse)
    w_norms = backend.head_row_norms()
    answer = AnswerRows.of(stats, info, float(w_norms.max()))
    summary = layer_summary(stats, flags)
    copies = copy_flags(stats, ids, names, opts.milestones)

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
        "answer_token_ids": pieces, "answer_pieces": [names(i) for i in pieces],
        "prompt_token_ids": ids, "verbose_words": list(verbose_words),
        **summary,
        **answer_milestones(answer, summary["L_semantic"], opts.milestones),
        **asdict(opts.milestones),
        **copy_milestones(stats, ids, copies),
        "milestone_rules": {**rules(opts.collapse), **copy_rules(opts.milestones)},
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
        # The test prompts and the main prompt in forward passes of similar lengths (the main
        # prompt's logits serve every temperature).
        started = time.perf_counter()
        *probe_logits, main_logits = final_logits(backend, [*probes.values(), ids])
        payload["test_prompts"] = [{"prompt": p, **distribution(z, 10, names)}
                                   for p, z in zip(probes, probe_logits)]
        diagnostics["test_prompts_source"] = test_prompts_source
        payload["temperature_exploration"] = [
            {"temperature": t, **distribution(main_logits, 15, names, t)} for t in TEMPERATURES]
        seconds["probes"] = time.perf_counter() - started
    else:
        main_logits = None
    started = time.perf_counter()
    if isinstance(backend, InspectableBackend) and main_logits is None:
        main_logits = backend.final_logits([ids])[0]
    diagnostics["framework_check"] = (
        framework_check(backend, ids, main_logits, stats.piece_x_norm[-1, 0], w_norms)
        if opts.steering is None else
        {"available": False, "why": "a steered run: the framework's own forward is not steered"})
    seconds["framework_check"] = time.perf_counter() - started
    residuals = (require(backend, InspectableBackend, "--keep-residuals").residuals(ids)
                 if opts.keep_residuals else None)
    pure = pure_next_token_frame(stats, flags, names, {**answer.columns(), **copies})
    result = ModelResult(payload, records_frame(stats, prompt_tokens, names, verbose), pure, residuals,
                         ids, seconds)
    if compared is not None:
        payload["lenses"] = lenses.findings(compared, info, float(w_norms.max()), opts.milestones,
                                            opts.lens.name)
        result.lenses = lenses.lens_frame(compared, info, names, float(w_norms.max()))
        result.lens_pairs = lenses.pair_frame(compared)
        result.lens_cells = lenses.cells_frame(compared, names, prompt_tokens)
    return result
