"""The demo's results: the claims checked, one table (rich on stderr, markdown), results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SHOTS = 16

CLAIMS = {
    1: "Fine-tuning beats zero-shot on every task domain.",
    2: "Task addition beats zero-shot on the average of the task domains, and learned "
    "(block-wise) addition beats isotropic addition.",
    3: "Negation lowers target accuracy much more than control accuracy (at least twice the "
    "drop, and by 10 points or more).",
    4: "Block-wise coefficients learned from 16 shots beat zero-shot and the best isotropic "
    "scale on every held-out domain.",
    5: "Keeping only the top-N vectors per block loses little accuracy (5 points or less on "
    "average over the held-out domains) for much less memory (60% or less).",
    6: "Attention-only task vectors (only the attention linear layers fine-tuned) are more "
    "disentangled (lower mean weight-disentanglement error) and add with less interference "
    "(higher mean normalised accuracy of task addition) than full fine-tunes.",
}

# (key, header) of the table's columns, in order
COLUMNS = [
    ("zeroshot", "zero-shot"),
    ("finetuned", "fine-tuned"),
    ("addition", "addition"),
    ("learned_addition", "learned add."),
    ("negation", "negated"),
    ("best_isotropic", "best iso."),
    ("linear_probe", "probe"),
    ("atlas", "aTLAS 16"),
    ("entropy", "entropy"),
    ("selected", "top-N"),
    ("attn_finetuned", "attn ft."),
    ("attn_addition", "attn add."),
]


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def check_claims(r: dict[str, Any]) -> list[dict[str, Any]]:
    dom, tasks, targets = r["domains"], r["tasks"], r["targets"]

    def get(d: str, k: str) -> float:
        v = dom.get(d, {}).get(k)
        return math.nan if v is None else float(v)

    held: dict[int, bool] = {}
    held[1] = all(get(d, "finetuned") > get(d, "zeroshot") for d in tasks)
    zs = _mean([get(d, "zeroshot") for d in tasks])
    iso = _mean([get(d, "addition") for d in tasks])
    learned = _mean([get(d, "learned_addition") for d in tasks])
    held[2] = iso > zs and learned > iso
    neg = r.get("negation") or {}
    if neg:
        t_drop = get(neg["target"], "zeroshot") - get(neg["target"], "negation")
        c_drop = max(0.0, get(neg["control"], "zeroshot") - get(neg["control"], "negation"))
        held[3] = t_drop >= 10 and t_drop >= 2 * c_drop
    else:
        held[3] = False
    held[4] = all(
        get(d, "atlas") > get(d, "zeroshot") and get(d, "atlas") > get(d, "best_isotropic")
        for d in targets
    )
    loss = _mean([get(d, "atlas") - get(d, "selected") for d in targets])
    mem = _mean(
        [
            get(d, "selected_bytes") / get(d, "atlas_bytes") if get(d, "atlas_bytes") else math.nan
            for d in targets
        ]
    )
    held[5] = loss <= 5 and mem <= 0.6
    kinds = {"full": ("finetuned", "addition"), "attention": ("attn_finetuned", "attn_addition")}
    att: dict[str, dict[str, float]] = {}
    xi = (r.get("attention") or {}).get("xi") or {}
    for kind, (ft, add) in kinds.items():
        att[kind] = {
            "xi": float(xi[kind]) if _ok(xi.get(kind)) else math.nan,
            # normalised accuracy: added / own fine-tuned; gap: fine-tuned - added (points)
            "normalised": _mean([get(d, add) / get(d, ft) for d in tasks]),
            "gap": _mean([get(d, ft) - get(d, add) for d in tasks]),
        }
    held[6] = (
        att["attention"]["xi"] < att["full"]["xi"]
        and att["attention"]["normalised"] > att["full"]["normalised"]
    )
    r["summary"] = {
        # mean over the task domains of accuracy / that domain's fine-tuned accuracy
        "normalised": {
            k: _mean([get(d, k) / get(d, "finetuned") for d in tasks])
            for k in ("zeroshot", "addition", "learned_addition")
        },
        "task_mean": {
            "zeroshot": zs,
            "addition": iso,
            "learned_addition": learned,
            "attn_finetuned": _mean([get(d, "attn_finetuned") for d in tasks]),
            "attn_addition": _mean([get(d, "attn_addition") for d in tasks]),
        },
        "selection": {"mean_accuracy_loss": loss, "memory_fraction": mem},
        "attention": att,
    }
    return [{"id": i, "text": CLAIMS[i], "held": bool(held[i])} for i in CLAIMS]


def table_rows(r: dict[str, Any]) -> list[list[str]]:
    """One row per domain: task domains, then held-out ones, then the control."""
    dom = r["domains"]
    order = r["tasks"] + r["targets"] + [d for d in dom if d not in r["tasks"] + r["targets"]]
    rows = []
    for d in order:
        v = dom[d]
        cells = [d, v.get("role", "")]
        for key, _ in COLUMNS:
            x = v.get(key)
            cells.append("" if x is None else f"{x:.1f}")
        rows.append(cells)
    s = r.get("summary", {}).get("task_mean", {})
    mean = ["mean (tasks)", ""] + [f"{s[k]:.1f}" if _ok(s.get(k)) else "" for k, _ in COLUMNS]
    mean[3] = f"{_mean([dom[d]['finetuned'] for d in r['tasks'] if 'finetuned' in dom[d]]):.1f}"
    rows.insert(len(r["tasks"]), mean)
    return rows


def headers(r: dict[str, Any]) -> list[str]:
    top = r.get("selection_top")
    return ["domain", "role"] + [h.replace("top-N", f"top-{top}") if top else h for _, h in COLUMNS]


def notes(r: dict[str, Any]) -> list[str]:
    """One-line explanations under the table."""
    out = []
    add = r.get("addition") or {}
    if add:
        out.append(
            f"addition: theta_0 + {add['scale']:g} x sum of {len(r['tasks'])} task "
            "vectors (scale chosen on validation by mean normalised accuracy); learned "
            f"add.: block-wise coefficients from {add.get('shots', SHOTS)} shots of every task "
            "domain"
        )
        if add.get("partitions", 1) > 1:
            out[-1] += f" ({add['partitions']} random partitions per tensor)"
        norm = r.get("summary", {}).get("normalised", {})
        if _ok(norm.get("learned_addition")) and _ok(norm.get("addition")):
            out[-1] += (
                f"; mean normalised accuracy (accuracy / fine-tuned): isotropic "
                f"{norm['addition']:.2f}, learned {norm['learned_addition']:.2f}"
            )
    neg = r.get("negation") or {}
    if neg:
        ln = neg["learned"]
        out.append(
            f"negated: theta_0 - {neg['scale']:g} x tau_{neg['target']} (largest scale "
            f"keeping {neg['control']} >= 95% of zero-shot on validation); learned "
            f"negation (compose --negate): {neg['target']} {ln['target']:.1f}, "
            f"{neg['control']} {ln['control']:.1f}"
        )
    sel = r.get("summary", {}).get("selection", {})
    if sel and _ok(sel.get("memory_fraction")) and _ok(sel.get("mean_accuracy_loss")):
        ex = next(
            (r["domains"][d] for d in r["targets"] if r["domains"][d].get("atlas_bytes")), None
        )
        mb = (
            f" ({ex['selected_bytes'] / 1e6:.1f} MB vs {ex['atlas_bytes'] / 1e6:.1f} MB)"
            if ex
            else ""
        )
        out.append(
            f"top-{r.get('selection_top')}: only the top-{r.get('selection_top')} vectors "
            f"per block (select --top --score {r.get('selection_score')}{_granularity(r)}) "
            "learned and held on the device: "
            f"{100 * sel['memory_fraction']:.0f}% of the vector memory{mb}, "
            f"{sel['mean_accuracy_loss']:.1f} points lost on average"
        )
    kept = kept_line(r)
    if kept:
        out.append(kept)
    att = r.get("summary", {}).get("attention", {})
    if r.get("attention") and att:
        a, f = att["attention"], att["full"]
        pair_names = ", ".join("-".join(p) for p in r["attention"]["pairs"])
        out.append(
            "attn ft./add.: attention-only fine-tunes (only in_proj / out_proj of the image tower "
            f"trained; vectors digits-attn/<domain>) and their isotropic addition at scale "
            f"{r['attention']['scale']:g}; weight-disentanglement error xi (eval "
            f"--disentanglement, mean over alphas {r['attention']['alphas']} and pairs "
            f"{pair_names}): full {f['xi']:.3f}, attention-only {a['xi']:.3f}; addition: "
            f"normalised accuracy full {f['normalised']:.2f}, attention-only "
            f"{a['normalised']:.2f} (gap to fine-tuned {f['gap']:.1f} vs {a['gap']:.1f} points)"
        )
    out.append(
        "best iso.: the isotropic scale best on the domain's validation split; probe: "
        "logistic regression on the same 16 shots; entropy: coefficients learned "
        "without labels (entropy minimisation on the train split's images)"
    )
    return out


def _granularity(r: dict[str, Any]) -> str:
    g = r.get("selection_granularity")
    return f" --granularity {g}" if g and g != "tensor" else ""


def kept_line(r: dict[str, Any]) -> str | None:
    """Which vectors `select --top N` kept for each held-out domain (blocks kept / blocks; with
    one block, whole vectors: their names)."""
    parts = []
    blocks = next(
        (r["domains"][d]["blocks"] for d in r["targets"] if r["domains"][d].get("kept")), None
    )
    for d in r["targets"]:
        v = r["domains"].get(d, {})
        if not v.get("kept"):
            continue
        counts = sorted(v["kept"].items(), key=lambda kv: (-kv[1], kv[0]))
        if blocks == 1:
            each = ", ".join(name.rsplit("/", 1)[-1] for name, n in counts if n)
        else:
            each = ", ".join(f"{name.rsplit('/', 1)[-1]} {n}" for name, n in counts)
        parts.append(f"{d}: {each}")
    if not parts:
        return None
    score = f"select --score {r.get('selection_score')}{_granularity(r)}"
    if blocks == 1:
        return (
            f"top-{r.get('selection_top')} kept ({score}: one block per whole vector, so the "
            "same vectors in every tensor): " + "; ".join(parts)
        )
    return (
        f"top-{r.get('selection_top')} kept ({score}; of the {blocks} blocks, how many kept "
        "each vector): " + "; ".join(parts)
    )


def markdown(r: dict[str, Any]) -> str:
    hs = headers(r)
    lines = [
        "# tvtool demo report",
        "",
        f"Example zoo `{r['size']}`, seed {r['seed']}; test-split top-1 accuracy (%). "
        f"Total time {r['seconds']:.0f} s.",
        "",
        "| " + " | ".join(hs) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(hs) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(r)]
    lines += ["", *[f"- {n}" for n in notes(r)], "", "## Claims", ""]
    for c in r["claims"]:
        lines.append(f"{c['id']}. {'held' if c['held'] else '**did not hold**'}: {c['text']}")
    cos = r.get("cosine") or {}
    if cos.get("names"):
        lines += [
            "",
            "## Cosine similarity of the task vectors",
            "",
            "| | " + " | ".join(cos["names"]) + " |",
            "|---|" + "---:|" * len(cos["names"]),
        ]
        for n, row in zip(cos["names"], cos["matrix"], strict=True):
            lines.append(f"| {n} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
        if r.get("plot"):
            lines += ["", f"![cosine heatmap]({Path(r['plot']).name})"]
    lines += ["", "## Stage timings (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in r["stage_seconds"].items()]
    lines += ["", f"## Commands run (paths relative to {r['out']})", "", "```"]
    prefix = f"{r['out'].rstrip('/')}/"
    lines += [f"{c['command'].replace(prefix, '')}  # {c['seconds']:.1f} s" for c in r["commands"]]
    lines += ["```", ""]
    return "\n".join(lines)


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


def finish(r: dict[str, Any], out: Path) -> dict[str, Any]:
    """Check the claims, write results.json and report.md; returns the results document."""
    r["claims"] = check_claims(r)
    r["table"] = {"headers": headers(r), "rows": table_rows(r)}
    r = _finite(r)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "report.md").write_text(markdown(r))
    return r


TASK_VIEW = ["zeroshot", "finetuned", "addition", "learned_addition", "negation"]
ATTN_VIEW = ["finetuned", "addition", "attn_finetuned", "attn_addition"]
HELD_VIEW = ["zeroshot", "best_isotropic", "linear_probe", "atlas", "entropy", "selected"]


def _view(r: dict[str, Any], keys: list[str], rows: list[list[str]], title: str):
    """A narrow slice of the results table (terminals are often 80 columns wide)."""
    from rich.table import Table

    hs = headers(r)
    cols = [2 + [k for k, _ in COLUMNS].index(k) for k in keys]
    t = Table(title=title, title_justify="left")
    t.add_column(hs[0])
    for c in cols:
        t.add_column(hs[c], justify="right")
    for row in rows:
        t.add_row(row[0], *(row[c] for c in cols), end_section=row[0].startswith("mean"))
    return t


def render_table(r: dict[str, Any]) -> None:
    """The results table (in two slices: task domains, held-out domains), notes, claims."""
    from tvtool.cli.output import err

    rows = r["table"]["rows"]
    n_task = len(r["tasks"]) + 1  # with the mean row
    task_rows = rows[:n_task] + [row for row in rows if row[1] == "control"]
    held_rows = [row for row in rows if row[1] == "held-out"]
    head = f"test accuracy % (zoo {r['size']}, seed {r['seed']})"
    err.print(_view(r, TASK_VIEW, task_rows, f"{head}: task domains"))
    err.print(_view(r, HELD_VIEW, held_rows, f"{head}: held-out domains, {SHOTS} shots"))
    if r.get("attention"):
        title = f"{head}: full vs attention-only task vectors"
        err.print(_view(r, ATTN_VIEW, rows[:n_task], title))
    for n in notes(r):
        err.print(f"[dim]{n}[/dim]", soft_wrap=False)
    for c in r["claims"]:
        mark = "[green]held[/green]" if c["held"] else "[red]did not hold[/red]"
        err.print(f"claim {c['id']}: {mark}  {c['text']}")
    err.print(
        f"{r['seconds']:.0f} s; report {Path(r['out']) / 'report.md'}, "
        f"JSON {Path(r['out']) / 'results.json'}",
        soft_wrap=True,
    )
