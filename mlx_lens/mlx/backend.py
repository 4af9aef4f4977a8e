"""The MLX lens: the primary backend (Metal unified memory on Apple silicon; mlx's CUDA or CPU
builds elsewhere), on mlx-lm's model definitions.

Capture is hand-written: the embedding step and the block loop run here (masks as mlx-lm builds
them), so every block's output is kept without patching the model. Rows are normalised by fp32
copies of the model's own norm modules, decoded through an fp32 (dequantised, for quantised
checkpoints) unembedding in vocabulary chunks, with the model's head transform.
"""
from __future__ import annotations

import copy
import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.base import create_attention_mask

from mlx_lens.core import bounds, refusals
from mlx_lens.core.bounds import SUM_BLOCK
from mlx_lens.core.contract import (PAIR_TOP_K, TOP_K, LayerStats, LensPairs, LensSweep,
                                    ModelInfo, NormSpec, SweepOptions)
from mlx_lens.core.errors import LensError, one_line
from mlx_lens.core.lens import Lens, NormRef, Site, Translators
from mlx_lens.core.progress import progress
from mlx_lens.core.stats import (batch_stats, last_positions, lens_sweeps, prompt_stats,
                                 site_rows)
from mlx_lens.core.steering import Steerable
from mlx_lens.core.training import Recipe
from mlx_lens.loading.placement import available_ram, pick_device, footprint
from mlx_lens.loading.quiet import quiet_library_bars
from mlx_lens.loading.head_path import logit_scale, text_config
from mlx_lens.loading.sources import ModelSource, check_supported
from mlx_lens.mlx.arch import (HAND_LOOP, OVERRIDES, Overrides, config_fixes, first_array,
                               fix_modules, fix_weights,
                               read_layout, refuse_differing, softcap_of, windows_of)
from mlx_lens.mlx.jlens import jacobian_rows
from mlx_lens.mlx.patch import MlxPatcher, recording
from mlx_lens.mlx.reduce import lens_pairs, sweep_next_token, sweep_states
from mlx_lens.mlx.tune import MlxTuner, translate
from mlx_lens.tuned.lens_file import HeadHashes, check_matches

_DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}
# Bytes of fp32 logits one vocabulary chunk may take ([R, T, C]).
CHUNK_BYTES = 256 * 2**20
_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _fp32(module: nn.Module) -> nn.Module:
    """A copy of a norm module with fp32 parameters: its own semantics, fp32 statistics."""
    clone = copy.copy(module)
    clone.update(tree_map(lambda a: a.astype(mx.float32), module.parameters()))
    return clone


def candidates(device: str) -> list[tuple[str, int]]:
    """(device, free bytes) to try: the GPU (Metal's recommended working set, or the CUDA
    device's memory), then the CPU, for "auto"."""
    def free(d: str) -> int:
        if d == "gpu" and mx.metal.is_available():
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
        if d == "gpu":
            return int(mx.device_info().get("memory_size", available_ram()))
        return available_ram()

    if device not in ("auto", "gpu", "cpu"):
        raise LensError(f"device {device!r} is not an MLX device (auto, gpu, cpu)")
    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    if device == "gpu" and not gpu:
        raise LensError("device gpu requested but MLX has no GPU here")
    names = [device] if device != "auto" else ["gpu", "cpu"] if gpu else ["cpu"]
    return [(d, free(d)) for d in names]


def local_folder(source: ModelSource) -> Path:
    """A folder mlx-lm can read: the source itself, a hub snapshot, or a converted GGUF."""
    if source.is_gguf:
        from mlx_lens.loading.default_model import gguf_folder

        return gguf_folder(source.path)
    if source.path is not None:
        return source.path
    from mlx_lm.utils import _download

    try:
        return Path(_download(source.hub_id))
    except Exception as exc:
        raise LensError(f"cannot fetch {source.hub_id}: {one_line(exc)}") from exc


class MlxLens(Steerable):
    """The producing part (mlx_lens/core/contract.py's Backend): load, capture, decode, sweep.
    The pipeline over several processes (mlx_lens/mlx/pipeline.py) is one of these too."""

    _added: dict[int, mx.array] | None = None  # row -> [B, T, d] perturbation (a J-lens fit)

    def __init__(self, source: ModelSource, device: str = "auto", dtype: str = "auto",
                 lazy: bool = False):
        """lazy: weights stay on disk until first used (a pipeline rank evaluates only its own)."""
        import mlx_lm.utils as mlx_utils
        from transformers import AutoConfig, AutoTokenizer

        quiet_library_bars()
        path = local_folder(source)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise LensError(f"unreadable config.json in {path}: {exc}") from exc
        model_type = config.get("model_type")
        check_supported(model_type, "mlx")
        refuse_differing(model_type)
        self.overrides = OVERRIDES.get(model_type, Overrides())
        # the hand-written loop where it is verified; elsewhere the model's forward drives
        self.hand_loop = model_type in HAND_LOOP
        fp = footprint(ModelSource(source.name, path=path))
        free = candidates(device)
        device, dtype = pick_device(fp, free, "stored" if dtype == "auto" else dtype)
        # The chunk adapts to memory: at most 1/16 of what the device had free at load.
        self.chunk_bytes = min(CHUNK_BYTES, dict(free)[device] // 16)
        self.device = getattr(mx, device)
        mx.set_default_device(self.device)

        def classes(config):
            model_class, args_class = mlx_utils._get_classes(config)

            class Fixed(model_class):  # weights as transformers 5 writes them -> mlx-lm's names
                def sanitize(self, weights):
                    weights = fix_weights(model_type, weights)
                    return super().sanitize(weights) if hasattr(model_class, "sanitize") else weights

            return Fixed, args_class

        try:
            model, _ = mlx_utils.load_model(path, lazy=lazy, model_config=config_fixes(config),
                                            get_model_classes=classes)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            # the checkpoint's semantics (a multimodal checkpoint's text model)
            text = AutoConfig.from_pretrained(str(path)).get_text_config()
        except LensError:
            raise
        except Exception as exc:
            raise LensError(f"cannot load {path}: {one_line(exc)}") from exc
        if dtype != "stored":
            model.set_dtype(_DTYPES[dtype])
        fix_modules(model_type, model, config)
        self.model, self.path = model, path
        tied = getattr(getattr(model, "args", None), "tie_word_embeddings",
                       config.get("tie_word_embeddings", False))
        # a pipeline rank (lazy) reads block 0 alone: the whole model would not fit
        self.layout, probe = read_layout(model, text.vocab_size, tied, whole=not lazy)
        self.inner = _attr(model, self.layout.inner) if self.layout.inner else model
        self.blocks = _attr(self.inner, self.layout.blocks)
        # the lens's own loop builds masks from these; elsewhere the model's forward does
        self.windows = windows_of(text, len(self.blocks)) if self.hand_loop else None
        self.embed = _attr(self.inner, self.layout.embed)
        self.head = self.embed if self.layout.head is None else _attr(model, self.layout.head)
        self.final_norm = _fp32(_attr(self.inner, self.layout.final_norm))
        self.input_norms = self._norms(self.layout.input_norm)
        self.mlp_norms = self._norms(self.layout.mlp_norm)
        # a parallel block (gpt_neox, phi, cohere) reads its attention and MLP from its input
        self.parallel = [self.layout.parallel] * len(self.blocks)
        # Gemma-3n/4: blocks read per-layer inputs made from the tokens (not patchable)
        self.per_layer_inputs = bool(getattr(text, "hidden_size_per_layer_input", 0))
        self.softcap = softcap_of(text_config(config))
        # the model's logit scale, folded into the fp32 head (mlx_lens/loading/head_path.py)
        self.scale = logit_scale(config)
        self.hidden = text.hidden_size
        compute = (self.embed.scales if isinstance(self.embed, _QUANTIZED) else self.embed.weight).dtype
        self.info = ModelInfo(
            name=source.name, architecture=model_type, n_layers=len(self.blocks),
            d_model=self.hidden,
            n_heads=getattr(text, "num_attention_heads", None),
            vocab=self.head.weight.shape[0],
            n_ctx=getattr(text, "max_position_embeddings", None),
            backend="mlx", device=self.device.name, compute_dtype=_name(compute),
            unembed_dtype="float32",
            norm_types={"first_block": type(self.input_norms[0]).__name__
                         if self.input_norms else None,
                        "final": type(self.final_norm).__name__},
            softcap=self.softcap,
        )
        self._tuned: tuple[Translators, list] | None = None  # the last tuned lens, on the device
        self._head_hashes = HeadHashes(self.unembedding, self.info.vocab, self.info.d_model)
        self._head_norms: np.ndarray | None = None  # computed once per loaded model
        if probe is not None:
            self._check_head_path(*probe)

    def _check_head_path(self, state: mx.array, own: mx.array) -> None:
        """Refused by name where the lens's decode of the model's own last state is not the
        model's own output (a head transform the lens does not apply)."""
        x = self.final_norm(state.astype(mx.float32))
        why = bounds.head_path_refusal(
            self.info.architecture, np.array(self.head_logits(x, 0, self.info.vocab)),
            np.array(own.astype(mx.float32)), float(mx.linalg.norm(x)), self.head_row_norms(),
            self.info.d_model, self.softcap, self.info.compute_dtype)
        if why:
            raise LensError(why)

    def _steer(self, h: mx.array, row: int) -> mx.array:
        """h [B, T, d] with row's steering vector added (at its positions), and a J-lens fit's
        zero perturbation of the row, which its gradient is taken with respect to."""
        if self._added is not None and row in self._added:
            h = h + self._added[row]
        if self._steering is None or row not in self._steering.vectors:
            return h
        v = mx.array(self._steering.vectors[row]).astype(h.dtype)
        if self._steering.positions is None:
            return h + v
        at = np.zeros(h.shape[1], bool)
        at[[p for p in self._steering.positions if p < h.shape[1]]] = True
        return mx.where(mx.array(at)[None, :, None], h + v, h)

    def _norms(self, name: str | None) -> list[nn.Module] | None:
        """fp32 copies of each block's norm `name`; None where the blocks have none."""
        return None if name is None else [_fp32(getattr(b, name)) for b in self.blocks]

    # -- capture -----------------------------------------------------------------------------
    def capture(self, batch: Sequence[Sequence[int]], last: int = 0,
                mids: list | None = None) -> list[mx.array]:
        """Residual rows h_0..h_L of a batch of prompts (compute dtype, lazy): [B, T, d] each,
        or with last = n, [B * n, d] at each prompt's last n tokens (prompt-major). Prompts are
        right-padded, which needs no padding mask: a causal model's tokens never see the pads
        after them. Given a list `mids`, the middle of each block is appended to it, alike."""
        x, at = self._tokens(batch, last)
        keep = (lambda a: a[at]) if last else (lambda a: a)
        with self._middles(mids, keep):
            return [keep(h) for h in self._run(x)]

    def _run(self, x: mx.array, start: int = 0, h: mx.array | None = None,
             stop: int | None = None) -> list[mx.array]:
        """Rows start..stop (default: ..L) of the token batch x [B, T]: row `start` is h where
        given (the input of block `start`; x then only drives the model's own forward, see
        below), steered."""
        stop = len(self.blocks) if stop is None else stop
        if not self.hand_loop:
            return self._driven(x, start, h, stop)
        if h is None:
            h = self._steer(self._embed(x), 0)
        return [h, *self._blocks(h, range(start, stop))]

    def _driven(self, x: mx.array, start: int, h: mx.array | None, stop: int) -> list[mx.array]:
        """_run by the model's own forward (its masks, per-layer inputs and states; mlx-lm's
        semantics), each block's class swapped for one that steers its output, records it from
        block `start` on and, where h is given, replaces block `start`'s input with it; it stops
        after block stop - 1, before the head. Blocks before `start` are called (steered alike)
        for what later blocks read besides the residual (masks, a shared KV): mlx evaluates
        nothing no later block reads, so a pipeline rank never loads another's weights."""
        rows: list[mx.array] = []
        bases = {i: type(self.blocks[i]) for i in range(stop)}
        last, steer = stop - 1, self._steer

        def driving(i, base):
            class Driven(base):
                def __call__(self, *args, **kwargs):
                    if i == 0 or (i == start and h is not None):
                        at, given = first_array(args, kwargs)
                        row = h if i == start and h is not None else steer(given, 0)
                        if i == start:
                            rows.append(row)
                        if at == 0:
                            args = (row, *args[1:])
                        else:
                            kwargs = {**kwargs, at: row}
                    out = base.__call__(self, *args, **kwargs)
                    row = steer(out[0] if isinstance(out, tuple) else out, i + 1)
                    if i >= start:
                        rows.append(row)
                    if i == last:
                        raise _Done
                    return (row, *out[1:]) if isinstance(out, tuple) else row
            return Driven

        for i, base in bases.items():
            self.blocks[i].__class__ = driving(i, base)
        try:
            self.model(x)  # stopped before its head
        except _Done:
            pass
        finally:
            for i, base in bases.items():
                self.blocks[i].__class__ = base
        return rows

    @contextmanager
    def _middles(self, mids: list | None, keep):
        """Record the middle of each block as mlx-lm's block forms it: the input of the norm in
        front of its MLP (the residual after the attention sub-block, Gemma's post-attention norm
        included); for a parallel-residual block, its input plus its attention's output."""
        if mids is None:
            yield
            return
        if self.layout.mlp is None:
            raise refusals.no_middle(self.info.architecture)
        sinks = [[] for _ in self.blocks]
        with ExitStack() as stack:
            for block, sink, parallel in zip(self.blocks, sinks, self.parallel):
                if parallel:
                    stack.enter_context(recording(block, sink))
                    stack.enter_context(recording(getattr(block, self.layout.attention), sink,
                                                  True))
                else:  # what the MLP's norm reads (a post-norm block: the MLP itself)
                    stack.enter_context(recording(
                        getattr(block, self.layout.mlp_norm or self.layout.mlp), sink))
            yield
        mids.extend(keep(s[0] + s[1] if parallel else s[0])
                    for s, parallel in zip(sinks, self.parallel))

    def mid_kind(self) -> str:
        """How this model's blocks form their middle rows (recorded in the artifacts); "none"
        where they have no middle the lens can read (one sub-block: a state-space mixer)."""
        if self.layout.mlp is None:
            return "none"
        return "parallel" if all(self.parallel) else "sequential" if not any(self.parallel) \
            else "mixed"

    def _tokens(self, batch: Sequence[Sequence[int]],
                last: int = 1) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """The right-padded ids [B, T] and the (prompt, position) index of each prompt's last
        `last` tokens."""
        lengths = [len(ids) for ids in batch]
        n = max(lengths)
        x = mx.array([list(ids) + [0] * (n - len(ids)) for ids in batch])
        return x, tuple(mx.array(a) for a in last_positions(lengths, last))

    def _embed(self, x: mx.array) -> mx.array:
        """Row 0: the embeddings (with learned positions, and Gemma's sqrt(d) scale)."""
        h = self.embed(x)
        if self.layout.positions:
            h = h + getattr(self.inner, self.layout.positions)(mx.arange(x.shape[1]))
        if self.overrides.embed_scale:
            h = h * self.overrides.embed_scale(self.hidden).astype(h.dtype)
        return h

    def _blocks(self, h: mx.array, indices: range):
        """The residual after each block of `indices` (consecutive), starting from h."""
        for i in indices:
            mask = create_attention_mask(h, None, window_size=self.windows[i],
                                         return_array=self.overrides.array_mask)
            h = self._steer(self.blocks[i](h, mask, None), i + 1)
            yield h

    def _rows(self, ids: Sequence[int], site: Site = "resid") -> list[mx.array]:
        """Rows of one prompt at a site, [T, d] each (lazy): h_0..h_L, or the middle of each
        block followed by h_L."""
        mids: list | None = [] if site == "mid" else None
        rows = self.capture([ids], mids=mids)
        return [h[0] for h in (rows if mids is None else [*mids, rows[-1]])]

    # -- decode ------------------------------------------------------------------------------
    def _norm(self, ref: NormRef) -> nn.Module | None:
        return refusals.norm_of(ref, self.final_norm, self.input_norms, self.mlp_norms,
                                self.info.architecture)

    def _normed(self, rows: list[mx.array], lens: Lens, site: Site = "resid") -> mx.array:
        """[R, T, d] fp32: every row through the norm the lens assigns it (after its
        translator, for a tuned lens)."""
        out = []
        translators = [] if lens.translators is None else self._translators(lens.translators)
        for r, (h, ref) in enumerate(zip(rows, lens.norm_plan(len(self.blocks), site))):
            if h is None:  # a row another process holds (mlx_lens/mlx/pipeline.py)
                continue
            h = h.astype(mx.float32)
            if r < len(translators):
                h = translate(h, *translators[r])
            norm = self._norm(ref)
            out.append(norm(h) if norm is not None else h)
        x = mx.stack(out)
        mx.eval(x)
        return x

    def check_lens(self, lens: Lens) -> None:
        if lens.translators is not None:
            self._translators(lens.translators)
        for ref in lens.norm_plan(len(self.blocks)):
            self._norm(ref)

    def _translators(self, lens: Translators) -> list[tuple[mx.array, mx.array]]:
        """A tuned lens's (A_r, b_r) on the device, fp32; refused if made for another model."""
        if self._tuned is None or self._tuned[0] is not lens:
            check_matches(lens, self.info, self._head_hashes)
            self._tuned = lens, [(mx.array(a), mx.array(b)) for a, b in zip(lens.weight, lens.bias)]
        return self._tuned[1]

    def unembedding(self, start: int, stop: int) -> np.ndarray:
        return np.array(self._weight_rows(start, stop))

    def _weight_rows(self, start: int, stop: int) -> mx.array:
        m = self.head
        if isinstance(m, _QUANTIZED):
            biases = m.biases[start:stop] if "biases" in m else None
            w = mx.dequantize(m.weight[start:stop], m.scales[start:stop], biases,
                              group_size=m.group_size, bits=m.bits, mode=m.mode)
        else:
            w = m.weight[start:stop]
        # the product's rounding, u |x| |s w_i| per logit, is 1/d of one of the bounds' products
        return w.astype(mx.float32) * self.scale if self.scale != 1.0 else w.astype(mx.float32)

    def head_logits(self, x: mx.array, start: int, stop: int) -> mx.array:
        z = x @ self._weight_rows(start, stop).T
        if "bias" in self.head:
            z = z + self.head.bias[start:stop].astype(mx.float32) * self.scale
        if self.softcap:
            z = mx.tanh(z / self.softcap) * self.softcap
        return z

    def sweep(self, ids: Sequence[int], opts: SweepOptions) -> LayerStats:
        return self._sweep_rows(self._rows(opts.forward_ids(ids)), opts, opts.lens)

    def _sweep_rows(self, rows: list[mx.array], opts: SweepOptions, lens: Lens,
                    site: Site = "resid") -> LayerStats:
        x = self._normed(rows, lens, site)
        stats = prompt_stats(sweep_states(x, opts, self.head_logits, self.info.vocab,
                                          self._step(x.shape[0] * x.shape[1]), progress),
                             opts.n_scored)
        stats.finite_residual = np.array(mx.stack([mx.isfinite(h).all() for h in rows]))
        return stats

    def _step(self, n_states: int) -> int:
        """Vocabulary chunk for n_states decoded rows: at most chunk_bytes of fp32 logits,
        whole summation blocks wide."""
        return max(SUM_BLOCK, self.chunk_bytes // (4 * n_states) // SUM_BLOCK * SUM_BLOCK)

    def sweep_next_token(self, prompts: Sequence[Sequence[int]],
                         scored: Sequence[Sequence[tuple[int, ...]]], lens: Lens,
                         top_k: int = TOP_K) -> list[LayerStats]:
        rows = self.capture(prompts, last=len(scored[0]))  # R x [B * n, d]
        return self._next_token_rows(rows, scored, lens, top_k)

    def _next_token_rows(self, rows: list[mx.array], scored: Sequence[Sequence[tuple[int, ...]]],
                         lens: Lens, top_k: int, site: Site = "resid") -> list[LayerStats]:
        n, n_prompts = len(scored[0]), len(scored)
        x = self._normed(rows, lens, site).transpose(1, 0, 2)
        out = sweep_next_token(x, [ids for per in scored for ids in per], top_k,
                               self.head_logits, self.info.vocab,
                               self._step(x.shape[0] * x.shape[1]), progress)
        stats = batch_stats(out, n)
        finite = np.array(mx.stack([mx.isfinite(h).all(-1) for h in rows], -1))  # [B * n, R]
        for s, f in zip(stats, finite.reshape(n_prompts, n, -1).all(1)):
            s.finite_residual = f
        return stats

    def final_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        # The lens's own last row: the model's semantics (not mlx-lm's forward, see own_logits),
        # decoded in fp32 like every lens row.
        last = self.capture(prompts, last=1)[-1].astype(mx.float32)
        return np.array(self.head_logits(self.final_norm(last), 0, self.info.vocab))

    def head_row_norms(self) -> np.ndarray:
        if self._head_norms is None:
            step = 4096  # in slices: an fp32 copy of a whole (quantised) head can be GBs
            self._head_norms = np.concatenate([
                np.array(mx.sqrt((self._weight_rows(i, i + step) ** 2).sum(-1)))
                for i in range(0, self.info.vocab, step)]).astype(np.float64)
        return self._head_norms

    def run_diagnostics(self) -> dict:
        return {}

    def run_report(self) -> str | None:
        return None


class MlxBackend(MlxLens):
    """One process: results, the lens's intermediate values and training (InspectableBackend,
    TrainableBackend)."""

    def tuner(self, lens: Translators, recipe: Recipe) -> MlxTuner:
        check_matches(lens, self.info, self._head_hashes)
        return MlxTuner(self, lens, recipe)

    def jacobian_rows(self, ids: Sequence[int], directions: Sequence[int], skip: int) -> np.ndarray:
        x = mx.array([list(ids)] * len(directions))

        def last_row(added: dict[int, mx.array]) -> mx.array:
            self._added = added
            try:
                return self._run(x)[-1]
            finally:
                self._added = None

        return jacobian_rows(last_row, self._embed(x).dtype, x.shape, self.info, directions, skip)

    def record(self, batch: Sequence[Sequence[int]], noise: np.ndarray | None = None):
        if self.per_layer_inputs:
            raise refusals.per_layer_inputs(self.info.architecture)
        return MlxPatcher(self).record(batch, noise)

    def patched_logits(self, base, clean, kind: str, blocks: range,
                       restore: np.ndarray, n_scored: int) -> tuple[np.ndarray, np.ndarray]:
        return MlxPatcher(self).patched_logits(base, clean, kind, blocks, restore, n_scored)

    def sweep_lenses(self, ids: Sequence[int], opts: SweepOptions, lenses: Sequence[Lens],
                     mid: bool) -> LensSweep:
        mid = mid and self.layout.mlp is not None  # blocks of one sub-block have no middle
        mids: list | None = [] if mid else None
        rows = [h[0] for h in self.capture([opts.forward_ids(ids)], mids=mids)]
        mids = None if mids is None else [m[0] for m in mids]
        at = mx.array([len(ids) - 1])  # the next-token position
        return lens_sweeps(site_rows(rows, mids), lenses, 1, self.mid_kind() if mid else None,
                           lambda r, lens, site: [self._sweep_rows(r, opts, lens, site)],
                           lambda r, lens, site: self._normed([h[at] for h in r], lens, site),
                           self._pairs)[0]

    def sweep_next_token_lenses(self, prompts: Sequence[Sequence[int]],
                                scored: Sequence[Sequence[tuple[int, ...]]],
                                lenses: Sequence[Lens], mid: bool, top_k: int = TOP_K,
                                pairs: bool = True) -> list[LensSweep]:
        n = len(scored[0])
        mid = mid and self.layout.mlp is not None  # blocks of one sub-block have no middle
        mids: list | None = [] if mid else None
        rows = self.capture(prompts, last=n, mids=mids)  # R x [B * n, d]
        at = mx.arange(0, len(prompts) * n, n)  # each prompt's next-token row
        return lens_sweeps(
            site_rows(rows, mids), lenses, len(prompts), self.mid_kind() if mid else None,
            lambda r, lens, site: self._next_token_rows(r, scored, lens, top_k, site),
            lambda r, lens, site: self._normed([h[at] for h in r], lens, site),
            self._pairs if pairs else None)

    def _pairs(self, decoded: list[mx.array]) -> LensPairs:
        """Every pair of lenses at the same rows: one [R, B, d] per lens."""
        x = mx.stack(decoded)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return LensPairs(**lens_pairs(x, self.head_logits, self.info.vocab,
                                      self._step(x.shape[0] * x.shape[1]), PAIR_TOP_K))

    def own_logits(self, ids: Sequence[int]) -> mx.array:
        """The mlx-lm model's own forward pass, [T, V] (for tests: on Gemma-3 mlx-lm rounds
        sqrt(d) through bf16, docs/stack.md)."""
        return self.model(mx.array([list(ids)]))[0]

    def framework_logits(self, ids: Sequence[int]) -> np.ndarray:
        windows = [w for w in self.windows or [] if w is not None]
        if windows and len(ids) > min(windows):
            raise LensError(f"the prompt ({len(ids)} tokens) is longer than the model's "
                            f"{min(windows)}-token sliding window, and mlx-lm's forward is not "
                            f"the reference there (its gemma2, phi3 and mistral apply none; the "
                            f"lens's windows are tested against transformers)")
        return np.array(self.own_logits(ids)[-1].astype(mx.float32))

    def lens_inputs(self, ids: Sequence[int], lens: Lens, site: Site = "resid") -> np.ndarray:
        return np.array(self._normed(self._rows(ids, site), lens, site))

    def residuals(self, ids: Sequence[int], site: Site = "resid") -> np.ndarray:
        return np.array(mx.stack(self._rows(ids, site)).astype(mx.float32))

    def decode_rows(self, x: np.ndarray, ref: NormRef) -> np.ndarray:
        h = mx.array(np.asarray(x, np.float32))
        norm = self._norm(ref)
        return np.array(self.head_logits(norm(h) if norm is not None else h, 0, self.info.vocab))

    def norm_spec(self, ref: NormRef) -> NormSpec:
        # The model's own module (not the lens's fp32 copy), so a lens norm that drifted from
        # the model shows up in the self-test; its semantics (RMS or LayerNorm, w or 1 + w) are
        # read from what it computes (NormSpec.read), no longer declared per architecture.
        self._norm(ref)  # refused where the blocks have no such norm
        if ref == "final":
            norm = _attr(self.inner, self.layout.final_norm)
        elif isinstance(ref, tuple):
            norm = getattr(self.blocks[ref[1]], self.layout.mlp_norm)
        else:
            norm = getattr(self.blocks[ref], self.layout.input_norm)
        def as_numpy(name: str) -> np.ndarray | None:
            return np.array(norm[name], np.float64) if name in norm else None

        return NormSpec.read(lambda x: np.array(_fp32(norm)(mx.array(x))), as_numpy("weight"),
                             as_numpy("bias"), norm.eps, self.info.d_model)

    def generate(self, ids: Sequence[int], max_tokens: int) -> list[int]:
        """Greedy continuation with mlx-lm's generation loop (KV cache), without the prompt."""
        from mlx_lm.generate import generate_step

        out = []
        for token, _ in generate_step(mx.array(list(ids)), self.model, max_tokens=max_tokens):
            if int(token) == self.tokenizer.eos_token_id:
                break
            out.append(int(token))
        return out

    def layer_logits(self, ids: Sequence[int], lens: Lens, site: Site = "resid") -> np.ndarray:
        x = self._normed(self._rows(ids, site), lens, site)
        return np.array(self.head_logits(x, 0, self.info.vocab))


class _Done(Exception):
    """The last block has run: the rest of the model's forward is not needed."""


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")
