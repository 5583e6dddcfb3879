"""tvtool merge against mergekit 0.1.5 on the same Llama-shaped checkpoints: wall time, peak RSS,
and the outputs compared numerically where the methods agree.

Builds a random-weight Llama-shaped model (transformers' LlamaConfig, ~330M float32 parameters in
3 safetensors shards; `--small`: ~7M in 2 shards) as an HF folder, plus 4 fine-tunes (base +
small noise on every tensor). Then, interleaved, `--repeat` times (minimum wall, largest peak):

* floor: read every input byte once and write one model's bytes, fsynced (no arithmetic);
* task arithmetic of the 4 fine-tunes at weight 0.25: `tvtool merge --base BASE FT1:0.25 ...`
  (checkpoints as terms: the task vectors are computed on the fly, nothing is stored) and
  mergekit's `task_arithmetic`;
* TIES per tensor, density 0.5, weights 1: `tvtool merge --method ties --ties-scope tensor` and
  mergekit's `ties` (normalize: true); tvtool's TIES with the global top-k (no mergekit peer).

Each run is its own process (`OMP_NUM_THREADS` as given, default 2: both cores); peak RSS is its
ru_maxrss. mergekit runs from its own virtualenv (`--mergekit-venv`; made by this script with
`pip install --no-deps mergekit==0.1.5 immutables`, reusing this interpreter's torch and
transformers through a .pth file); when that cannot be done the mergekit rows are skipped with a
message. Outputs are compared tensor by tensor (max |difference|): task arithmetic and per-tensor
TIES follow the same rules in both tools (see the README's table of differences).

    .venv/bin/python bench/merge_vs_mergekit.py [--small] [--repeat 4] [--dir /tmp/somewhere]
        [--no-mergekit]

Prints a table and writes bench/results/merge_vs_mergekit.json (-small.json with --small).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)


def build(root: Path, shape: dict, shards: int, fine_tunes: int) -> list[Path]:
    """base/ and ft1..ftN/ HF folders (config.json, sharded safetensors + index)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=512, torch_dtype="float32",
                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device("meta"):
        names = {k: (tuple(v.shape)) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    folders = []
    for m in range(fine_tunes + 1):
        folder = root / ("base" if m == 0 else f"ft{m}")
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
        g = torch.Generator().manual_seed(1000 + m)
        keys = sorted(names)
        per = -(-len(keys) // shards)
        weight_map, total = {}, 0
        for s in range(shards):
            part = {}
            for k in keys[s * per:(s + 1) * per]:
                base_g = torch.Generator().manual_seed(zlib.crc32(k.encode()))
                t = torch.randn(names[k], generator=base_g) * 0.02
                if m:
                    t += torch.randn(names[k], generator=g) * 0.002
                part[k] = t
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, folder / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
            total += sum(t.numel() * 4 for t in part.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        folders.append(folder)
    return folders


def mergekit_python(venv: Path) -> tuple[Path | None, str]:
    """The mergekit venv's python (made if needed), or None and why not."""
    py = venv / "bin" / "python"
    probe = "import mergekit.merge, mergekit.config"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py, "ok"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                       capture_output=True)
        site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "tvtool-shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--target", site,
                        "mergekit==0.1.5", "immutables"], check=True, capture_output=True,
                       timeout=600)
        subprocess.run([py, "-c", probe], check=True, capture_output=True)
        return py, "installed"
    except (subprocess.SubprocessError, OSError) as e:
        err = getattr(e, "stderr", b"") or b""
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else [str(e)]
        return None, f"mergekit could not be installed in {venv}: {' '.join(tail)}"


def run(cmd: list, env: dict) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


FLOOR = r"""
import os, sys
files, out = sys.argv[1:-1], sys.argv[-1]
total = 0
for f in files:
    with open(f, "rb", buffering=0) as fh:
        while b := fh.read(1 << 24):
            total += len(b)
size = sum(os.path.getsize(f) for f in files if "/base/" in f)
with open(out, "wb") as fh:
    block = b"\0" * (1 << 24)
    left = size
    while left > 0:
        left -= fh.write(block[: min(left, len(block))])
    fh.flush()
    os.fsync(fh.fileno())
"""


def load(path: Path) -> dict:
    from tvtool.checkpoints.readers import open_checkpoint

    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


def compare(a: Path, b: Path) -> dict:
    """max |a - b| over the tensors of two merged folders (keys must agree), and how many
    entries differ by more than 1e-6 (mergekit breaks ties at the top-k threshold
    arbitrarily, tvtool by index)."""
    x, y = load(a), load(b)
    if set(x) != set(y):
        raise SystemExit(f"outputs have different keys: {sorted(set(x) ^ set(y))[:5]}")
    diffs = {k: (x[k].double() - y[k].double()).abs() for k in x}
    return {"max_abs_diff": max(float(d.max()) for d in diffs.values()),
            "entries_over_1e-6": sum(int((d > 1e-6).sum()) for d in diffs.values()),
            "entries": sum(d.numel() for d in diffs.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--no-mergekit", action="store_true",
                    help="tvtool and the floor only (the mergekit rows are left out)")
    ap.add_argument("--note", default=None, help="recorded with the result (the conditions)")
    ap.add_argument("--mergekit-venv", type=Path,
                    default=Path(tempfile.gettempdir()) / "tvtool-mergekit-venv")
    args = ap.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="tvtool-vs-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    shape, shards = (SMALL, 2) if args.small else (FULL, 3)
    t0 = time.perf_counter()
    # built (and later compared) in child processes: a child's peak RSS counts its parent's
    # resident memory at fork, so this process stays free of torch while it measures
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from merge_vs_mergekit import "
            "build; from pathlib import Path; build(Path(sys.argv[2]), json.loads(sys.argv[3]), "
            "int(sys.argv[4]), 4)")
    marker = work / "models" / "built.json"  # a --dir holding these models already: reused
    spec = json.dumps({"shape": shape, "shards": shards})
    if not marker.exists() or marker.read_text() != spec:
        subprocess.run([sys.executable, "-c", code, str(HERE), str(work / "models"),
                        json.dumps(shape), str(shards)], check=True)
        marker.write_text(spec)
    folders = [work / "models" / n for n in ("base", "ft1", "ft2", "ft3", "ft4")]
    print(f"built the models in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    base, fts = folders[0], folders[1:]
    inputs = [p for f in folders for p in sorted(f.glob("*.safetensors"))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT),
           "TVTOOL_HOME": str(work / "store")}
    mk, why = (None, "skipped (--no-mergekit)") if args.no_mergekit else mergekit_python(
        args.mergekit_venv)
    if mk is None:
        print(f"skipping mergekit: {why}", file=sys.stderr)
    tv = [sys.executable, "-m", "tvtool", "merge", "--base", base, "-q", "--force"]

    def mk_config(name: str, method: str, params: dict, weight: float) -> Path:
        doc = {"merge_method": method, "base_model": str(base), "dtype": "float32",
               "parameters": params,
               "models": [{"model": str(f), "parameters": {"weight": weight}} for f in fts]}
        path = work / f"{name}.json"
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path

    def out(name: str) -> Path:
        p = work / "out" / name
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
        return p

    cases: dict[str, list] = {
        "floor": [sys.executable, "-c", FLOOR, *inputs, work / "floor.bin"],
        # what every tvtool row pays before it reads a byte (the floor script does not)
        "tvtool start-up only": [
            sys.executable, "-c", "import torch, tvtool.vectors.merge, tvtool.cli.app"],
        # a fresh store each time: every input hashed (the runs below find the fingerprints in
        # the store's cache, as after any extract or merge of unchanged files)
        "tvtool sum, inputs not hashed before": [
            *tv, "--out", "{out}", *(f"{f}:0.25" for f in fts)],
        "tvtool sum": [*tv, "--out", "{out}", *(f"{f}:0.25" for f in fts)],
        "tvtool ties tensor": [*tv, "--out", "{out}", "--method", "ties", "--ties-scope",
                               "tensor", "--density", "0.5", *map(str, fts)],
        "tvtool ties global": [*tv, "--out", "{out}", "--method", "ties", "--density", "0.5",
                               *map(str, fts)],
    }
    if mk is not None:
        mkyaml = [mk, "-m", "mergekit.scripts.run_yaml"]
        ta = mk_config("ta", "task_arithmetic", {}, 0.25)
        ties = mk_config("ties", "ties", {"density": 0.5, "normalize": True}, 1.0)
        cases["mergekit task_arithmetic"] = [*mkyaml, ta, "{out}", "--quiet", "-j", "1"]
        cases["mergekit ties"] = [*mkyaml, ties, "{out}", "--quiet", "-j", "1"]
    rows: dict[str, dict] = {k: {"wall_s": float("inf"), "peak_rss_mb": 0.0} for k in cases}
    load_before = os.getloadavg()
    for _ in range(args.repeat):  # interleaved: every case once per round
        for name, cmd in cases.items():
            target = out(name.replace(" ", "-"))
            for f in inputs:  # warm page cache, as every case sees it
                Path(f).read_bytes()
            cold = name.endswith("not hashed before")
            if cold:
                shutil.rmtree(work / "store-cold", ignore_errors=True)
            wall, rss = run([str(target) if c == "{out}" else c for c in cmd],
                            {**env, "TVTOOL_HOME": str(work / "store-cold")} if cold else env)
            rows[name]["wall_s"] = min(rows[name]["wall_s"], wall)
            rows[name]["peak_rss_mb"] = max(rows[name]["peak_rss_mb"], rss / 2**20)
    floor = rows["floor"]["wall_s"]
    checks = {}
    if mk is not None:
        code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from merge_vs_mergekit import "
                "compare; print(json.dumps({'task arithmetic': compare(*sys.argv[2:4]), "
                "'ties per tensor': compare(*sys.argv[4:6])}))")
        o = work / "out"
        checks = json.loads(subprocess.run(
            [sys.executable, "-c", code, str(HERE), o / "tvtool-sum",
             o / "mergekit-task_arithmetic", o / "tvtool-ties-tensor", o / "mergekit-ties"],
            check=True, capture_output=True, text=True, env=env).stdout)
    print(f"{'run':<28} {'wall s':>8} {'x floor':>8} {'peak RSS MB':>12}")
    for name, r in rows.items():
        r["x_floor"] = r["wall_s"] / floor
        print(f"{name:<28} {r['wall_s']:>8.2f} {r['x_floor']:>8.2f} {r['peak_rss_mb']:>12.0f}")
    startup = rows["tvtool start-up only"]["wall_s"]
    ratios = {"sum vs floor + start-up": rows["tvtool sum"]["wall_s"] / (floor + startup)}
    if mk is not None:
        ratios["sum vs mergekit"] = rows["tvtool sum"]["wall_s"] / rows[
            "mergekit task_arithmetic"]["wall_s"]
        ratios["ties vs mergekit"] = rows["tvtool ties tensor"]["wall_s"] / rows[
            "mergekit ties"]["wall_s"]
    targets = {  # issue 11
        "tvtool sum <= 1.5x floor": rows["tvtool sum"]["x_floor"] <= 1.5,
        "tvtool ties tensor <= 3x floor": rows["tvtool ties tensor"]["x_floor"] <= 3.0,
    }
    if mk is not None:
        targets["sum <= 0.5x mergekit"] = ratios["sum vs mergekit"] <= 0.5
        targets["ties <= 0.2x mergekit"] = ratios["ties vs mergekit"] <= 0.2
        mk_rss = min(rows["mergekit task_arithmetic"]["peak_rss_mb"],
                     rows["mergekit ties"]["peak_rss_mb"])
        targets["peak RSS below mergekit's"] = all(
            r["peak_rss_mb"] < mk_rss for k, r in rows.items() if k.startswith("tvtool"))
    for k, v in ratios.items():
        print(f"{k:<28} {v:.3g}")
    for k, ok in targets.items():
        print(f"  [{'met' if ok else 'MISSED'}] {k}")
    for k, v in checks.items():
        print(f"{k:<28} max |diff| {v['max_abs_diff']:.3g}, {v['entries_over_1e-6']} of "
              f"{v['entries']} entries differ by more than 1e-6")
    params = sum(p.stat().st_size for p in base.glob("*.safetensors")) // 4
    info = {"small": args.small, "parameters": params, "shards": shards, "fine_tunes": len(fts),
            "threads": args.threads, "repeat": args.repeat, "mergekit": why, "rows": rows,
            "ratios": ratios, "targets": targets, "checks": checks, "cpus": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}
    if args.note:
        info["note"] = args.note
    name = "merge_vs_mergekit-small.json" if args.small else "merge_vs_mergekit.json"
    dest = HERE / "results" / name
    dest.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {dest}")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
