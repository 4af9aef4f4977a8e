"""The MLX lens over a model split across processes: a pipeline of contiguous block slices under
`mlx.launch` (mx.distributed: ring over TCP or Thunderbolt, MPI, or NCCL on CUDA).

Rank r loads only its slice of the blocks (weights load lazily: the other blocks are never read)
plus what every rank needs to decode (the final norm and the head), runs its blocks on the
residual received from rank r - 1 and sends the result on. Each rank decodes ITS OWN rows with
the same fp32 head and running reductions as one process, against the model's output row, whose
state at each prompt's next-token position ([B, d]) the last rank broadcasts. Then the ranks
exchange their rows' reduced statistics (all_gather, kilobytes), so every rank holds the whole
LayerStats and runs the rest of the experiment identically (SPMD); only rank 0 writes.
Full logits and the rows' residuals never travel.
"""
from __future__ import annotations

import os
from typing import Sequence

import mlx.core as mx
import numpy as np

from mlx_lens.core.contract import TOP_K, LayerStats, SweepOptions
from mlx_lens.core.lens import Lens
from mlx_lens.loading.placement import peak_memory_mib
from mlx_lens.core.errors import LensError
from mlx_lens.mlx.backend import MlxLens
from mlx_lens.core.stats import batch_stats, prompt_stats
from mlx_lens.mlx.reduce import sweep_next_token, sweep_states
from mlx_lens.loading.sources import ModelSource
from mlx_lens.core.progress import progress

_FIELDS = ("entropy", "topk_ids", "topk_probs", "kl_to_final", "kl_bound", "cos_to_final",
           "p_answer", "answer_rank", "p_scored", "piece_log2p", "piece_rank", "piece_lead",
           "piece_x_norm", "finite_residual")


def launched() -> bool:
    """Started by mlx.launch (or by hand with MLX_RANK and a hostfile)?"""
    return "MLX_RANK" in os.environ


def distributed_group() -> mx.distributed.Group | None:
    """The group of this run's processes, or None for a single process."""
    if not launched():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def block_slices(n_blocks: int, size: int) -> list[range]:
    """Contiguous, nearly equal slices of the blocks, one per rank."""
    if n_blocks < size:
        raise LensError(f"a model of {n_blocks} blocks cannot be split over {size} processes")
    edges = [round(i * n_blocks / size) for i in range(size + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


class PipelineBackend(MlxLens):
    """Results only (the contract's Backend): the lens's intermediate values and training need
    the whole model in one process."""

    def __init__(self, source: ModelSource, group: mx.distributed.Group, device: str = "auto",
                 dtype: str = "auto"):
        super().__init__(source, device, dtype, lazy=True)
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.slices = block_slices(len(self.blocks), self.size)
        self.slice = self.slices[self.rank]
        self.bytes_sent = 0
        self.compute = getattr(mx, self.info.compute_dtype)
        needed = [self.blocks[i].parameters() for i in self.slice]
        needed += [self.head.parameters(), self.final_norm.parameters()]
        needed += [self.embed.parameters()] if self.rank == 0 else []
        mx.eval(needed)  # now: the load's time and memory are the load's

    def _rows_of(self, rank: int) -> list[int]:
        """The rows rank `rank` captures: row i + 1 after block i, row 0 (embeddings) on rank 0."""
        return ([0] if rank == 0 else []) + [i + 1 for i in self.slices[rank]]

    def run_diagnostics(self) -> dict:
        """Recorded in the JSON: the split and what this process sent."""
        return {"pipeline": {"processes": self.size,
                             "blocks": [[s.start, s.stop] for s in self.slices],
                             "bytes_sent_by_rank_0": self.bytes_sent}}

    def run_report(self) -> str:
        """One line per rank, printed at the end of a run."""
        return (f"rank {self.rank}/{self.size}: blocks {self.slice.start}-{self.slice.stop - 1}, "
                f"peak memory {peak_memory_mib():.0f} MiB, sent {self.bytes_sent} bytes")

    # -- communication: every result is evaluated at once, so a lost peer raises here --------
    def _eval(self, x: mx.array) -> mx.array:
        try:
            mx.eval(x)
        except RuntimeError as exc:
            raise LensError(f"rank {self.rank} of {self.size}: {exc} (another process of the "
                            "run failed or was stopped)") from exc
        return x

    def _send(self, x: mx.array, dst: int) -> None:
        self.bytes_sent += x.nbytes
        self._eval(mx.distributed.send(x, dst, group=self.group))

    def _recv(self, like: mx.array, src: int) -> mx.array:
        return self._eval(mx.distributed.recv_like(like, src, group=self.group))

    def _from_last(self, x: mx.array) -> mx.array:
        """The last rank's x on every rank (a sum with zeros: exact)."""
        if self.rank == self.size - 1:
            self.bytes_sent += x.nbytes
        mine = x if self.rank == self.size - 1 else mx.zeros_like(x)
        return self._eval(mx.distributed.all_sum(mine, group=self.group))

    # -- the pipeline ------------------------------------------------------------------------
    def capture(self, batch: Sequence[Sequence[int]], last: int = 0, outputs: int = 1) -> list:
        """This rank's rows (None for the others' rows), [B, T, d] each or [B * n, d] at each
        prompt's last n = `last` tokens, and the model's output row h_L on every rank, fp32 at
        each prompt's last max(last, outputs) tokens [B * n, d] (prompt-major)."""
        x, at = self._tokens(batch, max(last, outputs))
        given = None if self.rank == 0 else \
            self._recv(mx.zeros((*x.shape, self.hidden), self.compute), self.rank - 1)
        # row 0 (rank 0: embedded and steered as in one process), then this rank's blocks' rows
        ran = self._run(x, self.slice.start, given, self.slice.stop)
        rows: list = [None] * (len(self.blocks) + 1)
        if self.rank == 0:
            rows[0] = ran[0]
        for i, row in zip(self.slice, ran[1:]):
            rows[i + 1] = row
        h = ran[-1]
        if self.rank < self.size - 1:
            self._send(h, self.rank + 1)
        final = h[at].astype(mx.float32) if self.rank == self.size - 1 else None
        self.output_row = self._from_last(final if final is not None
                                          else mx.zeros((len(at[0]), self.hidden), mx.float32))
        return [r if r is None or not last else r[at] for r in rows]

    def _with_output(self, x: mx.array) -> tuple[mx.array, int]:
        """x [G, R, d] with the model's output row appended where this rank does not hold it,
        so that KL and cosine to it are computed here; and the number of this rank's own rows."""
        own = x.shape[1]
        if self.rank == self.size - 1:
            return x, own
        out = self.final_norm(self.output_row)  # [G', d]; the last row has no translator
        if x.shape[0] != out.shape[0]:  # one prompt's positions: only the last G' are scored
            fill = mx.broadcast_to(out[:1], (x.shape[0] - out.shape[0], out.shape[-1]))
            out = mx.concatenate([fill, out])
        return mx.concatenate([x, out[:, None]], 1), own

    def sweep(self, ids: Sequence[int], opts: SweepOptions) -> LayerStats:
        n = opts.n_scored
        rows = [None if h is None else h[0]
                for h in self.capture([opts.forward_ids(ids)], outputs=n)]
        x, own = self._with_output(self._normed(rows, opts.lens).transpose(1, 0, 2))
        stats = prompt_stats(sweep_states(x.transpose(1, 0, 2), opts, self.head_logits,
                                          self.info.vocab, self._step(x.shape[0] * x.shape[1]),
                                          progress), n)
        arrays = {k: v[:own] for k, v in vars(stats).items() if k in _FIELDS and v is not None}
        arrays["finite_residual"] = np.array([bool(mx.isfinite(h).all()) for h in rows
                                              if h is not None])
        return self._gathered(arrays, stats.summation_depth)

    def sweep_next_token(self, prompts: Sequence[Sequence[int]],
                         scored: Sequence[Sequence[tuple[int, ...]]], lens: Lens,
                         top_k: int = TOP_K) -> list[LayerStats]:
        n = len(scored[0])
        rows = self.capture(prompts, last=n)
        x, own = self._with_output(self._normed(rows, lens).transpose(1, 0, 2))
        per_prompt = batch_stats(sweep_next_token(x, [ids for per in scored for ids in per],
                                                  top_k, self.head_logits, self.info.vocab,
                                                  self._step(x.shape[0] * x.shape[1]), progress),
                                 n)
        finite = np.array(mx.stack([mx.isfinite(h).all(-1) for h in rows if h is not None], -1))
        finite = finite.reshape(len(prompts), n, -1).all(1)
        # [B, rows, ...] -> rows first, for the gather
        arrays = {k: np.stack([getattr(s, k)[:own] for s in per_prompt], 1) for k in _FIELDS
                  if k != "finite_residual" and getattr(per_prompt[0], k) is not None}
        arrays["finite_residual"] = finite.T
        whole = self._gathered(arrays, per_prompt[0].summation_depth)
        return [LayerStats(**{k: (v[:, b] if v is not None and k in _FIELDS else v)
                              for k, v in vars(whole).items()}) for b in range(len(prompts))]

    def _gathered(self, arrays: dict[str, np.ndarray], depth: int | None) -> LayerStats:
        """Every rank's rows of each statistic (row axis first), in row order, on every rank:
        padded to the widest slice and all_gather'ed. fp32 and int32 carry the reductions'
        values exactly (they are fp32 on the device; ids < 2^31)."""
        counts = [len(self._rows_of(r)) for r in range(self.size)]
        widest = max(counts)
        out = {}
        for key in sorted(arrays):
            a = np.asarray(arrays[key])
            kind = np.float32 if a.dtype.kind == "f" else np.int32
            padded = np.zeros((widest, *a.shape[1:]), kind)
            padded[:len(a)] = a
            self.bytes_sent += padded.nbytes
            every = np.array(self._eval(mx.distributed.all_gather(mx.array(padded), group=self.group)))
            every = every.reshape(self.size, widest, *a.shape[1:])
            out[key] = np.concatenate([every[r, :counts[r]] for r in range(self.size)])
        deepest = self._eval(mx.distributed.all_max(mx.array(depth or 0), group=self.group)).item()
        finite = out.pop("finite_residual").astype(bool)
        stats = LayerStats.from_arrays({**out, "summation_depth": deepest})
        stats.finite_residual = finite
        return stats

    def final_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        # Every rank decodes the broadcast output row with its own copy of the head: [B, d]
        # travels, not [B, V].
        self.capture(prompts, last=1)
        return np.array(self.head_logits(self.final_norm(self.output_row), 0, self.info.vocab))
