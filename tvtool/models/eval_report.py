"""What `eval` returns: a typed report, read by the CLI's renderer and printed by `--json`
(`Report.doc()`; a part a mode does not have stays out of the document). Field names are the
document's keys (scripts and `--finetuned-acc FILE` read them). Torch-free."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from tvtool.request import Report


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightedVector(_Part):
    name: str
    digest: str
    weight: float | None = None  # not in disentanglement mode (each vector alone, then both)


class EvalWeights(_Part):
    """What was evaluated: `mode` (base, vectors, coefs, weights, disentanglement) and its input."""

    mode: str
    vectors: list[WeightedVector] | None = None
    coefs: str | None = None
    file: str | None = None


class AccuracyRow(_Part):
    """Top-1 accuracy on one data set (normalised: / the fine-tuned accuracy, when known)."""

    dataset: str
    path: str
    n: int
    correct: int
    accuracy: float
    normalised: float | None = None


class GridRow(_Part):
    """One scale of `--grid` on the validation sets (negation adds the last two fields)."""

    scale: float
    accuracy: dict[str, float]
    mean_accuracy: float
    normalised: dict[str, float] | None
    mean_normalised: float | None
    target_accuracy: float | None = None
    keeps_control: bool | None = None


class ScaleSearch(_Part):
    """The scale grid and the scale picked by `criterion` (mean_normalised, mean_accuracy or
    negation: lowest target accuracy keeping `keep` x the control's base accuracy)."""

    criterion: str
    best_scale: float
    rows: list[GridRow]
    control: str | None = None
    base_control_accuracy: float | None = None
    keep: float | None = None


class Disentanglement(_Part):
    """xi[i][j]: the weight-disentanglement error at (alphas[i], alphas[j]) of the two vectors."""

    alphas: list[float]
    datasets: list[str]
    xi: list[list[float]]
    vectors: list[str]


class EvalReport(Report):
    model: str
    base: str
    base_fingerprint: str
    device: str
    split: str
    templates: int | list[int]
    weights: EvalWeights
    scale: float | None
    grid: ScaleSearch | None
    disentanglement: Disentanglement | None
    results: list[AccuracyRow]
    mean_accuracy: float
    mean_normalised: float | None

    def headline(self) -> float:
        """The number `-q` prints: mean xi in disentanglement mode, else the mean accuracy."""
        if self.disentanglement:
            vals = [x for row in self.disentanglement.xi for x in row]
            return sum(vals) / len(vals)
        return self.mean_accuracy
