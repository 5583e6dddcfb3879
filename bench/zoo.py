"""Timings of every stage of the example zoo and of `tvtool demo` (the README's main job).

Builds the zoo from scratch in a temporary directory (nothing cached), then runs the demo on it,
and prints three tables: the zoo's stages (data, pre-training, each fine-tuning), the demo's
stages, and the slowest commands the demo ran. Target: the whole demo (zoo included) under 10
minutes on 2 CPU cores; the small zoo in about a minute.

    .venv/bin/python bench/zoo.py            # full zoo + demo
    .venv/bin/python bench/zoo.py --small    # the reduced zoo the tests use
    .venv/bin/python bench/zoo.py --zoo-only

Writes bench/results/zoo.json (zoo-small.json with --small). Thread count: the recipe's `threads`
for the zoo's training and every demo stage (fixed for determinism).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/inspect*.py

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoo-only", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="Work here instead of a temp dir.")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from tvtool.demo.pipeline import run_demo
    from tvtool.demo.progress import stage_progress
    from tvtool.demo.zoo import build_zoo

    con = Console(stderr=True)
    size = "small" if args.small else "full"
    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp) / "demo"
        t0 = time.perf_counter()
        with stage_progress() as progress:
            zoo = build_zoo(out / "zoo", args.seed, size, progress=progress)
            zoo_wall = time.perf_counter() - t0
            result = None
            if not args.zoo_only:
                result = run_demo(out, seed=args.seed, size=size, progress=progress)
        total = time.perf_counter() - t0

    t = Table(title=f"zoo ({size}, seed {args.seed})", title_justify="left")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in zoo.info.seconds.items():
        t.add_row(k, f"{v:.1f}")
    t.add_row("total", f"{zoo_wall:.1f}", end_section=True)
    con.print(t)
    doc = {
        "size": size,
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "zoo_stages": zoo.info.seconds,
        "zoo_seconds": round(zoo_wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if result is not None:
        t = Table(title="demo stages", title_justify="left")
        t.add_column("stage")
        t.add_column("seconds", justify="right")
        for k, v in result["stage_seconds"].items():
            t.add_row(k, f"{v:.1f}")
        t.add_row("total (zoo included)", f"{total:.1f}", end_section=True)
        con.print(t)
        slow = sorted(result["commands"], key=lambda c: -c["seconds"])[:10]
        t = Table(title="slowest commands", title_justify="left")
        t.add_column("seconds", justify="right")
        t.add_column("command")
        for c in slow:
            verb = " ".join(c["command"].split()[:2])
            t.add_row(f"{c['seconds']:.1f}", f"{verb} ({c['stage']})")
        con.print(t)
        doc.update(
            demo_stages=result["stage_seconds"],
            commands=[
                {k: c[k] for k in ("stage", "command", "seconds")} for c in result["commands"]
            ],
            claims=result["claims"],
            total_seconds=round(total, 1),
        )
    con.print(f"total {total:.1f} s (target: under 600 s on 2 CPU cores)")
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    path = res / ("zoo-small.json" if args.small else "zoo.json")
    path.write_text(json.dumps(doc, indent=2) + "\n")
    con.print(f"wrote {path}")


if __name__ == "__main__":
    main()
