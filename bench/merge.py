"""Wall time and peak memory of `tvtool merge` (sum, ties) against a naive merge and the I/O
floor, on a synthetic ViT-B/32-sized base (about 88M float32 parameters in 152 tensors) and 8
task vectors stored in a tvtool store.

* naive: load the base and every vector whole (safetensors), merge with dict arithmetic (for
  ties: the reference TIES code on the flattened [T, N] matrix), save; fsync.
* I/O floor: read every input byte once (base + 8 vector blobs) and write as many bytes as the
  output, streamed (1 MB of every input, then 1 MB of output: the fastest chunk size here),
  fsynced, with no arithmetic.
* tvtool: `plan_merge` + `execute_merge` (what the CLI runs), fsync included.

Every measurement runs in its own subprocess (OMP_NUM_THREADS=--threads, default 2: tvtool's
reader thread and two-at-a-time top-k passes; the floor and naive modes are single-threaded
I/O or torch) and reads its peak resident set
(VmHWM in /proc/self/status); wall time excludes the interpreter start and imports; the modes
run interleaved, --repeat rounds (minimum time, largest peak: on a shared machine the minimum
is the least disturbed run; the slow naive TIES once, or never with --skip-naive-ties). The
load average before and after is recorded in the JSON. Before each run,
the previous output is deleted, dirty pages are synced and every input is read into the page
cache, so all modes start alike (warm inputs, fsync of their own output included).

    .venv/bin/python bench/merge.py [--small] [--vectors 8] [--dir /tmp/somewhere]

Prints a table and writes bench/results/merge.json (merge-small.json with --small).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import PEAK_FOOTER  # noqa: E402

CHILD = r"""
import json, os, sys, time
mode, cfg = sys.argv[1], json.loads(sys.argv[2])
import torch
import safetensors.torch as st
from tvtool.store.store import Store
from tvtool.vectors.merge import execute_merge, plan_merge
from tvtool.vectors.recipe import MergeRequest
from tvtool.vectors.terms import Term

base, out, blobs = cfg["base"], cfg["out"], cfg["blobs"]

def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)

def naive_sum():
    b = st.load_file(base)
    vecs = [st.load_file(p) for p in blobs]
    merged = {k: b[k] + sum(0.3 * v[k] for v in vecs) for k in b}
    st.save_file(merged, out)

def naive_ties(density=0.2):
    b = st.load_file(base)
    keys = sorted(b)
    vecs = [st.load_file(p) for p in blobs]
    flat = torch.vstack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vecs])
    del vecs
    n = flat.shape[1]
    k = int(density * n)
    for row in flat:  # trim: keep the top-k magnitudes of each vector
        thr = row.abs().kthvalue(n - k + 1).values
        row.mul_(row.abs() >= thr)
    sign = torch.sign(flat.sum(0))
    agree = (torch.sign(flat) == sign) & (sign != 0)
    merged = (flat * agree).sum(0) / agree.sum(0).clamp(min=1)
    out_sd, i = {}, 0
    for key in keys:
        m = b[key].numel()
        out_sd[key] = b[key] + merged[i:i + m].reshape(b[key].shape)
        i += m
    st.save_file(out_sd, out)

def io_floor():
    # streamed like a merge: a chunk of every input, then a chunk of output, until all is done
    chunk = 1 << 20
    bufs = [memoryview(bytearray(chunk)) for _ in range(1 + len(blobs))]
    fds = [os.open(p, os.O_RDONLY) for p in [base, *blobs]]
    left, off = cfg["out_bytes"], 0
    with open(out, "wb", buffering=0) as f:
        while True:
            got = [os.preadv(fd, [buf], off) for fd, buf in zip(fds, bufs)]
            if left > 0:
                left -= f.write(bufs[0][: min(left, chunk)])
            if not any(got):
                break
            off += chunk
        while left > 0:
            left -= f.write(bufs[0][: min(left, chunk)])
    for fd in fds:
        os.close(fd)

def tvtool(method, scope="global"):
    terms = [Term(ref=d) for d in cfg["digests"]]
    extra = {} if method == "sum" else {"scope": scope}
    req = MergeRequest(base=base, out=out, terms=terms, method=method, force=True, **extra)
    store = Store(cfg["store"])  # as the CLI: the base is hashed while merging
    execute_merge(store, plan_merge(store, req, hash_base=False))

t0 = time.perf_counter()
if mode == "floor":
    io_floor()
elif mode == "naive-sum":
    naive_sum()
elif mode == "naive-ties":
    naive_ties()
elif mode == "tvtool-sum":
    tvtool("sum")
elif mode == "tvtool-ties":
    tvtool("ties")
elif mode == "tvtool-ties-tensor":
    tvtool("ties", "tensor")
elif mode != "import":
    raise SystemExit(f"unknown mode {mode}")
if mode.startswith(("floor", "naive")):
    fsync(out)
""" + PEAK_FOOTER

MODES = [
    ("import", "import only (python + torch + tvtool)"),
    ("floor", "I/O floor: stream inputs once, write output"),
    ("naive-sum", "naive sum: load all, dict arithmetic, save"),
    ("tvtool-sum", "tvtool merge --method sum"),
    ("naive-ties", "naive ties: [T, N] matrix, kthvalue, save"),
    ("tvtool-ties", "tvtool merge --method ties (global)"),
    ("tvtool-ties-tensor", "tvtool merge --method ties --ties-scope tensor"),
]


def make_vectors(store_root: Path, base: Path, n: int) -> list[str]:
    """`n` random task vectors (N(0, 1e-3), seeded per vector and name) written as store
    objects tensor by tensor."""
    import torch

    from tvtool.checkpoints.readers import open_checkpoint
    from tvtool.checkpoints.writer import TensorSpec
    from tvtool.store.store import Store
    from tvtool.vectors.stored import write_tensor_object

    with open_checkpoint(base) as r:
        specs = [TensorSpec(k, r.meta(k).shape, torch.float32) for k in r.keys()]
    store = Store(store_root)
    digests = []
    for t in range(n):
        def produce(s: TensorSpec, t: int = t) -> torch.Tensor:
            g = torch.Generator().manual_seed(t * 1_000_003 + zlib.crc32(s.name.encode()))
            return torch.randn(s.shape, generator=g) * 1e-3

        digests.append(write_tensor_object(store, "vector", specs, produce).digest)
    return digests


def settle(cfg: dict) -> None:
    """Same start for every mode: no output, no dirty pages, every input in the page cache."""
    Path(cfg["out"]).unlink(missing_ok=True)
    os.sync()
    buf = memoryview(bytearray(16 << 20))
    for p in [cfg["base"], *cfg["blobs"]]:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def measure(mode: str, cfg: dict) -> tuple[int, float]:
    settle(cfg)
    env = {"OMP_NUM_THREADS": str(cfg["threads"]), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(HERE.parent)}  # this tree's tvtool, not an installed one
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, json.dumps(cfg)], capture_output=True, text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout.split()
    return int(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true",
                    help="quick smoke run: width x0.25 (~6M params); fixed costs dominate, so "
                    "the targets are only meaningful at full size")
    ap.add_argument("--vectors", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every mode")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per mode, minimum wall time reported (naive ties: always 1)")
    ap.add_argument("--skip-naive-ties", action="store_true",
                    help="skip the slow naive TIES reference (minutes at full size)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = ap.parse_args()
    scale = 0.25 if args.small else 1.0
    out_json = args.out or HERE / "results" / ("merge-small.json" if args.small else "merge.json")

    from synthetic import make_vit_b32_like, n_params, vit_b32_shapes

    from tvtool.store.store import Store

    shapes = vit_b32_shapes(scale)
    params = n_params(shapes)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        base = make_vit_b32_like(work / "base.safetensors", seed=0, scale=scale)
        digests = make_vectors(work / "store", base, args.vectors)
        store = Store(work / "store")
        cfg = {
            "base": str(base), "out": str(work / "out.safetensors"), "store": str(work / "store"),
            "digests": digests, "blobs": [str(store.blob_path(d)) for d in digests],
            "out_bytes": base.stat().st_size, "threads": args.threads,
        }
        rows = []
        load_before = os.getloadavg()
        modes = [(m, lbl) for m, lbl in MODES if not (args.skip_naive_ties and m == "naive-ties")]
        results: dict[str, list[tuple[int, float]]] = {m: [] for m, _ in modes}
        for r in range(args.repeat):  # interleaved rounds: load changes hit every mode alike
            for mode, _ in modes:
                if mode != "naive-ties" or r == 0:
                    results[mode].append(measure(mode, cfg))
        load_after = os.getloadavg()
        for mode, label in modes:
            runs = results[mode]
            hwm, wall = max(h for h, _ in runs), min(w for _, w in runs)
            rows.append({"mode": mode, "label": label, "peak_rss_mb": hwm / 1e6, "wall_s": wall,
                         "runs_s": [w for _, w in runs]})
            print(f"  {label:<48} {hwm / 1e6:>8.0f} MB {wall:>8.2f} s", file=sys.stderr)
    by = {r["mode"]: r for r in rows}
    floor_s = by["floor"]["wall_s"]
    for r in rows:
        r["over_import_mb"] = r["peak_rss_mb"] - by["import"]["peak_rss_mb"]
        r["x_io_floor"] = r["wall_s"] / floor_s if r["mode"] != "import" else None
    targets = {  # issue 11
        "tvtool-sum: time <= 1.3x I/O floor": by["tvtool-sum"]["wall_s"] <= 1.3 * floor_s,
        "tvtool-ties: time <= 3x I/O floor": by["tvtool-ties"]["wall_s"] <= 3 * floor_s,
        "tvtool-sum: peak RSS < 25% of naive sum":
            by["tvtool-sum"]["peak_rss_mb"] < 0.25 * by["naive-sum"]["peak_rss_mb"],
    }
    if "naive-ties" in by:
        targets["tvtool-ties: peak RSS < 25% of naive ties"] = (
            by["tvtool-ties"]["peak_rss_mb"] < 0.25 * by["naive-ties"]["peak_rss_mb"]
        )
    info = {"parameters": params, "tensors": len(shapes), "vectors": args.vectors,
            "checkpoint_mb": params * 4 / 1e6, "small": args.small, "threads": args.threads,
            "repeat": args.repeat, "statistic": "min", "cpus": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": load_after,
            "rows": rows, "targets": targets}
    print(f"synthetic ViT-B/32-like base: {params / 1e6:.1f}M params in {len(shapes)} tensors "
          f"({params * 4 / 1e6:.0f} MB), {args.vectors} task vectors, {args.threads} threads")
    print(f"{'mode':<48} {'peak RSS MB':>11} {'over import':>11} {'wall s':>7} {'x floor':>7}")
    for r in rows:
        x = f"{r['x_io_floor']:.2f}" if r["x_io_floor"] is not None else "-"
        print(f"{r['label']:<48} {r['peak_rss_mb']:>11.0f} {r['over_import_mb']:>11.0f} "
              f"{r['wall_s']:>7.2f} {x:>7}")
    for name, ok in targets.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
