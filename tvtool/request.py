"""The bases of every typed request (`ComposeRequest`, `SelectRequest`, `EvalRequest`): what a
command asks for, validated once, shared by the CLI (which builds it from its flags) and the
library (which builds it directly); and of every report (`ComposeReport`, `SelectReport`,
`EvalReport`): what the orchestrator returns, the human renderer reads and `--json` prints.
Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tvtool.errors import TvtoolError


class Request(BaseModel):
    """Frozen, unknown fields refused; `build` turns validation errors into one-line errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def build(cls, **fields: Any) -> Any:
        """`cls(**fields)`, raising a `TvtoolError` that names the flag (``--threshold: ...``)."""
        try:
            return cls(**fields)
        except ValidationError as e:
            raise TvtoolError(validation_message(e)) from None

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], **fields: Any) -> Any:
        """`build` from a command's flags (its `locals()`): every flag named like a field and
        given (not None; None leaves the field's default), then `fields` (those built from
        several flags or named differently), which win."""
        given = {k: v for k, v in flags.items() if k in cls.model_fields and v is not None}
        return cls.build(**{**given, **fields})


def validation_message(e: ValidationError) -> str:
    """The first error of `e` as ``--flag-name: what is wrong`` (field names spelled as flags)."""
    first = e.errors()[0]
    names = [x for x in first.get("loc", ()) if isinstance(x, str) and x.isidentifier()]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not names:
        return msg
    return f"--{names[-1].replace('_', '-')}: {msg}"


class Report(BaseModel):
    """A command's result. `doc()` is its `--json` document: `model_dump` of the fields the run
    set (a part the run does not have, e.g. an eval's `weights.file` without `--weights`, is
    left unset and stays out, as the documents have always been)."""

    model_config = ConfigDict(extra="forbid")

    def doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)
