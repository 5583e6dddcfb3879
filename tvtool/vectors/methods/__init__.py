"""The merge-method registry: every module of this package that defines `METHOD` is a method.

Adding a method is one file here (its `Params`, capabilities and maths: see `base.Method`) plus
its test; the recipe's params union, the CLI's `--method` choices and flags and the help text
are built from `METHODS`. Torch-free at import.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from tvtool.errors import TvtoolError
from tvtool.vectors.methods.base import Method, Params

_SUPPORT = {"base", "ops", "topk"}


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _SUPPORT or info.name.startswith("_"):
            continue
        method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(method, Method):
            found[method.name] = method
    return {n: found[n] for n in sorted(found, key=lambda n: (n != "sum", n))}


METHODS: dict[str, Method] = _discover()
MethodParams = Annotated[
    Union[tuple(m.Params for m in METHODS.values())],  # noqa: UP007 - built at run time
    Field(discriminator="method"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(MethodParams)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise TvtoolError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


def cli_flag(name: str, info: Any) -> str:
    """The CLI flag of a Params field (json_schema_extra 'flag', else --FIELD-NAME)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def param_fields(method: Method) -> dict[str, Any]:
    """The method's parameter fields (all but the discriminator)."""
    return {k: v for k, v in method.Params.model_fields.items() if k != "method"}


def explain(e: ValidationError, method: Method | None = None) -> str:
    """One line for a pydantic error on method parameters, naming CLI flags."""
    flags = {k: cli_flag(k, v) for m in METHODS.values() for k, v in param_fields(m).items()}
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
        name = loc[-1] if loc else ""
        where = flags.get(name, ".".join(loc))
        msg = str(err["msg"]).replace("Value error, ", "")
        if err["type"] == "extra_forbidden":
            target = f"--method {method.name}" if method is not None else "this method"
            parts.append(f"{where} does not apply to {target}")
        else:
            parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def make_params(name: str, given: dict[str, Any] | None = None) -> Params:
    """Validate `given` (only what the user set: the Params' defaults fill the rest)."""
    method = get_method(name)
    try:
        return method.Params.model_validate({**(given or {}), "method": name})
    except ValidationError as e:
        raise TvtoolError(explain(e, method)) from None


def load_params(doc: Any) -> Params:
    """Method params read back from a recipe (the discriminated union)."""
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as e:
        name = doc.get("method") if isinstance(doc, dict) else None
        method = METHODS.get(name) if isinstance(name, str) else None
        raise TvtoolError(explain(e, method)) from None
