"""Time and peak memory of `tvtool extract` vs a naive load-both-subtract-save and the I/O floor
(read both inputs, write one output, fsync), on a synthetic
ViT-B/32-sized pair (about 88M float32 parameters, 351 MB per checkpoint).

Modes run interleaved `--repeat` times and the fastest run of each counts; before every run the
parent calls sync(), so that no mode pays for the writeback of the previous one's output (the
naive save leaves 351 MB of dirty pages that the next run's fsync would otherwise wait behind).
Every measurement runs in a fresh subprocess and reads its peak resident set size (VmHWM in
/proc/self/status); "import only" is the interpreter with torch and tvtool imported, so the
other rows' "over import" column is what the work itself costs.

    .venv/bin/python bench/extract.py [--scale 1.0] [--dir /tmp/somewhere]

Writes bench/results/extract.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import PEAK_FOOTER, print_rows_and_save  # noqa: E402

CHILD = r"""
import sys, time
mode, base, ft, work = sys.argv[1:5]
import torch
import safetensors.torch
from tvtool.store.store import Store
from tvtool.vectors.extract import extract_vector
if mode == "tvtool-warm":  # the base's fingerprint cached, as after one extract against it
    from tvtool.checkpoints.fingerprint import FingerprintCache
    from tvtool.checkpoints.readers import open_checkpoint
    with open_checkpoint(base) as r:
        r.fingerprint()
        FingerprintCache(work + "/store-warm/cache/fingerprints").put(r)
t0 = time.perf_counter()
if mode == "tvtool":
    extract_vector(Store(work + "/store"), base, ft)
elif mode == "tvtool-warm":
    extract_vector(Store(work + "/store-warm"), base, ft)
elif mode == "tvtool-fp16":
    extract_vector(Store(work + "/store16"), base, ft, dtype=torch.float16)
elif mode == "naive":
    b = safetensors.torch.load_file(base)
    f = safetensors.torch.load_file(ft)
    tau = {k: f[k] - b[k] for k in b}
    safetensors.torch.save_file(tau, work + "/naive.safetensors")
elif mode == "floor":  # read both inputs once, write and fsync an output of the same size
    import os
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    for p in (base, ft):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    size = os.path.getsize(base)
    with open(work + "/floor.bin", "wb", buffering=0) as f:
        for i in range(0, size, len(buf)):
            f.write(view[: min(len(buf), size - i)])
        os.fsync(f.fileno())
    os.unlink(work + "/floor.bin")
elif mode != "import":
    raise SystemExit(f"unknown mode {mode}")
""" + PEAK_FOOTER

MODES = [
    ("import", "import only (python + torch + tvtool)"),
    ("floor", "I/O floor: read both, write one, fsync"),
    ("tvtool", "tvtool extract (fp32)"),
    ("tvtool-warm", "tvtool extract, base fingerprint cached"),
    ("tvtool-fp16", "tvtool extract (--dtype fp16)"),
    ("naive", "naive: load both, subtract, save"),
]


def measure(mode: str, base: Path, ft: Path, work: Path) -> tuple[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(base), str(ft), str(work)],
        check=True, capture_output=True, text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE.parent)},
    ).stdout.split()
    return int(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="width factor (1.0 = ViT-B/32)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "extract.json")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs; the minimum counts")
    ap.add_argument("--note", default=None, help="recorded with the result (e.g. the conditions)")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]  # other work on the machine, recorded with the result

    from synthetic import make_finetuned, make_vit_b32_like, n_params, vit_b32_shapes

    shapes = vit_b32_shapes(args.scale)
    params = n_params(shapes)
    largest = max(n_params({k: s}) for k, s in shapes.items())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        base = make_vit_b32_like(work / "base.safetensors", seed=0, scale=args.scale)
        ft = make_finetuned(base, work / "ft.safetensors", seed=1, noise=1e-3)
        runs: dict[str, list[tuple[int, float]]] = {m: [] for m, _ in MODES}
        for _ in range(args.repeat):  # interleaved, so that load changes hit every mode alike
            for mode, _label in MODES:
                if mode.startswith("tvtool"):  # a fresh store: every run really writes
                    for sub in ("store", "store16", "store-warm"):
                        shutil.rmtree(work / sub, ignore_errors=True)
                os.sync()  # no run pays for the writeback of the one before (naive's output)
                runs[mode].append(measure(mode, base, ft, work))
        rows = []
        for mode, label in MODES:
            hwm = min(h for h, _ in runs[mode])
            wall = min(w for _, w in runs[mode])
            rows.append({"mode": mode, "label": label, "peak_rss_mb": hwm / 1e6, "wall_s": wall,
                         "all_wall_s": [w for _, w in runs[mode]]})
    floor = rows[0]["peak_rss_mb"]
    for r in rows:
        r["over_import_mb"] = r["peak_rss_mb"] - floor
    wall = {r["mode"]: r["wall_s"] for r in rows}
    ratios = {
        "tvtool_over_naive": wall["tvtool"] / wall["naive"],
        "tvtool_over_floor": wall["tvtool"] / wall["floor"],
        "warm_over_naive": wall["tvtool-warm"] / wall["naive"],
        "warm_over_floor": wall["tvtool-warm"] / wall["floor"],
        "targets": {"tvtool_over_naive": 1.3, "tvtool_over_floor": 1.5},
    }
    info = {
        "parameters": params,
        "tensors": len(shapes),
        "checkpoint_mb": params * 4 / 1e6,
        "largest_tensor_mb": largest * 4 / 1e6,
        "rows": rows,
        "ratios": ratios,
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],  # start, end
    }
    if args.note:
        info["note"] = args.note
    print(f"synthetic ViT-B/32-like pair: {params / 1e6:.1f}M params in {len(shapes)} tensors, "
          f"{params * 4 / 1e6:.0f} MB per checkpoint, largest tensor {largest * 4 / 1e6:.1f} MB")
    print(f"tvtool / naive {ratios['tvtool_over_naive']:.2f} (target <= 1.3), "
          f"tvtool / I/O floor {ratios['tvtool_over_floor']:.2f} (target <= 1.5); base cached: "
          f"{ratios['warm_over_naive']:.2f} and {ratios['warm_over_floor']:.2f}")
    print_rows_and_save(rows, info, args.out)


if __name__ == "__main__":
    main()
