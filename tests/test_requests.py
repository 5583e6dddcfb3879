"""Typed requests: the CLI and the library build the same validated request; registries agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvtool.compose import objectives, registry
from tvtool.compose.requests import ComposeRequest, SelectRequest
from tvtool.errors import TvtoolError
from tvtool.models.eval_run import EVAL_MODES, EvalRequest
from tvtool.models.spec import ModelSpec

D = Path("data")


def test_objective_registries_agree_and_own_their_parameters() -> None:
    assert set(registry.OBJECTIVES) == set(objectives.OBJECTIVES)
    pseudo = registry.objective_params("pseudo", threshold=0.5)
    assert pseudo == {"name": "pseudo", "threshold": 0.5}
    assert registry.objective_params("ce", threshold=0.5) == {"name": "ce"}  # not its flag
    assert registry.threshold_of(registry.CeParams()) is None
    with pytest.raises(TvtoolError, match="unknown objective 'nope'"):
        registry.objective_params("nope")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"data": [D]}, "give task VECTORS"),
        ({"vectors": ["v"]}, "give --data DIR"),
        ({"vectors": ["v"], "negate": D}, "--negate needs --control"),
        ({"vectors": ["v"], "control": D}, "--control goes with --negate"),
        ({"vectors": ["v"], "data": [D], "negate": D, "control": D}, "cannot be combined"),
        ({"vectors": ["v"], "data": [D], "granularity": "block"}, "--granularity: "),
        ({"vectors": ["v"], "data": [D], "epochs": 0}, "--epochs: "),
        ({"vectors": ["v"], "data": [D], "val_split": 1.5}, "--val-split: "),
        ({"vectors": ["v"], "data": [D], "vector_dtype": "fp8"}, "--vector-dtype: "),
        ({"vectors": ["v"], "data": [D], "objective": {"name": "pseudo", "threshold": 2}},
         "--threshold: "),
        ({"vectors": ["v"], "data": [D], "name": "../x"}, "name"),
        ({"vectors": ["v"], "data": [D], "colour": "red"}, "--colour: "),
    ],
)
def test_compose_request_validates_once(fields, message) -> None:
    with pytest.raises(TvtoolError) as e:
        ComposeRequest.build(**fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_compose_request_defaults_and_negation() -> None:
    r = ComposeRequest.build(vectors=["v"], negate=D, control=D)
    assert r.negation and r.objective.name == "ce" and r.granularity == "tensor"
    assert ComposeRequest.model_validate(r.model_dump()) == r  # round trip through JSON-able data


@pytest.mark.parametrize(
    "fields,kind",
    [
        ({"score": "norm", "top": 1}, "selection"),
        ({"score": "norm", "budget_mb": 1.0}, "selection"),
        ({"score": "norm", "density": 0.1}, "mask"),
    ],
)
def test_select_request_kind(fields, kind) -> None:
    assert SelectRequest.build(vectors=["v"], **fields).kind == kind


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"score": "norm"}, "give --top N or --budget-mb M"),
        ({"score": "norm", "top": 1, "budget_mb": 1.0}, "not both"),
        ({"score": "norm", "top": 1, "density": 0.2}, "--top/--budget-mb do not apply"),
        ({"score": "grad", "top": 1}, "needs the model"),
        ({"score": "grad", "top": 1, "density": 0.2}, "--density applies to masks"),
        ({"score": "importance", "top": 1}, "--top/--budget-mb do not apply"),
        ({"score": "magic", "top": 1}, "unknown --score 'magic'"),
        ({"score": "norm", "density": 1.5}, "--density: "),
    ],
)
def test_select_request_errors(fields, message) -> None:
    with pytest.raises(TvtoolError, match=message.replace("(", r"\(")):
        SelectRequest.build(vectors=["v"], **fields)


def test_select_grad_with_a_model_and_data_is_valid() -> None:
    r = SelectRequest.build(vectors=["v"], model=ModelSpec(arch="ViT-B-32"), data=[D], top=2)
    assert r.kind == "selection" and registry.SCORES[r.score].needs_data


@pytest.mark.parametrize(
    "fields,mode",
    [
        ({}, "base"),
        ({"vectors": ["a", "b:0.5"]}, "vectors"),
        ({"coefs": "c"}, "coefs"),
        ({"weights": Path("ft.pt")}, "weights-as-base"),
        ({"weights": Path("ft.pt"), "model": ModelSpec(base=Path("b.pt"))}, "weights"),
        ({"disentanglement": ("a", "b")}, "disentanglement"),
    ],
)
def test_eval_request_mode(fields, mode) -> None:
    assert EvalRequest.build(data=[D], **fields).mode == mode
    assert mode in EVAL_MODES or mode == "weights-as-base"


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"vectors": ["a"], "coefs": "c"}, "give one of VECTOR..., --weights, --coefs"),
        ({"vectors": ["a"], "disentanglement": ("a", "b")}, "drop the other weights"),
        ({"coefs": "c", "grid": "0:1:0.5"}, "--grid searches the scale"),
        ({"heads": [Path("h.pt"), Path("g.pt")]}, "one --head file per --data"),
        ({"batch_size": 0}, "--batch-size: "),
    ],
)
def test_eval_request_errors(fields, message) -> None:
    with pytest.raises(TvtoolError, match=message.replace("(", r"\(")):
        EvalRequest.build(data=[D], **fields)
    with pytest.raises(TvtoolError, match="give --data"):
        EvalRequest.build()


class Captured(Exception):
    pass


def test_cli_builds_the_request_the_library_would(invoke, monkeypatch, tmp_path) -> None:
    """The command only maps flags to the request: capture what reaches the orchestrators."""
    from tvtool.compose import select_run
    from tvtool.models import eval_run

    seen = {}

    def capture(req, *a, **k):
        seen["req"] = req
        raise Captured

    monkeypatch.setattr(select_run, "run_select", capture)
    with pytest.raises(Captured):
        invoke("select", "a", "b", "--score", "norm", "--top", "2", "--granularity", "layer",
               "--name", "sel/x", "--store", tmp_path)
    assert seen["req"] == SelectRequest(vectors=["a", "b"], score="norm", top=2,
                                        granularity="layer", name="sel/x", store=tmp_path)

    monkeypatch.setattr(eval_run, "run_eval", capture)
    with pytest.raises(Captured):
        invoke("eval", "a:0.5", "--base", "b.pt", "--model", "ViT-B-32", "--data", tmp_path,
               "--grid", "0:1:0.5")
    assert seen["req"] == EvalRequest(
        model=ModelSpec(arch="ViT-B-32", base=Path("b.pt")), vectors=["a:0.5"], data=[tmp_path],
        grid="0:1:0.5",
    )


def test_cli_maps_request_errors_to_one_line(invoke) -> None:
    r = invoke("select", "a", "--score", "norm", "--top", "1", "--granularity", "blocks")
    assert r.exit_code == 1 and r.stderr.startswith("Error: --granularity: ")
    r = invoke("compose", "a", "--data", ".", "--objective", "pseudo", "--threshold", "1.5")
    assert r.exit_code == 1 and r.stderr.startswith("Error: --threshold: ")
