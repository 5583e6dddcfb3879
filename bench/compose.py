"""Cost of one `tvtool compose` optimisation step against plain fine-tuning of the same model.

For each configuration a fresh subprocess builds the image tower (default: open_clip's ViT-B-32
architecture, random weights, nothing downloaded; or `--model-config FILE`), makes a batch of
random images and T random task vectors over every image-tower tensor, held on the device in
fp32 or fp16 exactly as compose holds them, then times optimisation steps:

* plain:   forward + backward of the tower with its own weights trainable (the limit);
* compose: Lambda -> theta = theta_0 + sum_t Lambda * tau_t -> forward + backward -> AdamW
  on Lambda.

The ratio of a configuration comes from the same process: after the compose steps that measure
memory, plain and compose steps alternate (`--steps` of each) and the ratio is median compose /
median plain, so a machine shared with other work slows both alike. `--clock cpu` times with
the thread's CPU time instead of the wall clock (meaningful with `--threads 1`: a loaded
machine then hardly moves the numbers).

Floors, timed in the same process between the steps: each step must read every vector twice
(for theta, then for dL/dLambda), so `floor_ratio` = (plain + the time to read the vectors'
bytes twice, as fp32 words by torch.mv) / plain is the least ratio a compose step can have on
that machine; `mv_floor_ratio` does the same with two torch.mv passes in the vectors' own dtype
(on a CPU without native half arithmetic torch's fp16/bf16 kernels convert element by element
and run below memory speed: that is where fp16 stacks meet their floor in practice).

Memory: on CUDA the peak of torch.cuda.max_memory_allocated over the steps minus what was
allocated before the vectors (model + batch); on CPU the peak resident set (VmHWM) minus the
resident set at that same point. "extra" = step memory of compose - plain - the vectors' bytes:
what compose costs beyond holding the vectors (target: about zero, independent of T).

    .venv/bin/python bench/compose.py                        # ViT-B-32, auto device
    .venv/bin/python bench/compose.py --small --device cpu   # a 3.3M-parameter tower
    .venv/bin/python bench/compose.py --model-config cfg.json --vectors 1,8 --dtypes float32
    # the real ViT-B-32 tower on a CPU (random weights; ~3 s a step with batch 4, one thread)
    nice -n -15 .venv/bin/python bench/compose.py --model ViT-B-32 --device cpu --vectors 1,8 \
        --batch-size 4 --steps 3 --threads 1 --clock cpu \
        --out bench/results/compose-cpu-vit-b-32.json

Prints a table; writes bench/results/compose-<device>.json. Target: compose step within 1.3x of
the plain step; memory grows by T x the vectors' bytes and no more.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds inspect.py, which would shadow the standard library's `inspect` (torch imports it)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

SMALL = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child(cfg: dict) -> dict:
    """One configuration, in its own process."""
    import open_clip
    import torch

    from tvtool.compose.coefs import Coefs, attach_layout, compose_params, learnable_mask
    from tvtool.models.bank import Stack, share_base
    from tvtool.models.build import register_config, resolve_device
    from tvtool.models.functional import autocast
    from tvtool.vectors.blocks import CoefsLayout, make_blocks

    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    name = cfg["model"]
    if cfg.get("model_config"):
        name, _ = register_config(Path(cfg["model_config"]))
    net = open_clip.create_model(name, pretrained=None)
    visual = net.visual.to(device).train(False)
    del net
    size = visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(cfg["batch_size"], 3, *size, device=device)
    params = {n: p for n, p in visual.named_parameters()}
    out_dim = visual(images[:1]).shape[-1]
    head = torch.nn.functional.normalize(torch.randn(10, out_dim, device=device), dim=-1)
    labels = torch.randint(0, 10, (cfg["batch_size"],), device=device)

    def loss_of(feats):
        logits = 100 * torch.nn.functional.normalize(feats.float(), dim=-1) @ head.T
        return torch.nn.functional.cross_entropy(logits, labels)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss("VmRSS")

    n_vec, dtype = cfg["vectors"], getattr(torch, cfg["dtype"])
    if cfg["mode"] == "plain":
        for p in params.values():
            p.requires_grad_(True)

        def step():
            for p in params.values():
                p.grad = None
            with autocast(device):
                feats = visual(images)
            loss_of(feats).backward()

        vector_bytes = 0
    else:
        for p in params.values():
            p.requires_grad_(False)
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        layout = CoefsLayout(
            vectors=[f"v{t}" for t in range(n_vec)],
            blocks=make_blocks(shapes, "tensor", cfg["partitions"]),
            partitions=cfg["partitions"],
        )
        by_shape: dict[tuple, list[str]] = {}
        for n, s in shapes.items():
            by_shape.setdefault(s, []).append(n)
        stacks = []
        for s, names in by_shape.items():
            t = torch.empty((len(names), n_vec, *s), dtype=dtype, device=device)
            t.normal_(0, 1e-3)
            stacks.append(Stack(names, names, s, list(range(n_vec)), t))
        attach_layout(layout, stacks)
        share_base(stacks, params)
        coefs = Coefs(learnable_mask(layout, stacks)).to(device)
        opt = torch.optim.AdamW(coefs.parameters(), lr=1e-3)
        vector_bytes = sum(s.nbytes for s in stacks)
        buffers: dict = {}  # as the trainer composes: theta reused step after step

        def step():
            opt.zero_grad(set_to_none=True)
            theta = compose_params(coefs(), stacks, layout, params, buffers)
            with autocast(device):
                feats = torch.func.functional_call(visual, theta, (images,), strict=False)
            loss_of(feats).backward()
            opt.step()

    clock = time.thread_time if cfg.get("clock") == "cpu" else time.perf_counter

    def timed(f) -> float:
        sync()
        t0 = clock()
        f()
        sync()
        return clock() - t0

    for _ in range(cfg["warmup"]):
        step()
    times = [timed(step) for _ in range(cfg["steps"])]
    if device.type == "cuda":
        peak_now = torch.cuda.max_memory_allocated() - before
    else:
        peak_now = _rss("VmHWM") - before
    plain_times: list[float] = []
    floor_times: list[float] = []
    mv_times: list[float] = []
    if cfg["mode"] == "compose":  # plain steps of the same model, alternating with compose's
        frozen = list(params.values())

        def plain_step():
            for p in frozen:
                p.requires_grad_(True)
                p.grad = None
            with autocast(device):
                feats = visual(images)
            loss_of(feats).backward()
            for p in frozen:
                p.requires_grad_(False)
                p.grad = None

        views = []  # each stack as rows of fp32 words (its bytes) and as rows of its dtype
        for s in stacks:
            flat = s.tensor.reshape(-1)
            flat = flat[: flat.numel() - flat.numel() % (4 // flat.element_size())]
            words = flat.view(torch.float32)
            rows = s.tensor.shape[0] * s.tensor.shape[1]
            words = words.view(rows, -1) if words.numel() % rows == 0 else words.view(1, -1)
            mat = s.tensor.reshape(rows, -1)
            views.append((words, words.new_ones(words.shape[1]), mat, mat.new_ones(mat.shape[1])))

        def read_twice():  # the floor: every vector byte read twice, at streaming speed
            for words, ones, _, _ in views:
                torch.mv(words, ones)
                torch.mv(words, ones)

        def mv_twice():  # two passes of torch's matrix-vector product in the vectors' dtype
            for _, _, mat, ones in views:
                torch.mv(mat, ones)
                torch.mv(mat, ones)

        plain_step()
        read_twice()
        mv_twice()
        times = []
        for _ in range(cfg["steps"]):
            plain_times.append(timed(plain_step))
            times.append(timed(step))
            floor_times.append(timed(read_twice))
            mv_times.append(timed(mv_twice))
    peak = peak_now
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = _cpu_name()
    times.sort()
    plain_times.sort()
    floor_times.sort()
    mv_times.sort()
    return {
        "step_s": times[len(times) // 2],
        "step_min_s": times[0],
        "plain_step_s": plain_times[len(plain_times) // 2] if plain_times else None,
        "floor_s": floor_times[len(floor_times) // 2] if floor_times else None,
        "mv_floor_s": mv_times[len(mv_times) // 2] if mv_times else None,
        "peak_bytes": peak,
        "vector_bytes": vector_bytes,
        "device": str(device),
        "device_name": dev_name,
        "params": sum(p.numel() for p in params.values()),
    }


def run_child(cfg: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({cfg}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    ap.add_argument("--model-config", help="custom open_clip config JSON instead of --model")
    ap.add_argument(
        "--small",
        action="store_true",
        help="a small built-in ViT (64 px, width 256, 4 layers) for CPUs",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--vectors", default="1,8,21", help="numbers of task vectors")
    ap.add_argument("--dtypes", default="float32,float16", help="vector dtypes on the device")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time steps by the wall clock or the thread's CPU time")
    ap.add_argument("--out", help="result file (default bench/results/compose-<device>.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import tempfile

    import torch

    if args.small and not args.model_config:
        path = Path(tempfile.mkdtemp(prefix="tvtool-bench-")) / "tvtool-bench-small.json"
        path.write_text(json.dumps(SMALL))
        args.model_config = str(path)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    base = {
        "model": args.model,
        "model_config": args.model_config,
        "device": args.device,
        "batch_size": args.batch_size or (128 if cuda else 8),
        "steps": args.steps or (20 if cuda else 5),
        "warmup": args.warmup if args.warmup is not None else (3 if cuda else 1),
        "partitions": args.partitions,
        "threads": args.threads,
        "clock": args.clock,
        "small": args.small,
        "vectors": 0,
        "dtype": "float32",
    }
    rows = []
    load_before = os.getloadavg()[0]
    plain = run_child({**base, "mode": "plain"})
    rows.append({"mode": "plain", "vectors": 0, "dtype": "-", **plain})
    for dtype in args.dtypes.split(","):
        for n in [int(x) for x in args.vectors.split(",")]:
            r = run_child({**base, "mode": "compose", "vectors": n, "dtype": dtype})
            rows.append({"mode": "compose", "vectors": n, "dtype": dtype, **r})
    for r in rows:
        ref = r.get("plain_step_s") or plain["step_s"]
        r["step_ratio"] = r["step_s"] / ref
        for k in ("floor", "mv_floor"):  # the ratio a step at that floor would have
            if r.get(f"{k}_s") is not None:
                r[f"{k}_ratio"] = (ref + r[f"{k}_s"]) / ref
        r["extra_bytes"] = r["peak_bytes"] - plain["peak_bytes"] - r["vector_bytes"]

    print(
        f"device: {plain['device']} ({plain['device_name']}); "
        f"model {args.model_config or args.model} "
        f"image tower {plain['params'] / 1e6:.1f}M params; batch {base['batch_size']}; "
        f"partitions {args.partitions}; threads {args.threads or torch.get_num_threads()}; "
        f"clock {args.clock}; 'x plain': median step / median plain step of the same process; "
        "'floor': (plain + reading the vectors' bytes twice) / plain, 'mv fl': the same with "
        "two torch.mv passes in the vectors' dtype, both timed in that process between steps"
    )
    head = (
        f"{'mode':<8} {'T':>3} {'dtype':<8} {'step ms':>9} {'x plain':>8} {'floor':>6} "
        f"{'mv fl':>6} {'vectors MB':>11} "
        f"{'peak MB':>9} {'extra MB':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        fl = [f"{r[k]:.2f}" if k in r else "-" for k in ("floor_ratio", "mv_floor_ratio")]
        print(
            f"{r['mode']:<8} {r['vectors']:>3} {r['dtype']:<8} {1e3 * r['step_s']:>9.1f} "
            f"{r['step_ratio']:>8.2f} {fl[0]:>6} {fl[1]:>6} {r['vector_bytes'] / 1e6:>11.1f} "
            f"{r['peak_bytes'] / 1e6:>9.1f} "
            f"{r['extra_bytes'] / 1e6:>9.1f}"
        )
    tag = (
        "cpu"
        if plain["device"] == "cpu"
        else "cuda-" + re.sub(r"[^a-z0-9]+", "-", plain["device_name"].lower()).strip("-")
    )
    out = Path(args.out) if args.out else HERE / "results" / f"compose-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": {**base, "vectors": args.vectors, "dtypes": args.dtypes},
        "rows": rows,
        "target": {
            "step_ratio_max": 1.3 if plain["device"] == "cpu" else 1.1,
            "extra_bytes": "about 0, independent of T",
        },
    }
    doc["settings"]["tower_params"] = plain["params"]
    doc["settings"]["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    if out.resolve().parent == (HERE / "results").resolve():
        sys.path.insert(0, str(HERE))
        from table import refresh_readme

        refresh_readme()


if __name__ == "__main__":
    main()
