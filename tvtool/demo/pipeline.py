"""`tvtool demo`: the whole task-vector pipeline on the example zoo, through the real commands.

    DIR/zoo/        the example zoo (built or reused)
    DIR/store/      a fresh tvtool store for this run
    DIR/models/     checkpoints written by `tvtool merge`
    DIR/logs/       each command's human output (stderr), one log per stage
    DIR/cosine.png  `tvtool inspect --plot`
    DIR/results.json, DIR/report.md

Every stage is a function of a `Demo` that runs `tvtool ...` commands in-process and records
accuracies (percent, test split) into `Demo.results`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvtool.demo.cli_runner import CliRunner
from tvtool.demo.progress import StageProgress
from tvtool.demo.zoo import MARKER as ZOO_MARKER
from tvtool.demo.zoo import ZooPaths, build_zoo
from tvtool.errors import TvtoolError

MARKER = ".tvtool-demo"
SHOTS = 16
GRID = "0:1:0.05"
# compose settings (16 shots x 10 classes = 5 steps of 32 per epoch and data set)
# the settings the zoo recipe was calibrated with (compose's defaults before they became the
# authors' per run kind): plain AdamW, cosine, no clipping, mild crops, no oversampling
CALIBRATED = ["--weight-decay", "0", "--clip-grad", "0", "--augment", "mild", "--min-steps", "0"]
CALIBRATED += ["--schedule", "cosine"]
COMPOSE = ["--epochs", "20", "--batch-size", "32", "--lr", "0.1", *CALIBRATED]  # few-shot
ADDITION = ["--epochs", "30", "--batch-size", "32", "--lr", "0.1", *CALIBRATED]  # several sets
# learned addition fits 6 task domains at once: 32 shots of each and 4 random partitions per
# tensor (aTLAS x K, 4 x 336 coefficients); with 16 shots and 1 partition it stayed at a mean
# normalised accuracy of 0.60 (32 shots alone 0.65, 16 shots x 4 partitions 0.64)
ADDITION_SHOTS = 32
ADDITION_PARTITIONS = 4
ADDITION += ["--partitions", str(ADDITION_PARTITIONS)]
NEGATION = ["--epochs", "10", "--batch-size", "32", "--lr", "0.01", *CALIBRATED]
ENTROPY = ["--objective", "entropy", "--epochs", "3", "--batch-size", "64", "--lr", "0.01"]
ENTROPY += CALIBRATED
ALPHAS = "0:1:0.25"  # eval --disentanglement's grid of alpha_1, alpha_2
# select's score for top-N: the loss decrease a quadratic (empirical-Fisher) model predicts for
# the best step on a subset of vectors, the subset searched per block; the block is the whole
# vector (--granularity task: the same N vectors in every tensor), because per tensor the model
# at Lambda = 0 rarely kept what a held-out domain needs (measured on the zoo, seed 0, points
# lost vs full aTLAS on inv_edge / color_shrink / checker_inv: gain per tensor 2.9 / 28.6 / 3.7,
# per layer 8.6 / 14.6 / 2.6, per whole vector 6.6 / 7.7 / 6.3; fisher per tensor 8.9 on average)
SELECT_GRANULARITY = "task"
SELECT = ["--score", "gain", "--batch-size", "8", "--granularity", SELECT_GRANULARITY]


@dataclass
class Demo:
    out: Path
    zoo: ZooPaths
    seed: int
    device: str
    cli: CliRunner
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Path:
        return self.out / "store"

    def model_args(self) -> list[str]:
        z = self.zoo
        return flags(
            model_config=z.model_config,
            base=z.zeroshot,
            templates=z.templates,
            store=self.store,
            device=self.device,
        )

    def data(self, domain: str) -> Path:
        return self.zoo.root / "data" / domain

    def vec(self, domain: str) -> str:
        return f"digits/{domain}"

    def attn_vec(self, domain: str) -> str:
        """The task vector of the attention-only fine-tune."""
        return f"digits-attn/{domain}"

    @property
    def tasks(self) -> list[str]:
        return self.zoo.recipe.task_domains

    @property
    def targets(self) -> list[str]:
        return self.zoo.recipe.target_domains

    def dom(self, domain: str) -> dict[str, Any]:
        return self.results.setdefault("domains", {}).setdefault(domain, {})

    def eval(self, log: str, args: list[str], domains: list[str]) -> dict:
        data = [a for d in domains for a in ("--data", self.data(d))]
        return self.cli.json(log, ["eval", *self.model_args(), *args, *data])

    def compose(self, log: str, name: str, args: list[str]) -> dict:
        common = flags(seed=self.seed, name=name)
        return self.cli.json(log, ["compose", *self.model_args(), *common, "--force", *args])

    def merge_and_eval(self, log: str, coefs: str, domains: list[str]) -> dict[str, float]:
        """`tvtool merge --coefs` to a checkpoint, then `tvtool eval --weights` it."""
        path = self.out / "models" / f"{coefs.replace('/', '-')}.safetensors"
        path.parent.mkdir(exist_ok=True)
        opts = flags(base=self.zoo.zeroshot, coefs=coefs, out=path, store=self.store)
        self.cli.run(log, ["merge", *opts, "--force", "-q"])
        return pct(self.eval(log, ["--weights", path], domains))


def flags(**options: Any) -> list[str]:
    """--option value pairs (underscores become dashes)."""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def pct(report: dict) -> dict[str, float]:
    return {r["dataset"]: 100.0 * r["accuracy"] for r in report["results"]}


# ----------------------------------------------------------------------------- stages


def extract(demo: Demo) -> None:
    """Full and attention-only task vectors (the whole image tower: the attention-only ones are
    zero outside in_proj / out_proj because nothing else was trained)."""
    digests = {}
    for name, ckpt in ((demo.vec, demo.zoo.finetuned), (demo.attn_vec, demo.zoo.attention)):
        for d in demo.tasks:
            opts = flags(preset="visual", name=name(d), store=demo.store)
            args = ["extract", demo.zoo.zeroshot, ckpt(d), *opts, "-q"]
            digests[name(d)] = demo.cli.run("extract", args).strip()
    demo.results["vectors"] = digests


def inspect(demo: Demo) -> None:
    args = ["inspect", *[demo.vec(d) for d in demo.tasks], "--store", demo.store]
    plot = demo.out / "cosine.png"
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", plot]
    except ImportError:
        plot = None
    doc = demo.cli.json("inspect", args)
    cos = doc.get("cosine") or {}
    demo.results["cosine"] = {"names": cos.get("names"), "matrix": cos.get("matrix")}
    demo.results["norms"] = {v["name"]: v["l2"] for v in doc.get("vectors", [])}
    demo.results["plot"] = str(plot) if plot else None


def zeroshot_and_finetuned(demo: Demo) -> None:
    r = demo.zoo.recipe
    control = r.negation_control
    for d, a in pct(demo.eval("eval", [], [control, *demo.tasks, *demo.targets])).items():
        demo.dom(d)["zeroshot"] = a
    demo.dom(control)["role"] = "control"
    for d in demo.tasks:
        demo.dom(d)["role"] = "task"
        rep = demo.eval("eval", ["--weights", demo.zoo.finetuned(d)], [d])
        demo.dom(d)["finetuned"] = pct(rep)[d]
    for d in demo.targets:
        demo.dom(d)["role"] = "held-out"


def addition(demo: Demo) -> None:
    """Isotropic task arithmetic (scale on validation), then learned block-wise addition."""
    ft = {d: demo.dom(d)["finetuned"] for d in demo.tasks}
    ft_file = demo.out / "finetuned-acc.json"
    ft_file.write_text(json.dumps(ft, indent=2))
    vecs = [demo.vec(d) for d in demo.tasks]
    control = demo.zoo.recipe.negation_control
    rep = demo.eval("addition", [*vecs, "--grid", GRID, "--finetuned-acc", ft_file], demo.tasks)
    scale = rep["scale"]
    for d, a in pct(rep).items():
        demo.dom(d)["addition"] = a
    terms = [f"{v}:{scale:g}" for v in vecs]
    demo.dom(control)["addition"] = pct(demo.eval("addition", terms, [control]))[control]
    data = [a for d in demo.tasks for a in ("--data", demo.data(d))]
    # the best epoch by mean normalised validation accuracy (the authors' rule)
    args = [*vecs, *data, "--shots", str(ADDITION_SHOTS), "--finetuned-acc", ft_file, *ADDITION]
    comp = demo.compose("addition", "demo/addition", args)
    accs = demo.merge_and_eval("addition", "demo/addition", [*demo.tasks, control])
    for d, a in accs.items():
        demo.dom(d)["learned_addition"] = a
    demo.results["addition"] = {
        "scale": scale,
        "coefs": comp["digest"],
        "learned": comp.get("learnable"),
        "shots": ADDITION_SHOTS,
        "partitions": ADDITION_PARTITIONS,
    }


def negation(demo: Demo) -> None:
    """theta_0 - lambda * tau_target, lambda from `eval --grid --control` (the lowest target
    validation accuracy keeping the control's >= 95% of the base's); then the learned
    (compose --negate) variant."""
    r = demo.zoo.recipe
    tgt, ctl = r.negation_target, r.negation_control
    grid = [f"{demo.vec(tgt)}:-1", "--grid", GRID, "--control", demo.data(ctl)]
    rep = demo.eval("negation", grid, [tgt])
    scale = rep["scale"]
    accs = pct(rep)  # test accuracies at that scale, the control's included
    demo.dom(tgt)["negation"] = accs[tgt]
    demo.dom(ctl)["negation"] = accs[ctl]
    args = [demo.vec(tgt), "--negate", demo.data(tgt), "--control", demo.data(ctl)]
    comp = demo.compose("negation", "demo/negation", [*args, "--shots", str(SHOTS), *NEGATION])
    learned = demo.merge_and_eval("negation", "demo/negation", [tgt, ctl])
    demo.results["negation"] = {
        "target": tgt,
        "control": ctl,
        "scale": scale,
        "coefs": comp["digest"],
        "learned": {"target": learned[tgt], "control": learned[ctl]},
    }


def pairs(tasks: list[str]) -> list[tuple[str, str]]:
    """Disjoint pairs of neighbouring task domains (a-b, c-d, ...) for the disentanglement error."""
    return [(tasks[i], tasks[i + 1]) for i in range(0, len(tasks) - 1, 2)]


def attention(demo: Demo) -> None:
    """Claim 6 (Jin et al.): attention-only vectors vs full ones, through the CLI: the mean
    weight-disentanglement error xi over pairs of task domains (`eval --disentanglement`, alphas
    0..1) and isotropic task addition (`eval --grid`, scale chosen on validation by mean
    normalised accuracy against each kind's own fine-tuned accuracies)."""
    log = "attention"
    for d in demo.tasks:
        rep = demo.eval(log, ["--weights", demo.zoo.attention(d)], [d])
        demo.dom(d)["attn_finetuned"] = pct(rep)[d]
    ft = {d: demo.dom(d)["attn_finetuned"] for d in demo.tasks}
    ft_file = demo.out / "attention-finetuned-acc.json"
    ft_file.write_text(json.dumps(ft, indent=2))
    vecs = [demo.attn_vec(d) for d in demo.tasks]
    rep = demo.eval(log, [*vecs, "--grid", GRID, "--finetuned-acc", ft_file], demo.tasks)
    for d, a in pct(rep).items():
        demo.dom(d)["attn_addition"] = a
    xi: dict[str, list[float]] = {"full": [], "attention": []}
    for a, b in pairs(demo.tasks):
        for kind, name in (("full", demo.vec), ("attention", demo.attn_vec)):
            args = ["--disentanglement", name(a), name(b), "--alphas", ALPHAS]
            grid = demo.eval(log, args, [a, b])["disentanglement"]["xi"]
            xi[kind].append(sum(map(sum, grid)) / sum(map(len, grid)))
    demo.results["attention"] = {
        "scale": rep["scale"],
        "full_scale": (demo.results.get("addition") or {}).get("scale"),
        "pairs": [list(p) for p in pairs(demo.tasks)],
        "alphas": ALPHAS,
        "xi_pairs": xi,
        "xi": {k: sum(v) / len(v) if v else None for k, v in xi.items()},
    }


def few_shot(demo: Demo, domain: str) -> None:
    """aTLAS on 16 shots vs the best isotropic scale, a linear probe and entropy (unlabelled)."""
    from tvtool.demo.probe import linear_probe

    vecs = [demo.vec(d) for d in demo.tasks]
    log = f"fewshot-{domain}"
    rep = demo.eval(log, [*vecs, "--grid", GRID], [domain])
    demo.dom(domain)["best_isotropic"] = pct(rep)[domain]
    demo.dom(domain)["best_isotropic_scale"] = rep["scale"]
    name = f"demo/atlas/{domain}"
    comp = demo.compose(
        log, name, [*vecs, "--data", demo.data(domain), "--shots", str(SHOTS), *COMPOSE]
    )
    demo.dom(domain)["atlas"] = demo.merge_and_eval(log, name, [domain])[domain]
    demo.dom(domain)["atlas_bytes"] = comp.get("vector_bytes")
    z = demo.zoo
    probe = linear_probe(
        z.model_config, z.zeroshot, z.templates, demo.data(domain), SHOTS, demo.seed, demo.device
    )
    demo.dom(domain)["linear_probe"] = 100.0 * probe["accuracy"]
    name = f"demo/entropy/{domain}"
    demo.compose(log, name, [*vecs, "--data", demo.data(domain), *ENTROPY])
    demo.dom(domain)["entropy"] = pct(demo.eval(log, ["--coefs", name], [domain]))[domain]


def kept_per_vector(report: dict) -> dict[str, int]:
    """{vector label: number of blocks in which `select` kept it} from a select --json report."""
    labels = [v["label"] for v in report["vectors"]]
    counts = dict.fromkeys(labels, 0)
    for t, _ in report["keep"]:
        counts[labels[t]] += 1
    return counts


def selection(demo: Demo, domain: str, top: int) -> None:
    """Keep the top-N vectors per block (select SELECT on the same shots), learn only those
    (block-wise, every tensor its own coefficients); records how many blocks each vector was
    kept in."""
    vecs = [demo.vec(d) for d in demo.tasks]
    log = f"select-{domain}"
    sel = f"demo/select/{domain}"
    opts = flags(data=demo.data(domain), shots=SHOTS, seed=demo.seed, top=top, name=sel)
    rep = demo.cli.json(log, ["select", *vecs, *demo.model_args(), *opts, *SELECT, "--force"])
    demo.dom(domain)["kept"] = kept_per_vector(rep)
    demo.dom(domain)["blocks"] = len(rep["blocks"])
    name = f"demo/atlas-top{top}/{domain}"
    comp = demo.compose(
        log,
        name,
        ["--selection", sel, "--data", demo.data(domain), "--shots", str(SHOTS), *COMPOSE],
    )
    demo.dom(domain)["selected"] = pct(demo.eval(log, ["--coefs", name], [domain]))[domain]
    demo.dom(domain)["selected_bytes"] = comp.get("vector_bytes")
    demo.results["selection_top"] = top
    demo.results["selection_score"] = rep["score"]
    demo.results["selection_granularity"] = rep["granularity"]


# ----------------------------------------------------------------------------- driver


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TvtoolError(f"{out} exists and is not a directory")
    ours = (out / MARKER).exists() or (out / "zoo" / ZOO_MARKER).exists()
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise TvtoolError(f"{out} is not empty and holds no tvtool demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for sub in ("store", "models", "logs"):  # a fresh store and outputs for every run
        shutil.rmtree(out / sub, ignore_errors=True)
    names = ("cosine.png", "finetuned-acc.json", "attention-finetuned-acc.json")
    for name in (*names, "results.json", "report.md"):
        (out / name).unlink(missing_ok=True)


def run_demo(
    out: Path,
    seed: int = 0,
    size: str = "full",
    *,
    force: bool = False,
    device: str = "auto",
    progress: StageProgress | None = None,
) -> dict[str, Any]:
    """Build/reuse the zoo under OUT/zoo and run every stage; returns the results document."""
    from tvtool.demo.report import finish
    from tvtool.demo.train import deterministic

    start = time.perf_counter()
    out = Path(out)
    _prepare_out(out, force)
    say = progress or (lambda desc, total: lambda n: None)
    zoo = build_zoo(out / "zoo", seed, size, force=force, progress=say)  # type: ignore[arg-type]
    demo = Demo(out, zoo, seed, device, CliRunner(out / "logs"))
    seconds = {"zoo": time.perf_counter() - start}
    top = max(1, len(zoo.recipe.task_domains) // 2)
    stages: list[tuple[str, Any]] = [
        ("extract task vectors", lambda: extract(demo)),
        ("inspect (cosine heatmap)", lambda: inspect(demo)),
        ("evaluate zero-shot and fine-tuned", lambda: zeroshot_and_finetuned(demo)),
        ("task addition (isotropic and learned)", lambda: addition(demo)),
        ("task negation", lambda: negation(demo)),
        ("attention-only vs full vectors", lambda: attention(demo)),
    ]
    for d in zoo.recipe.target_domains:
        stages.append((f"aTLAS {SHOTS}-shot on {d}", lambda d=d: few_shot(demo, d)))
    for d in zoo.recipe.target_domains:
        stages.append((f"select top-{top} per block on {d}", lambda d=d: selection(demo, d, top)))
    # the zoo's thread count for every stage too: CPU results are bit-identical only for the
    # same number of threads, so a rerun on another machine prints the same table
    with deterministic(seed, zoo.recipe.threads):
        for desc, fn in stages:
            t0 = time.perf_counter()
            tick = say(desc, 1)
            fn()
            tick(1)
            seconds[desc] = time.perf_counter() - t0
    demo.results.update(
        seed=seed,
        size=size,
        out=str(out),
        zoo=str(zoo.root),
        zoo_reused=zoo.reused,
        zoo_seconds=zoo.info.seconds,
        stage_seconds={k: round(v, 2) for k, v in seconds.items()},
        commands=demo.cli.commands,
        tasks=demo.tasks,
        targets=demo.targets,
        seconds=round(time.perf_counter() - start, 1),
    )
    return finish(demo.results, out)
