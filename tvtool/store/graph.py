"""What refs reach: the one walk over objects and the inputs their manifests name. Torch-free.

Refs are the roots. An object is *present* when its data or its manifest is on disk, so
reachability never depends on manifests being intact: a reached object whose manifest is
missing or corrupt is still reached (gc keeps its data, verify reports it), it just has no
known inputs to follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tvtool.errors import TvtoolError
from tvtool.store.manifest import Manifest
from tvtool.store.names import is_digest
from tvtool.store.store import Store


def edges(manifest: Manifest) -> list[str]:
    """Digests an object depends on: its `inputs`, and a coefs layout's vectors."""
    out = list(manifest.inputs)
    layout = manifest.params.get("layout") if isinstance(manifest.params, dict) else None
    vectors = layout.get("vectors") if isinstance(layout, dict) else None
    if isinstance(vectors, list):
        out += [v for v in vectors if isinstance(v, str)]
    return list(dict.fromkeys(d for d in out if is_digest(d)))


@dataclass
class Reach:
    """Result of a walk: present objects in a stable order (each root, then its inputs depth
    first), reached objects that are gone (digest -> who names it), and present ones whose
    manifest is missing or unreadable."""

    order: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)

    def __contains__(self, digest: str) -> bool:
        return digest in self._seen

    def __post_init__(self) -> None:
        self._seen: set[str] = set(self.order)


def walk(store: Store, roots: Iterable[tuple[str, str]]) -> Reach:
    """Walk from `(digest, who)` roots (`who` says why it is a root, for messages)."""
    reach = Reach()
    stack = [(d, who) for d, who in reversed(list(roots)) if is_digest(d)]
    while stack:
        d, who = stack.pop()
        if d in reach or d in reach.missing:
            continue
        has_manifest = store.manifest_path(d).exists()
        if not has_manifest and not store.blob_path(d).exists():
            reach.missing[d] = who
            continue
        reach.order.append(d)
        reach._seen.add(d)
        try:
            manifest = store.manifest(d) if has_manifest else None
        except TvtoolError:
            manifest = None
        if manifest is None:
            reach.damaged.append(d)
            continue
        stack.extend((e, f"input of {d[:12]}") for e in reversed(edges(manifest)))
    return reach


def closure(store: Store, digests: Iterable[str]) -> list[str]:
    """The given objects and, transitively, everything they depend on that is present."""
    return walk(store, ((d, "given") for d in digests)).order


def from_refs(store: Store) -> Reach:
    """Everything the refs reach."""
    return walk(store, ((d, f"ref {n!r}") for n, d in store.refs().items()))
