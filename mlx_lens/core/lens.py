"""The lens: how each captured row becomes a distribution over the vocabulary.

A lens is a norm rule (which normalisation decodes each row) and, for a tuned lens, the affine
translators applied to a row before that norm (after tuned-lens's `Lens.transform_hidden`).
Backends ask a lens only for these two things; artifacts record its `name`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

Rule = Literal["final-norm", "next-norm", "raw"]
RULES: tuple[Rule, ...] = ("final-norm", "next-norm", "raw")

# Which normalisation decodes a row: "final" (the model's final norm), an int i (block i's input
# norm), ("mlp", i) (block i's norm in front of its MLP) or None (no norm).
NormRef = str | int | tuple[str, int] | None

# Where in the model a row is read (TransformerLens's hook names): "resid" the residual between
# blocks (row i: after block i - 1, row 0 the embeddings), "mid" the middle of block i, after its
# attention sub-block and before its MLP (rows 0..L-1; the model's output row L is appended to
# them, as the row everything is compared with).
Site = Literal["resid", "mid"]
SITES: tuple[Site, ...] = ("resid", "mid")


class Translators(Protocol):
    """Affine translators, one per row before the last: row r -> h + A_r h + b_r
    (mlx_lens/tuned/lens_file.py's TunedLens)."""

    weight: np.ndarray  # [L, d, d] float32
    bias: np.ndarray  # [L, d] float32

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class Lens:
    """Equal lenses decode alike: the same rule and the same translators object."""

    rule: Rule = "final-norm"
    translators: Translators | None = None  # a tuned lens: decoded through the final norm

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown lens {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.translators is not None and self.rule != "final-norm":
            raise ValueError("a tuned lens decodes its translated rows through the final norm")

    @classmethod
    def tuned(cls, translators: Translators) -> "Lens":
        return cls("final-norm", translators)

    @property
    def name(self) -> str:
        """The lens as artifacts record it, and as --lens takes it."""
        return self.rule if self.translators is None else self.translators.name

    @property
    def reads_mid(self) -> bool:
        """Whether the lens decodes the middle of a block: a tuned lens's translators are fitted
        to the rows between blocks only."""
        return self.translators is None

    def norm_plan(self, n_layers: int, site: Site = "resid") -> list[NormRef]:
        """The norm that decodes each of the n_layers + 1 rows of a site.

        Row 0 is the embedding output, row i the residual after block i-1 (site "resid"), or
        the middle of block i (site "mid", rows 0..n_layers-1). The last row is always the
        model's own output distribution (final norm), whatever the lens. `next-norm` is the
        original experiment's rule for pre-norm models: a row goes through the norm the next
        sub-block would apply, block i's input norm between blocks, its MLP's norm mid-block.
        """
        if site == "mid" and not self.reads_mid:
            raise ValueError(f"the lens {self.name} does not decode the middle of a block")
        if self.rule == "next-norm":
            inner = [("mlp", i) for i in range(n_layers)] if site == "mid" else range(n_layers)
            return [*inner, "final"]
        if self.rule == "raw":
            return [None] * n_layers + ["final"]
        return ["final"] * (n_layers + 1)


FINAL_NORM = Lens("final-norm")
