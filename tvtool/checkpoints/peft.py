"""Read a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

A LoRA-adapted weight ``W`` (module ``M``) changes by ``delta W = s * B @ A`` with ``A = M.lora_A``
[r, in], ``B = M.lora_B`` [out, r] and ``s = alpha / r`` (``alpha / sqrt(r)`` with rslora);
``alpha`` from ``alpha_pattern`` when a pattern names the module (else ``lora_alpha``), ``r`` from
the tensors (so ``rank_pattern`` needs no special case). Embedding adapters store
``lora_embedding_A`` [r, num] and ``lora_embedding_B`` [dim, r]; their delta is ``(B @ A).T``, as
is a ``fan_in_fan_out`` (GPT-2 Conv1D) weight's. ``lora_B.bias`` (``lora_bias``) gives
``delta b = s * bias``. Whole tensors (``modules_to_save``, saved embedding layers) are full
weights whose task vector is ``saved - base``. DoRA and convolution adapters are refused.

Module names are those of the PEFT wrapper (``base_model.model.`` + the model's names); they are
matched against the base checkpoint's keys, whose shared ``model.`` prefix a reader may strip.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvtool.errors import TvtoolError

_WRAPPER = "base_model.model."
_LINEAR = re.compile(r"^(?P<m>.+)\.lora_(?P<w>A|B)(?:\.(?P<a>[^.]+))?\.weight$")
_BIAS = re.compile(r"^(?P<m>.+)\.lora_B(?:\.(?P<a>[^.]+))?\.bias$")
_EMBED = re.compile(r"^(?P<m>.+)\.lora_embedding_(?P<w>A|B)(?:\.(?P<a>[^.]+))?$")
_WHOLE = re.compile(r"\.(modules_to_save\.[^.]+|base_layer|original_module)\.")


@dataclass
class LoraFactor:
    """``delta[key] = scale * B @ A`` (transposed when `transpose`), shape `shape`."""

    key: str  # the base checkpoint's tensor name (``....weight``)
    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool
    shape: tuple[int, ...] = ()


@dataclass
class Adapter:
    path: Path  # the folder
    weights: Path  # adapter_model.safetensors / .bin
    config: dict[str, Any]
    factors: list[LoraFactor] = field(default_factory=list)
    biases: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (name, scale)
    whole: dict[str, str] = field(default_factory=dict)  # base key -> adapter tensor name
    base_layers: dict[str, str] = field(default_factory=dict)  # saved copies of base weights

    def factor(self, key: str) -> LoraFactor:
        if not hasattr(self, "_by_key"):
            self._by_key = {f.key: f for f in self.factors}
        return self._by_key[key]

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "r": c.get("r"),
            "lora_alpha": c.get("lora_alpha"),
            "use_rslora": bool(c.get("use_rslora")),
            "target_modules": c.get("target_modules"),
            "modules_to_save": c.get("modules_to_save"),
            "base_model_name_or_path": c.get("base_model_name_or_path"),
        }


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern applies when the module name ends with it (at a dot boundary)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _base_key(module: str, suffix: str, base_keys: set[str]) -> str | None:
    """The base checkpoint key of `module` + `suffix`, allowing for stripped `model.` prefixes."""
    name = module[len(_WRAPPER):] if module.startswith(_WRAPPER) else module
    while True:
        if name + suffix in base_keys:
            return name + suffix
        if not name.startswith("model."):
            return None
        name = name[len("model."):]


def read_adapter(path: Path | str, base_keys: set[str]) -> Adapter:
    """Parse the adapter folder and match every tensor to a base key (errors name offenders)."""
    from tvtool.checkpoints.readers import open_checkpoint

    folder = Path(path).expanduser()
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise TvtoolError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise TvtoolError(f"{cfg_path}: not readable JSON ({e})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise TvtoolError(f"{cfg_path}: peft_type {config.get('peft_type')!r}; only LORA is read")
    if config.get("use_dora"):
        raise TvtoolError(f"{cfg_path}: DoRA adapters are not supported (use_dora: true)")
    weights = next(
        (folder / f for f in ("adapter_model.safetensors", "adapter_model.bin")
         if (folder / f).is_file()),
        None,
    )
    if weights is None:
        raise TvtoolError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    adapter = Adapter(folder, weights, config)
    alpha0 = float(config.get("lora_alpha", config.get("r", 8)))
    rslora, fan = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
    pairs: dict[tuple[str, bool], dict[str, str]] = {}
    unmatched: list[str] = []
    with open_checkpoint(weights) as reader:  # PEFT names share no strippable prefix
        names = reader.keys()
        shapes = {k: tuple(reader.meta(k).shape) for k in names}
    for name in names:
        if m := _LINEAR.match(name):
            pairs.setdefault((m["m"], False), {})[m["w"]] = name
        elif m := _EMBED.match(name):
            pairs.setdefault((m["m"], True), {})[m["w"]] = name
        elif m := _BIAS.match(name):
            adapter.biases[m["m"]] = (name, 0.0)  # scale filled in below
        else:
            target = _WHOLE.sub(".", name)
            module, _, leaf = target.rpartition(".")
            key = _base_key(module, "." + leaf, base_keys)
            if key is None:
                unmatched.append(name)
            elif re.search(r"\.(base_layer|original_module)\.", name):
                adapter.base_layers[key] = name
            else:
                adapter.whole[key] = name
    for (module, embed), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise TvtoolError(f"{weights}: {module} has lora_{next(iter(ab))} without its pair")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        if len(a) != 2 or len(b) != 2:
            raise TvtoolError(
                f"{weights}: {module} is a {len(a)}-d LoRA (convolution?); only linear and "
                "embedding adapters are read"
            )
        rank = a[0]
        if b[1] != rank:
            raise TvtoolError(f"{weights}: {module}: lora_A {list(a)} and lora_B {list(b)} differ")
        key = _base_key(module, ".weight", base_keys)
        if key is None:
            unmatched.append(module + ".weight")
            continue
        alpha = float(_pattern_value(config.get("alpha_pattern", {}), _strip(module), alpha0))
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        transpose = embed or fan
        shape = (a[1], b[0]) if transpose else (b[0], a[1])
        adapter.factors.append(LoraFactor(key, ab["A"], ab["B"], scale, transpose, shape))
    scales = {f.a.rsplit(".lora_", 1)[0]: f.scale for f in adapter.factors}
    biases = {}
    for module, (name, _) in adapter.biases.items():
        key = _base_key(module, ".bias", base_keys)
        if key is None or module not in scales:
            unmatched.append(name)
            continue
        biases[key] = (name, scales[module])
    adapter.biases = biases
    if unmatched:
        more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
        raise TvtoolError(
            f"{folder}: {len(unmatched)} adapter tensor(s) match no base tensor: "
            f"{', '.join(unmatched[:3])}{more} (adapter of another model?)"
        )
    if not adapter.factors and not adapter.whole:
        raise TvtoolError(f"{weights}: no LoRA tensors found")
    return adapter


def _strip(module: str) -> str:
    return module[len(_WRAPPER):] if module.startswith(_WRAPPER) else module
