"""Reader helpers for tests: an in-memory checkpoint reader, and the content fingerprint
computed independently of tvtool's code."""

from __future__ import annotations

from collections.abc import Callable

import torch


class DictReader:
    """`keys()`, `meta(key)`, `get(key)` over `tensors`; `on_get(key)` sees every read, and
    `copy=True` hands out copies (so a caller that changes them cannot touch the originals)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        on_get: Callable[[str], None] | None = None,
        copy: bool = False,
    ) -> None:
        self.t, self.on_get, self.copy = tensors, on_get, copy

    def keys(self) -> list[str]:
        return sorted(self.t)

    def __contains__(self, k: str) -> bool:
        return k in self.t

    def meta(self, k: str) -> torch.Tensor:
        return self.t[k]

    def get(self, k: str) -> torch.Tensor:
        if self.on_get is not None:
            self.on_get(k)
        return self.t[k].clone() if self.copy else self.t[k]


def content_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """The content fingerprint, computed independently of tvtool's code."""
    import hashlib

    lines = []
    for k in sorted(sd):
        raw = sd[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        dt = str(sd[k].dtype).split(".")[1]
        lines.append(f"{k}\t{dt}\t{list(sd[k].shape)}\t{hashlib.sha256(raw).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
