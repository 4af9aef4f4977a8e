"""The PyTorch/transformers lens: the reference backend, for CUDA, MPS and CPU hosts.

Residuals are captured with forward hooks on the model's own decoder blocks (the input of block 0
is the embedding row, so learned positions and Gemma's sqrt(d) scale are included); each row is
normalised by an fp32 copy of the model's own norm module (its exact semantics: LayerNorm bias,
Gemma's 1+w), decoded through an fp32 unembedding and the model's head transform.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mlx_lens.core import bounds, refusals
from mlx_lens.core.contract import (PAIR_TOP_K, TOP_K, LayerStats, LensPairs, LensSweep,
                                    ModelInfo, NormSpec, SweepOptions)
from mlx_lens.core.errors import LensError, one_line
from mlx_lens.core.lens import Lens, NormRef, Site, Translators
from mlx_lens.core.progress import progress
from mlx_lens.core.stats import (batch_stats, last_positions, lens_sweeps, prompt_stats,
                                 site_rows)
from mlx_lens.core.steering import Steerable
from mlx_lens.core.training import Recipe
from mlx_lens.loading.head_path import logit_scale
from mlx_lens.loading.quiet import quiet_gguf_conversion, quiet_library_bars
from mlx_lens.loading.sources import ModelSource, check_supported, local_model_type
from mlx_lens.tuned.lens_file import HeadHashes, check_matches
from torch_ref.arch import read_layout
from torch_ref.placement import DTYPES, checkpoint_dtype, execution_device, owned, place
from torch_ref.reduce import LOG2E, lens_pairs, sweep_next_token, sweep_states
from torch_ref.patch import Recorded, TorchPatcher
from torch_ref.jlens import jacobian_rows
from torch_ref.tune import TorchTuner, translate



def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def refuse_mlx_quantized(folder) -> None:
    """A folder mlx-lm's converter quantised (its config's `quantization`, which transformers
    does not read) is refused by name: parity needs the unquantised checkpoint on the torch
    side, and the MLX run's framework check holds a quantised lens to mlx-lm's own forward."""
    import json

    config = json.loads((folder / "config.json").read_text())
    q = config.get("quantization")
    # mlx-lm writes it twice, as quantization and as a quantization_config that names no
    # quant_method (which every transformers quantiser writes)
    if isinstance(q, dict) and "quant_method" not in (config.get("quantization_config") or {}):
        raise LensError(f"{folder.name} is an mlx-lm quantised folder ({q.get('bits')}-bit "
                        f"{q.get('mode', 'affine')}), which transformers cannot read: run it with "
                        f"--backend mlx; parity compares the backends on the unquantised "
                        f"checkpoint")


def _model_class(config):
    """transformers' causal LM of the type, or its image-text-to-text model (whose text model
    the lens reads, on text prompts)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto

    if config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


class TorchBackend(Steerable):
    def __init__(self, source: ModelSource, device: str = "auto", dtype: str = "auto",
                 device_map: dict | None = None):
        """device_map (module -> device, "disk" allowed): accelerate places the model so; without
        one, --device auto splits a model over the GPUs when only they together hold it."""
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # our own console lines only; errors still raise
        quiet_library_bars()

        if source.path is not None and not source.is_gguf:  # refuse early, before loading
            check_supported(local_model_type(source), "torch")
            refuse_mlx_quantized(source.path)
        kw = {"gguf_file": source.path.name} if source.is_gguf else {}
        try:
            config = AutoConfig.from_pretrained(source.location, **kw)
            check_supported(config.model_type, "torch")
            placed = place(source, checkpoint_dtype(config), device, dtype, device_map,
                           config)
            self.device, self._offload, dtype = placed.device, placed.offload, placed.dtype
            self.dtype = DTYPES[dtype]
            with quiet_gguf_conversion():  # a GGUF is dequantised as it loads
                self.tokenizer = AutoTokenizer.from_pretrained(source.location, **kw)
                model = _model_class(config).from_pretrained(source.location, dtype=self.dtype,
                                                             **kw, **placed.kwargs)
        except LensError:
            raise
        except Exception as exc:  # a broken or missing file: name the model and the cause
            raise LensError(f"cannot load {source.location}: {one_line(exc)}") from exc
        self.split = bool(placed.kwargs)
        if self.split:  # accelerate placed it: the lens decodes on the head's device
            head = model.get_output_embeddings()
            self.device = str(execution_device(head))
            self.input_device = execution_device(model.get_input_embeddings())
            self.head = head if head.weight.device.type != "meta" else owned(head, self.device, False)
        else:
            model = model.to(self.device)
            self.input_device, self.head = torch.device(self.device), model.get_output_embeddings()
        self.model = model.eval()
        text = config.get_text_config()  # a multimodal checkpoint's text model
        self.layout, probe = read_layout(model, text.num_hidden_layers)
        self.blocks = _attr(model, self.layout.blocks)
        # fp32 copies of the norms: statistics in fp32 with the model's own semantics.
        self.final_norm = owned(_attr(model, self.layout.final_norm), self.device)
        self.input_norms = self._norms(self.layout.input_norm)
        self.mlp_norms = self._norms(self.layout.mlp_norm)
        # a parallel block (gpt_neox, phi, cohere) reads its attention and MLP from its input
        self.parallel = [self.layout.parallel] * len(self.blocks)
        # Gemma-3n/4: blocks read per-layer inputs made from the tokens (not patchable)
        self.per_layer_inputs = bool(getattr(text, "hidden_size_per_layer_input", 0))
        self.softcap = (getattr(text, "final_logit_softcapping", None)
                        or getattr(text, "logits_soft_cap", None))  # recurrent_gemma's name
        # the model's logit scale, folded into the fp32 head (mlx_lens/loading/head_path.py)
        self.scale = logit_scale(config.to_dict())
        self.info = ModelInfo(
            name=source.name, architecture=config.model_type, n_layers=len(self.blocks),
            d_model=text.hidden_size, n_heads=getattr(text, "num_attention_heads", None),
            vocab=self.head.weight.shape[0], n_ctx=getattr(text, "max_position_embeddings", None),
            backend="torch", device=self.device, compute_dtype=str(self.dtype).removeprefix("torch."),
            unembed_dtype="float32",
            norm_types={"first_block": type(self.input_norms[0]).__name__
                         if self.input_norms else None,
                        "final": type(self.final_norm).__name__},
            softcap=self.softcap,
        )
        self._tuned: tuple[Translators, list] | None = None  # the last tuned lens, on the device
        self._head_hashes = HeadHashes(self.unembedding, self.info.vocab, self.info.d_model)
        self._head_norms: np.ndarray | None = None  # computed once per loaded model
        self._check_head_path(probe)

    @torch.no_grad()
    def _check_head_path(self, probe) -> None:
        """Refused by name where the lens's decode of the model's own last state is not the
        model's own output (a head transform the lens does not apply)."""
        x = self.final_norm(probe.state.to(self.device).float())
        why = bounds.head_path_refusal(
            self.info.architecture, self.head_logits(x, 0, self.info.vocab).cpu().numpy(),
            probe.logits.float().cpu().numpy(), float(x.norm()), self.head_row_norms(),
            self.info.d_model, self.softcap, self.info.compute_dtype)
        if why:
            raise LensError(why)

    def _norms(self, name: str | None) -> list[torch.nn.Module] | None:
        """fp32 copies of each block's norm `name`; None where the blocks have none."""
        if name is None:
            return None
        return [owned(b.get_submodule(name), self.device) for b in self.blocks]

    def _steer(self, h: torch.Tensor, row: int) -> torch.Tensor:
        """h [B, T, d] with row's steering vector added (at its positions)."""
        if self._steering is None or row not in self._steering.vectors:
            return h
        v = torch.from_numpy(self._steering.vectors[row]).to(h.device, h.dtype)
        if self._steering.positions is None:
            return h + v
        at = torch.zeros(h.shape[1], dtype=torch.bool, device=h.device)
        at[[p for p in self._steering.positions if p < h.shape[1]]] = True
        return torch.where(at[None, :, None], h + v, h)

    def run_diagnostics(self) -> dict:
        """Recorded in the JSON: where accelerate placed each part of a split model."""
        if not self.split:
            return {}
        return {"device_map": {k: str(v) for k, v in self.model.hf_device_map.items()}}

    def run_report(self) -> str | None:
        return None

    # -- capture -----------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, batch: Sequence[Sequence[int]], last: int = 0,
                mids: list | None = None) -> list[torch.Tensor]:
        """Residual rows h_0..h_L of a batch of prompts (compute dtype): [B, T, d] each, or with
        last = n, [B * n, d] at each prompt's last n tokens (prompt-major). From the base model's
        forward pass:
        its head is not needed, the lens decodes the last row itself. Prompts are right-padded,
        which needs no attention mask: a causal model's tokens never see the pads after them, so
        each prompt's rows are its unbatched rows (docs/design.md). Given a list `mids`, the
        middle of each block is appended to it, alike: the input of the norm in front of the
        block's MLP (the residual after its attention sub-block, Gemma's post-attention norm
        included); for a parallel-residual block, its input plus its attention's output."""
        lengths = torch.tensor([len(ids) for ids in batch], device=self.input_device)
        x = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long, device=self.input_device)
        for b, ids in enumerate(batch):
            x[b, :len(ids)] = torch.tensor(list(ids))
        at = tuple(torch.tensor(a) for a in last_positions(lengths.tolist(), last or 1))
        rows: list[torch.Tensor] = []

        def keep(h: torch.Tensor) -> None:  # h is on its block's device in a split model
            rows.append(h[tuple(i.to(h.device) for i in at)] if last else h)

        def grab_input(_module, args, kwargs):
            h = self._steer(args[0] if args else kwargs["hidden_states"], 0)
            keep(h)
            if self._steering is not None:  # block 0 reads the steered embeddings
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            return None

        def grab_output(_module, _args, out, row=0):
            h = self._steer(out[0] if isinstance(out, tuple) else out, row)
            keep(h)
            if self._steering is not None:  # the next block reads the steered row
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return None

        handles = [self.blocks[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
        handles += [b.register_forward_hook(lambda m, a, o, row=i + 1: grab_output(m, a, o, row))
                    for i, b in enumerate(self.blocks)]
        sinks: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        if mids is not None and self.layout.mlp is None:
            raise refusals.no_middle(self.info.architecture)
        if mids is not None:
            for block, sink, parallel in zip(self.blocks, sinks, self.parallel):
                def take_input(_module, args, kwargs, sink=sink):
                    sink.append(args[0] if args else kwargs["hidden_states"])

                def take_output(_module, _args, out, sink=sink):
                    sink.append(out[0] if isinstance(out, tuple) else out)

                if parallel:
                    handles.append(block.register_forward_pre_hook(take_input, with_kwargs=True))
                    handles.append(block.get_submodule(self.layout.attention)
                                   .register_forward_hook(take_output))
                else:  # what the MLP's norm reads (a post-norm block: the MLP itself)
                    handles.append(block.get_submodule(self.layout.mlp_norm or self.layout.mlp)
                                   .register_forward_pre_hook(take_input, with_kwargs=True))
        try:
            self.model.base_model(input_ids=x, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if mids is not None:
            for sink, parallel in zip(sinks, self.parallel):
                mid = sink[0] + sink[1] if parallel else sink[0]
                mids.append(mid[tuple(i.to(mid.device) for i in at)] if last else mid)
        return rows

    def mid_kind(self) -> str:
        """How this model's blocks form their middle rows (recorded in the artifacts); "none"
        where they have no middle the lens can read (one sub-block: a state-space mixer)."""
        if self.layout.mlp is None:
            return "none"
        return "parallel" if all(self.parallel) else "sequential" if not any(self.parallel) \
            else "mixed"

    def _rows(self, ids: Sequence[int], site: Site = "resid") -> list[torch.Tensor]:
        """Rows of one prompt at a site, [T, d] each: h_0..h_L, or the middle of each block
        followed by h_L."""
        mids: list | None = [] if site == "mid" else None
        rows = self.capture([ids], mids=mids)
        return [h[0] for h in (rows if mids is None else [*mids, rows[-1]])]

    # -- decode ------------------------------------------------------------------------------
    def _norm(self, ref: NormRef) -> torch.nn.Module | None:
        return refusals.norm_of(ref, self.final_norm, self.input_norms, self.mlp_norms,
                                self.info.architecture)

    def _normed(self, rows: list[torch.Tensor], lens: Lens, site: Site = "resid") -> torch.Tensor:
        """[R, T, d] fp32: every row through the norm the lens assigns it (after its
        translator, for a tuned lens)."""
        out = []
        translators = [] if lens.translators is None else self._translators(lens.translators)
        for r, (h, ref) in enumerate(zip(rows, lens.norm_plan(len(self.blocks), site))):
            h = h.to(self.device).float()
            if r < len(translators):
                h = translate(h, *translators[r])
            norm = self._norm(ref)
            out.append(norm(h) if norm is not None else h)
        return torch.stack(out)

    def check_lens(self, lens: Lens) -> None:
        if lens.translators is not None:
            self._translators(lens.translators)
        for ref in lens.norm_plan(len(self.blocks)):
            self._norm(ref)

    def _translators(self, lens: Translators) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A tuned lens's (A_r, b_r) on the device, fp32; refused if made for another model."""
        if self._tuned is None or self._tuned[0] is not lens:
            check_matches(lens, self.info, self._head_hashes)
            weight = torch.from_numpy(lens.weight).to(self.device)
            bias = torch.from_numpy(lens.bias).to(self.device)
            self._tuned = lens, list(zip(weight, bias))
        return self._tuned[1]

    def _head_chunk(self, start: int, stop: int, scale: float = 1.0):
        """The head for vocabulary slice [start, stop): fp32 weights (converted once per chunk),
        bias, soft-cap, then a scale (log2 e gives base-2 logits) applied in place to the
        result, which is cheap on a tile in cache; returns (x [..., d], out=None) -> logits."""
        w = self._weight_rows(start, stop)
        b = self.head.bias[start:stop].float() * self.scale if self.head.bias is not None else None

        def apply(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            z = torch.matmul(x, w.T, out=out)
            if b is not None:
                z += b
            if self.softcap and z.requires_grad:  # training a tuned lens: autograd needs tanh's output
                z = torch.tanh(z / self.softcap) * self.softcap
            elif self.softcap:
                z.div_(self.softcap).tanh_().mul_(self.softcap)
            if scale != 1.0:
                z.mul_(scale)
            return z

        return apply

    def head_logits(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self._head_chunk(start, stop)(x)

    @torch.no_grad()
    def sweep(self, ids: Sequence[int], opts: SweepOptions) -> LayerStats:
        return self._sweep_rows(self._rows(opts.forward_ids(ids)), opts, opts.lens)

    def _sweep_rows(self, rows: list[torch.Tensor], opts: SweepOptions, lens: Lens,
                    site: Site = "resid") -> LayerStats:
        stats = prompt_stats(sweep_states(self._normed(rows, lens, site), opts,
                                          lambda start, stop: self._head_chunk(start, stop, LOG2E),
                                          self.info.vocab, progress),
                             opts.n_scored)
        stats.finite_residual = np.array([bool(h.isfinite().all()) for h in rows])
        return stats

    @torch.no_grad()
    def sweep_next_token(self, prompts: Sequence[Sequence[int]],
                         scored: Sequence[Sequence[tuple[int, ...]]], lens: Lens,
                         top_k: int = TOP_K) -> list[LayerStats]:
        rows = self.capture(prompts, last=len(scored[0]))  # R x [B * n, d]
        return self._next_token_rows(rows, scored, lens, top_k)

    @torch.no_grad()
    def sweep_lenses(self, ids: Sequence[int], opts: SweepOptions, lenses: Sequence[Lens],
                     mid: bool) -> LensSweep:
        mid = mid and self.layout.mlp is not None  # blocks of one sub-block have no middle
        mids: list | None = [] if mid else None
        rows = [h[0] for h in self.capture([opts.forward_ids(ids)], mids=mids)]
        mids = None if mids is None else [m[0] for m in mids]
        at = [len(ids) - 1]  # the next-token position
        return lens_sweeps(site_rows(rows, mids), lenses, 1, self.mid_kind() if mid else None,
                           lambda r, lens, site: [self._sweep_rows(r, opts, lens, site)],
                           lambda r, lens, site: self._normed([h[at] for h in r], lens, site),
                           self._pairs)[0]

    @torch.no_grad()
    def sweep_next_token_lenses(self, prompts: Sequence[Sequence[int]],
                                scored: Sequence[Sequence[tuple[int, ...]]],
                                lenses: Sequence[Lens], mid: bool, top_k: int = TOP_K,
                                pairs: bool = True) -> list[LensSweep]:
        n = len(scored[0])
        mid = mid and self.layout.mlp is not None  # blocks of one sub-block have no middle
        mids: list | None = [] if mid else None
        rows = self.capture(prompts, last=n, mids=mids)  # R x [B * n, d]
        at = list(range(0, len(prompts) * n, n))  # each prompt's next-token row
        return lens_sweeps(
            site_rows(rows, mids), lenses, len(prompts), self.mid_kind() if mid else None,
            lambda r, lens, site: self._next_token_rows(r, scored, lens, top_k, site),
            lambda r, lens, site: self._normed([h[at] for h in r], lens, site),
            self._pairs if pairs else None)

    def _pairs(self, decoded: list[torch.Tensor]) -> LensPairs:
        """Every pair of lenses at the same rows: one [R, B, d] per lens."""
        x = torch.stack(decoded)
        return LensPairs(**lens_pairs(x.reshape(x.shape[0], -1, x.shape[-1]),
                                      lambda start, stop: self._head_chunk(start, stop, LOG2E),
                                      self.info.vocab, PAIR_TOP_K))

    def _next_token_rows(self, rows: list[torch.Tensor],
                         scored: Sequence[Sequence[tuple[int, ...]]], lens: Lens, top_k: int,
                         site: Site = "resid") -> list[LayerStats]:
        n, n_prompts = len(scored[0]), len(scored)
        out = sweep_next_token(self._normed(rows, lens, site).transpose(0, 1),
                               [ids for per in scored for ids in per], top_k,
                               lambda start, stop: self._head_chunk(start, stop, LOG2E),
                               self.info.vocab, progress)
        stats = batch_stats(out, n)
        finite = np.stack([h.isfinite().all(-1).cpu().numpy() for h in rows], -1)
        for s, f in zip(stats, finite.reshape(n_prompts, n, -1).all(1)):
            s.finite_residual = f
        return stats

    @torch.no_grad()
    def final_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        # The lens's own last row, decoded in fp32 like every lens row (the model's own head
        # runs in the compute dtype).
        last = self.capture(prompts, last=1)[-1].to(self.device).float()
        return self.head_logits(self.final_norm(last), 0, self.info.vocab).cpu().numpy()

    @torch.no_grad()
    def layer_logits(self, ids: Sequence[int], lens: Lens, site: Site = "resid") -> np.ndarray:
        x = self._normed(self._rows(ids, site), lens, site)
        return self.head_logits(x, 0, self.info.vocab).cpu().numpy()

    @torch.no_grad()
    def lens_inputs(self, ids: Sequence[int], lens: Lens, site: Site = "resid") -> np.ndarray:
        return self._normed(self._rows(ids, site), lens, site).cpu().numpy()

    @torch.no_grad()
    def head_row_norms(self) -> np.ndarray:
        if self._head_norms is None:
            # in slices (an fp32 copy of a whole head: GBs); float64 on the host (MPS has none)
            step = 4096
            self._head_norms = torch.cat([
                torch.linalg.vector_norm(self._weight_rows(i, i + step), dim=1)
                for i in range(0, self.info.vocab, step)]).cpu().double().numpy()
        return self._head_norms

    @torch.no_grad()
    def framework_logits(self, ids: Sequence[int]) -> np.ndarray:
        x = torch.tensor([list(ids)], device=self.input_device)
        # the head at the last position only: the check reads no other
        out = self.model(input_ids=x, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1].float().cpu().numpy()

    @torch.no_grad()
    def residuals(self, ids: Sequence[int], site: Site = "resid") -> np.ndarray:
        return torch.stack([h.float().cpu() for h in self._rows(ids, site)]).numpy()

    @torch.no_grad()
    def decode_rows(self, x: np.ndarray, ref: NormRef) -> np.ndarray:
        h = torch.from_numpy(np.asarray(x, np.float32)).to(self.device)
        norm = self._norm(ref)
        return self.head_logits(norm(h) if norm is not None else h, 0, self.info.vocab).cpu().numpy()

    def norm_spec(self, ref: NormRef) -> NormSpec:
        # The model's own module (not the lens's fp32 copy), so a lens norm that drifted from
        # the model shows up in the self-test; its semantics (RMS or LayerNorm, w or 1 + w) are
        # read from what it computes (NormSpec.read), no longer declared per architecture.
        self._norm(ref)  # refused where the blocks have no such norm
        if ref == "final":
            norm = _attr(self.model, self.layout.final_norm)
        elif isinstance(ref, tuple):
            norm = self.blocks[ref[1]].get_submodule(self.layout.mlp_norm)
        else:
            norm = self.blocks[ref].get_submodule(self.layout.input_norm)
        if any(p.device.type == "meta" for p in norm.parameters()):  # offloaded by accelerate
            norm = owned(norm, torch.device("cpu"), fp32=False)  # its stored weights
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)

        def as_numpy(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().double().cpu().numpy()

        def apply(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return owned(norm, torch.device("cpu"))(torch.from_numpy(x)).double().numpy()

        return NormSpec.read(apply, as_numpy(weight), as_numpy(bias), eps, self.info.d_model)

    @torch.no_grad()
    def unembedding(self, start: int, stop: int) -> np.ndarray:
        return self._weight_rows(start, stop).cpu().numpy()

    def _weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 rows of the head as the model applies it (its logit scale folded in: the
        product's rounding, u |x| |s w_i| per logit, is 1/d of one of the bounds' products)."""
        w = self.head.weight[start:stop].float()
        return w * self.scale if self.scale != 1.0 else w

    def record(self, batch: Sequence[Sequence[int]], noise: np.ndarray | None = None) -> Recorded:
        if self.per_layer_inputs:
            raise refusals.per_layer_inputs(self.info.architecture)
        return TorchPatcher(self).record(batch, noise)

    def patched_logits(self, base: Recorded, clean: Recorded, kind: str, blocks: range,
                       restore: np.ndarray, n_scored: int) -> tuple[np.ndarray, np.ndarray]:
        return TorchPatcher(self).patched_logits(base, clean, kind, blocks, restore, n_scored)

    def jacobian_rows(self, ids: Sequence[int], directions: Sequence[int], skip: int) -> np.ndarray:
        self.model.requires_grad_(False)  # frozen: gradients reach the rows only
        x = torch.tensor([list(ids)] * len(directions), device=self.input_device)
        return jacobian_rows(self.model.base_model, self.blocks, x, directions, skip)

    def tuner(self, lens: Translators, recipe: Recipe) -> TorchTuner:
        check_matches(lens, self.info, self._head_hashes)
        self.model.requires_grad_(False)  # frozen: gradients reach the translators only
        self.final_norm.requires_grad_(False)
        return TorchTuner(self, lens, recipe, self.device)

    @torch.no_grad()
    def generate(self, ids: Sequence[int], max_tokens: int) -> list[int]:
        """Greedy continuation (transformers' generate), without the prompt."""
        x = torch.tensor([list(ids)], device=self.input_device)
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(x, max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=eos, eos_token_id=eos)
        return [t for t in out[0, len(ids):].tolist() if t != eos]

