"""The local content-addressed store (torch-free)."""

from tvtool.store.manifest import Manifest, TensorInfo, canonical_json
from tvtool.store.store import Store, default_root

__all__ = ["Manifest", "Store", "TensorInfo", "canonical_json", "default_root"]
