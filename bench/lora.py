"""LoRA adapters stored factored: store size and peak memory of `extract --lora` and of merging the
factored vector, against the dense vector and a naive expand-everything-in-memory merge.

A synthetic Llama-like base (``--layers`` decoder layers of width ``--hidden``, q/k/v/o and a gated
MLP) and a rank-``--rank`` adapter on all seven linear modules, in PEFT's file layout. Every
measurement runs in a fresh subprocess and reads its peak RSS (VmHWM).

    .venv/bin/python bench/lora.py [--hidden 1024] [--layers 8] [--rank 16] [--dir /tmp/x]

Writes bench/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import PEAK_FOOTER, print_rows_and_save  # noqa: E402

MODULES = {"q_proj": (1, 1), "k_proj": (1, 1), "v_proj": (1, 1), "o_proj": (1, 1),
           "gate_proj": (1, 2.6875), "up_proj": (1, 2.6875), "down_proj": (2.6875, 1)}

CHILD = r"""
import sys, time
mode, base, adapter, work = sys.argv[1:5]
import torch
from tvtool.store.store import Store
t0 = time.perf_counter()
if mode == "extract-lora":
    from tvtool.vectors.lora import extract_lora
    m = extract_lora(Store(work + "/store"), base, adapter, name="lora").manifest
    print(m.size, m.params["dense_numel"] * 4, file=sys.stderr)
elif mode == "merge-factored":
    from tvtool.vectors.merge import execute_merge, plan_merge
    from tvtool.vectors.recipe import MergeRequest
    from tvtool.vectors.terms import parse_term
    req = MergeRequest(base=base, out=work + "/merged.safetensors", terms=[parse_term("lora:1")],
                       force=True)
    execute_merge(Store(work + "/store"), plan_merge(Store(work + "/store"), req))
elif mode == "naive":
    from safetensors.torch import load_file, save_file
    b = load_file(base)
    a = load_file(adapter + "/adapter_model.safetensors")
    for k in list(b):
        m = "base_model.model." + k[: -len(".weight")]
        if m + ".lora_A.weight" in a:
            b[k] = b[k] + 2.0 * a[m + ".lora_B.weight"] @ a[m + ".lora_A.weight"]
    save_file(b, work + "/naive.safetensors")
elif mode != "import":
    raise SystemExit(f"unknown mode {mode}")
""" + PEAK_FOOTER

MODES = [
    ("import", "import only (python + torch + tvtool)"),
    ("extract-lora", "tvtool extract --lora (factored)"),
    ("merge-factored", "tvtool merge of the factored vector"),
    ("naive", "naive: load all, expand every delta, save"),
]


def make(work: Path, hidden: int, layers: int, rank: int) -> tuple[Path, Path, int]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base, lora = {}, {}
    for i in range(layers):
        for m, (fi, fo) in MODULES.items():
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"model.layers.{i}.{part}.{m}"
            n_in, n_out = int(hidden * fi), int(hidden * fo)
            base[key + ".weight"] = torch.randn(n_out, n_in, generator=g) * 0.02
            lora[f"base_model.model.{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g)
            lora[f"base_model.model.{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g)
    base_path = work / "base.safetensors"
    save_file(base, str(base_path))
    adapter = work / "adapter"
    adapter.mkdir()
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}
    ))
    return base_path, adapter, sum(t.numel() for t in base.values())


def measure(mode: str, base: Path, adapter: Path, work: Path) -> tuple[int, float, str]:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(base), str(adapter), str(work)],
        check=True, capture_output=True, text=True, env=env,
    )
    out = res.stdout.split()
    return int(out[0]), float(out[1]), res.stderr.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lora.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        base, adapter, params = make(work, args.hidden, args.layers, args.rank)
        rows, sizes = [], {}
        for mode, label in MODES:
            hwm, wall, note = measure(mode, base, adapter, work)
            if mode == "extract-lora":
                stored, dense = (int(x) for x in note.split()[-2:])
                sizes = {"stored_bytes": stored, "dense_bytes": dense}
            rows.append({"mode": mode, "label": label, "peak_rss_mb": hwm / 1e6, "wall_s": wall})
    floor = rows[0]["peak_rss_mb"]
    for r in rows:
        r["over_import_mb"] = r["peak_rss_mb"] - floor
    info = {"parameters": params, "hidden": args.hidden, "layers": args.layers,
            "rank": args.rank, **sizes, "rows": rows}
    print(f"synthetic Llama-like base: {params / 1e6:.1f}M params ({params * 4 / 1e6:.0f} MB); "
          f"rank-{args.rank} adapter on {len(MODULES)} modules x {args.layers} layers")
    ratio = sizes["dense_bytes"] / sizes["stored_bytes"]
    print(f"stored factored vector {sizes['stored_bytes'] / 1e6:.1f} MB, the dense vector would "
          f"be {sizes['dense_bytes'] / 1e6:.0f} MB ({ratio:.0f}x)")
    print_rows_and_save(rows, info, args.out)


if __name__ == "__main__":
    main()
