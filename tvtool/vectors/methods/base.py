"""The contract of a merge method (torch-free at import: the CLI builds its flags from it).

A method is one object in one module of this package (`METHOD = ...`): its pydantic `Params`
(the `method` field is the discriminator of the recipe's union; every other field becomes a CLI
flag), its capabilities, and its per-tensor maths. For one output tensor the executor hands it
the base's tensor and each term's task-vector tensor (compute dtype, flat):

    x_t = method.term(tau_t)                     per term (trim, drop, mask ...), in place
    theta = method.combine(base, [x_t], [w_t])   the merged tensor

`weighted_sum` methods give theta = base + sum_t w_t x_t (and the --scale default of task
arithmetic: the weight of terms without one); the others get w_t and --scale (a multiplier of
the merged delta, default 1.0) and combine as they define. Methods that are not `whole_tensor`
must be elementwise: the executor may hand them consecutive slices of a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from tvtool.vectors.methods.topk import GlobalTopK


class Params(BaseModel):
    """Base of every method's parameters: frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str


@dataclass
class TermState:
    """What a method knows about one term while merging."""

    vector: str  # the term's identity (vector digest or checkpoint sha256): seeds its draws
    weight: float
    topk: GlobalTopK | None = None  # set by the global top-k pre-pass
    offsets: dict[str, int] = field(default_factory=dict)  # with `topk`: each key's first
    # position in the vector, keys in trim order (`GlobalTopK.at`)


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]  # one sentence for --help
    Params: ClassVar[type[Params]]
    exact_terms: ClassVar[int | None] = None  # slerp: exactly 2
    min_terms: ClassVar[int] = 1
    uses_masks: ClassVar[bool] = False
    random: ClassVar[bool] = False  # draws seeded by each term's identity

    def weighted_sum(self, p: Any) -> bool:
        """theta = base + sum_t w_t x_t (term weights default to --scale)."""
        return True

    def whole_tensor(self, p: Any) -> bool:
        """The maths needs each tensor whole (per-tensor statistics or random streams)."""
        return False

    def global_density(self, p: Any) -> float | None:
        """Density of a vector-wide top-k trim (needs the two-pass pre-pass), else None."""
        return None

    def before_trim(self, x: torch.Tensor, t: TensorInfo, term: TermState, p: Any):
        """The steps that come before the global trim (what the pre-pass ranks)."""
        return x

    def term(self, x: torch.Tensor, t: TensorInfo, term: TermState, p: Any, mask=None):
        """One term's tensor after the method's per-term steps (may work in place)."""
        return x

    def combine(
        self,
        base: torch.Tensor,
        xs: list[torch.Tensor],
        weights: list[float],
        scale: float,
        p: Any,
        t: TensorInfo,
    ) -> torch.Tensor:
        """theta for one tensor; `base` may be updated in place and returned."""
        for x, w in zip(xs, weights, strict=True):
            base.add_(x, alpha=w)
        return base

    def stacked(self, p: Any) -> bool:
        """The maths is a trim then a combine of the stacked terms (`combine_rows`): the
        executor reads the terms of a slice into one [T, c] tensor and hands over trim rules
        (the global ones, or per tensor from `density`)."""
        return False

    def density(self, p: Any) -> float | None:
        """The per-tensor trim density of a `stacked` method (None: it does not trim)."""
        return None

    def combine_rows(
        self,
        base: torch.Tensor,
        x: torch.Tensor,
        rules: list[GlobalTopK],
        weights: list[float],
        scale: float,
        p: Any,
        t: TensorInfo,
    ) -> torch.Tensor:
        """theta for one slice of a `stacked` method: x [T, c] holds the terms' task-vector
        slices (overwritten), rules their trims (None when it does not trim); `base` may be
        updated in place."""
        raise NotImplementedError

    def check(self, p: Any, n_terms: int) -> str | None:
        """A reason this merge cannot run (term count ...), else None."""
        if self.exact_terms is not None and n_terms != self.exact_terms:
            return f"--method {self.name} takes exactly {self.exact_terms} terms, got {n_terms}"
        if n_terms < self.min_terms:
            return f"--method {self.name} takes at least {self.min_terms} terms, got {n_terms}"
        return None


def add_delta(base: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * delta, in place."""
    return base.add_(delta, alpha=scale)


# -- field types shared by several methods (one spelling, one CLI flag) --------------------------
def flag(name: str) -> dict[str, str]:
    """Field metadata: the CLI flag of a field whose flag is not --FIELD-NAME."""
    return {"flag": name}


DENSITY = "Fraction of each vector's entries kept, in [0, 1]."
SCOPE = "Top-k over the whole vector (global, the TIES paper's) or per tensor."
SEED = "Seed of the random drops (one stream per vector and tensor name)."
NORMALIZE = (
    "TIES merge: divide by the summed |weight| of agreeing terms (disjoint mean, mergekit's "
    "normalize: true) or not (disjoint sum, FusionBench's merge_func: sum)."
)
