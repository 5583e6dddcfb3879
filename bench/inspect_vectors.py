"""Time and peak memory of `tvtool inspect` on eight ViT-B/32-sized task vectors (about 88M
float32 parameters, 351 MB each) against reading them once (every tensor of every vector, the
floor) and a naive cosine matrix that holds every vector in memory.

Each measurement runs in a fresh subprocess (one torch thread: inspect uses both cores through its
two worker threads) and reads its peak resident set size (VmHWM); "import only" is the interpreter
with torch and tvtool imported. Modes run interleaved `--repeats` times; the fastest run of
each is kept. Target: inspect <= 2x the read.

    .venv/bin/python bench/inspect_vectors.py [--vectors 8] [--scale 1.0] [--dir /tmp/somewhere]

Writes bench/results/inspect.json. Needs about vectors x 351 MB of disk at scale 1.0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (not named inspect.py: run as a script, bench/ is first on sys.path and would shadow the
# standard library's `inspect`, which torch imports)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import PEAK_FOOTER, print_rows_and_save  # noqa: E402

CHILD = r"""
import sys, time
mode, root, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
import torch
from tvtool.store.store import Store
from tvtool.vectors.stats import inspect_store
from tvtool.vectors.stored import open_tensor_object
store = Store(root)
t0 = time.perf_counter()
if mode == "read":
    for n in names:
        _, r = open_tensor_object(store, n)
        with r:
            for k in r.keys():
                r.get(k)
elif mode == "tvtool":
    report = inspect_store(store, names)
elif mode == "tvtool-per-block":
    report = inspect_store(store, names, per_block=True)
elif mode == "naive":
    rows = None
    for i, n in enumerate(names):
        _, r = open_tensor_object(store, n)
        with r:
            flat = torch.cat([r.get(k).reshape(-1) for k in r.keys()])
        if rows is None:
            rows = torch.empty(len(names), flat.numel())
        rows[i] = flat
        del flat
    norms = rows.norm(dim=1, keepdim=True)
    cos = (rows @ rows.T) / (norms * norms.T)
elif mode != "import":
    raise SystemExit(f"unknown mode {mode}")
""" + PEAK_FOOTER

MODES = [
    ("import", "import only (python + torch + tvtool)"),
    ("read", "read every tensor once (floor)"),
    ("tvtool", "tvtool inspect"),
    ("tvtool-per-block", "tvtool inspect --per-block"),
    ("naive", "naive: every vector in memory"),
]


def make_vectors(root: Path, count: int, scale: float) -> list[str]:
    """`count` random vectors sharing a common component (so cosines are not all zero)."""
    import torch
    from synthetic import _gen, vit_b32_shapes

    from tvtool.checkpoints.writer import TensorSpec
    from tvtool.store.store import Store
    from tvtool.vectors.stored import write_tensor_object

    store = Store(root)
    specs = [TensorSpec(k, s, torch.float32) for k, s in vit_b32_shapes(scale).items()]
    names = []
    for i in range(count):
        def produce(spec: TensorSpec, i: int = i) -> torch.Tensor:
            shared = torch.randn(spec.shape, generator=_gen(999, spec.name))
            own = torch.randn(spec.shape, generator=_gen(i, spec.name))
            return 1e-3 * (0.5 * shared + own)

        m = write_tensor_object(store, "vector", specs, produce)
        store.set_ref(f"bench/v{i}", m.digest)
        names.append(f"bench/v{i}")
    return names


def measure(mode: str, root: Path, names: list[str]) -> tuple[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(root), ",".join(names)],
        check=True, capture_output=True, text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE.parent)},
    ).stdout.split()
    return int(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0, help="width factor (1.0 = ViT-B/32)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of every mode")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "inspect.json")
    ap.add_argument("--note", default=None, help="recorded with the result (e.g. the conditions)")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]  # other work on the machine, recorded with the result

    from synthetic import n_params, vit_b32_shapes

    shapes = vit_b32_shapes(args.scale)
    params = n_params(shapes)
    largest = max(n_params({k: s}) for k, s in shapes.items())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "store"
        t0 = time.perf_counter()
        names = make_vectors(root, args.vectors, args.scale)
        print(f"wrote {args.vectors} vectors in {time.perf_counter() - t0:.1f} s")
        best: dict[str, tuple[int, float]] = {}
        for _ in range(args.repeats):
            for mode, _label in MODES:
                hwm, wall = measure(mode, root, names)
                if mode not in best or wall < best[mode][1]:
                    best[mode] = (hwm, wall)
        rows = [
            {"mode": m, "label": label, "peak_rss_mb": best[m][0] / 1e6, "wall_s": best[m][1]}
            for m, label in MODES
        ]
    floor = rows[0]["peak_rss_mb"]
    read = rows[1]["wall_s"]
    for r in rows:
        r["over_import_mb"] = r["peak_rss_mb"] - floor
        r["x_read"] = r["wall_s"] / read if r["mode"] != "import" else None
    info = {
        "vectors": args.vectors,
        "parameters_per_vector": params,
        "vector_mb": params * 4 / 1e6,
        "largest_tensor_mb": largest * 4 / 1e6,
        "repeats": args.repeats,
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],  # start, end
        "rows": rows,
        "target": {"tvtool_x_read_max": 2.0},
    }
    if args.note:
        info["note"] = args.note
    print(f"{args.vectors} vectors of {params / 1e6:.1f}M params ({params * 4 / 1e6:.0f} MB each), "
          f"largest tensor {largest * 4 / 1e6:.1f} MB")
    print_rows_and_save(rows, info, args.out)
    tv = next(r for r in rows if r["mode"] == "tvtool")
    print(f"tvtool inspect: {tv['x_read']:.2f}x the time of reading the vectors once "
          "(target <= 2)")


if __name__ == "__main__":
    main()
