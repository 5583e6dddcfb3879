"""A restricted unpickler for whole pickled `nn.Module` checkpoints.

Public task-vector code bases save checkpoints with `torch.save(module)`: the pickle names the
module classes (e.g. `src.modeling.ImageEncoder`, `open_clip.model.CLIP`). We rebuild only the
tensors: every class the pickle names is replaced by an inert stub that records its state and
runs no code; a short allow-list of torch's tensor rebuild helpers is resolved for real. Names from
modules that can act on the system (os, subprocess, builtins, ...) are refused outright.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any

from tvtool.errors import UnsafePickleError

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "object"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("copyreg", "_reconstructor"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.nn.parameter", "Parameter"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_DTYPES = {
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
    "uint8", "bool", "complex64", "complex128", "float", "half", "double", "long", "int",
}
_PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_REFUSED_ROOTS = {
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil", "importlib",
    "runpy", "pickle", "_pickle", "marshal", "socket", "ctypes", "code", "codeop", "pty",
    "webbrowser", "multiprocessing", "threading", "signal", "io", "tempfile", "pathlib", "glob",
    "operator", "functools", "types", "inspect", "pdb", "timeit", "platform", "urllib", "http",
    "requests", "asyncio", "ssl", "select", "selectors", "zipimport", "pkgutil", "site",
}
# names that only make sense as calls, refused from any module (classes of other names become
# inert stubs, so a refusal here is about saying no clearly rather than about safety)
_REFUSED_NAMES = {
    "eval", "exec", "compile", "system", "popen", "spawn", "execv", "execve", "execl", "call",
    "check_call", "check_output", "run", "Popen", "getattr", "setattr", "delattr", "open",
    "load", "loads", "import_module", "apply",
}


class Stub:
    """An inert stand-in for a pickled class instance: keeps its state, runs nothing."""

    _tv_qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = object.__new__(cls)
        obj.__dict__["_tv_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_tv_state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> Stub:
        return Stub()

    def __reduce__(self):  # never re-pickled by us
        raise TypeError("stub objects cannot be pickled")


def _stub_class(module: str, name: str) -> type:
    return type(name, (Stub,), {"_tv_qualname": f"{module}.{name}", "__module__": "tvtool.stub"})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; stubs classes; refuses dangerous modules."""

    _stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_NAMES.get(module, module)  # protocol-2 pickles spell builtins the old way
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and (name in _DTYPES or name.endswith("Storage")):
            return super().find_class(module, name)
        if module == "torch.serialization" and name == "_get_layout":
            return super().find_class(module, name)
        if module == "torch" and name in {"strided", "sparse_coo"}:
            return super().find_class(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes  # how a plain `pickle.dump` of tensors stores them
        root = module.split(".")[0]
        if root in _REFUSED_ROOTS or name.startswith("__") or name in _REFUSED_NAMES:
            raise UnsafePickleError(
                f"refusing to load pickled global {module}.{name}: this checkpoint asks to run code"
            )
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = _stub_class(module, name)
        return self._stubs[key]


def _storage_from_bytes(data: bytes) -> Any:
    """A storage serialised inside a plain pickle (torch's legacy format), read weights-only."""
    import io

    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _PickleModule:
    """What `torch.load(pickle_module=...)` needs: our Unpickler plus pickle's load helpers."""

    Unpickler = RestrictedUnpickler
    __name__ = "tvtool_restricted_pickle"

    @staticmethod
    def load(f, **kwargs):
        return RestrictedUnpickler(f, **kwargs).load()


restricted_pickle = _PickleModule()


def tensors_from_object(obj: Any) -> OrderedDict:
    """Flatten what a module pickle held into a state dict (`a.b.weight` names), like
    `nn.Module.state_dict()` would: parameters, persistent buffers, then sub-modules."""
    import torch

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    seen: set[int] = set()

    def walk(o: Any, prefix: str) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            out[prefix.rstrip(".")] = o.detach()
            return
        if isinstance(o, Stub):
            d = o.__dict__
            if "_parameters" in d or "_modules" in d:
                skip = set(d.get("_non_persistent_buffers_set", ()) or ())
                for k, v in (d.get("_parameters") or {}).items():
                    if v is not None:
                        out[prefix + k] = v.detach()
                for k, v in (d.get("_buffers") or {}).items():
                    if v is not None and k not in skip:
                        out[prefix + k] = v.detach()
                for k, v in (d.get("_modules") or {}).items():
                    if v is not None:
                        walk(v, prefix + k + ".")
                return
            for k, v in d.items():
                if not k.startswith("_tv_"):
                    walk(v, prefix + k + ".")
            return
        if isinstance(o, dict):
            for k, v in o.items():
                if isinstance(k, str):
                    walk(v, prefix + k + ".")

    walk(obj, "")
    return out


def module_classes(obj: Any) -> set[str]:
    """Qualified names of every class a module pickle instantiated (e.g. to tell which activation
    a pickled CLIP was built with: `open_clip.transformer.QuickGELU` vs `torch.nn...GELU`)."""
    found: set[str] = set()
    seen: set[int] = set()
    todo = [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, Stub):
            found.add(type(o)._tv_qualname)
            todo.extend(v for k, v in o.__dict__.items() if not k.startswith("_tv_"))
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return found
