"""`tvtool eval` and tvtool.models.evaluate/weights, against plain torch computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_assets import CLASSES, base_args


def plain_predictions(
    env, state: dict, ds: str, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions with open_clip directly: model from `state`, manual preprocessing, plain head."""
    import open_clip
    from PIL import Image

    from tvtool.models.heads import DEFAULT_TEMPLATES

    if "plain_net" not in env:  # one plain model per module, reloaded with each state
        env["plain_net"] = open_clip.create_model(env["name"], pretrained=None)
    net = env["plain_net"]
    net.load_state_dict(state)
    net.eval()
    mean = torch.tensor(net.visual.preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(net.visual.preprocess_cfg["std"]).view(3, 1, 1)
    xs, ys = [], []
    for label, c in enumerate(CLASSES):
        for f in sorted((env["dir"] / ds / split / c).glob("*.png")):
            x = (
                torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float()
                / 255
            )
            xs.append((x - mean) / std)
            ys.append(label)
    if "plain_tok" not in env:
        env["plain_tok"] = open_clip.get_tokenizer(env["name"])
    tok = env["plain_tok"]
    with torch.no_grad():
        rows = []
        for c in CLASSES:
            e = F.normalize(
                net.encode_text(tok([t.format(c.replace("_", " ")) for t in DEFAULT_TEMPLATES])),
                dim=-1,
            )
            rows.append(F.normalize(e.mean(0), dim=-1))
        feats = net.encode_image(torch.stack(xs), normalize=True)
        pred = (feats @ torch.stack(rows).T).argmax(dim=1)
    return pred, torch.tensor(ys)


def plus(env, scales: list[float]) -> dict:
    state = {k: v.clone() for k, v in env["base"].items()}
    for s, tau in zip(scales, env["taus"], strict=True):
        for k, v in tau.items():
            state[k] += s * v
    return state


def test_base_accuracy_equals_plain_computation(env, invoke):
    r = invoke(*base_args(env, "one", "two"), "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["weights"]["mode"] == "base" and doc["scale"] is None
    for res, ds in zip(doc["results"], ("one", "two"), strict=True):
        pred, y = plain_predictions(env, env["base"], ds)
        assert res["dataset"] == ds and res["n"] == 12
        assert res["correct"] == int((pred == y).sum())
        assert res["accuracy"] == pytest.approx(float((pred == y).float().mean()))
        assert res["normalised"] is None
    assert doc["mean_accuracy"] == pytest.approx(sum(r["accuracy"] for r in doc["results"]) / 2)


def test_vector_at_weight_zero_is_base_and_weight_matches_finetuned(env, invoke, vecs):
    base = json.loads(invoke(*base_args(env), "--json").stdout)
    zero = json.loads(invoke(*base_args(env), f"{vecs[0]}:0", "--json").stdout)
    assert zero["results"][0]["correct"] == base["results"][0]["correct"]
    assert zero["weights"]["vectors"][0]["weight"] == 0.0
    one = json.loads(invoke(*base_args(env), vecs[0], "--json").stdout)
    pred, y = plain_predictions(env, plus(env, [1.0, 0.0]), "one")
    assert one["results"][0]["correct"] == int((pred == y).sum())
    ft = invoke(*base_args(env), "--weights", env["dir"] / "ft0.safetensors", "--json")
    assert json.loads(ft.stdout)["results"][0]["correct"] == one["results"][0]["correct"]
    alone = invoke(
        "eval",
        "--model-config",
        env["cfg"],
        "--weights",
        env["dir"] / "ft0.safetensors",
        "--data",
        env["dir"] / "one",
        "--device",
        "cpu",
        "-q",
    )
    assert alone.exit_code == 0, alone.stderr
    assert float(alone.stdout) == pytest.approx(one["results"][0]["accuracy"], abs=1e-6)


def test_predictions_of_vectors_coefs_and_weights_agree(env, vecs):
    """Core level: base + 0.7 tau0 - 0.3 tau1 (vectors), the same as a coefs object, and plain."""
    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.datasets.images import ImageFolder
    from tvtool.models import evaluate as ev
    from tvtool.models import weights as wt
    from tvtool.models.build import load_clip
    from tvtool.store.store import Store
    from tvtool.vectors.blocks import CoefsLayout, make_blocks
    from tvtool.vectors.stored import save_tensor_object

    store = Store(None)
    clip = load_clip(model_config=env["cfg"], base=env["dir"] / "base.safetensors")
    es = ev.prepare(clip, [ImageFolder(env["dir"] / "one", "test")], ev_templates(), store)[0]
    delta = wt.vectors_delta(clip, store, [(vecs[0], 0.7), (vecs[1], -0.3)])
    p_vec, y = ev.predict(clip, es, wt.apply_delta(clip, delta))
    want, y2 = plain_predictions(env, plus(env, [0.7, -0.3]), "one")
    assert torch.equal(y, y2) and torch.equal(p_vec, want)

    digests = [store.resolve(v) for v in vecs]
    shapes = {k: tuple(v.shape) for k, v in env["taus"][0].items()}
    layout = CoefsLayout(vectors=digests, blocks=make_blocks(shapes, "task"), granularity="task")
    m = save_tensor_object(
        store,
        "coefs",
        {"coefs": torch.tensor([[0.7], [-0.3]])},
        params={"layout": layout.model_dump(), "base_fingerprint": clip.base_fingerprint},
        inputs=digests,
    )
    cdelta, _ = wt.coefs_delta(clip, store, m.digest)
    for k in delta:
        torch.testing.assert_close(cdelta[k], delta[k])
    path = env["dir"] / "mixed.safetensors"
    save_safetensors(path, plus(env, [0.7, -0.3]), {})
    override, ignored = wt.checkpoint_override(clip, path)
    assert ignored == sum(1 for k in env["base"] if not k.startswith("visual."))
    assert torch.equal(ev.predict(clip, es, override)[0], want)


def ev_templates():
    from tvtool.models.heads import DEFAULT_TEMPLATES

    return list(DEFAULT_TEMPLATES)


@pytest.mark.slow
def test_grid_search_on_validation(env, invoke, vecs, tmp_path):
    r = invoke(*base_args(env, "one", "two"), vecs[0], vecs[1], "--grid", "0:1:0.5", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    g = doc["grid"]
    assert [row["scale"] for row in g["rows"]] == [0.0, 0.5, 1.0]
    assert g["criterion"] == "mean_accuracy"
    best = max(g["rows"], key=lambda row: (row["mean_accuracy"], -row["scale"]))
    assert doc["scale"] == g["best_scale"] == best["scale"]
    for row in g["rows"]:
        s = row["scale"]
        val_pred, val_y = plain_predictions(env, plus(env, [s, s]), "two", split="val")
        assert row["accuracy"]["two"] == pytest.approx(float((val_pred == val_y).float().mean()))
    s = doc["scale"]
    test_pred, test_y = plain_predictions(env, plus(env, [s, s]), "two")
    assert doc["results"][1]["correct"] == int((test_pred == test_y).sum())

    ft = tmp_path / "ft.json"
    ft.write_text(json.dumps({"one": 80, "two": 50}))  # percentages
    doc = json.loads(
        invoke(
            *base_args(env, "one", "two"), vecs[0], "--grid", "0,1", "--finetuned-acc", ft, "--json"
        ).stdout
    )
    assert doc["grid"]["criterion"] == "mean_normalised"
    row0 = doc["grid"]["rows"][0]
    assert row0["normalised"]["two"] == pytest.approx(row0["accuracy"]["two"] / 0.5)
    assert doc["results"][0]["normalised"] == pytest.approx(doc["results"][0]["accuracy"] / 0.8)

    meas = invoke(
        *base_args(env, "one"),
        vecs[0],
        "--grid",
        "0,1",
        "--finetuned",
        env["dir"] / "ft0.safetensors",
        "--json",
    )
    doc = json.loads(meas.stdout)
    ft_pred, ft_y = plain_predictions(env, plus(env, [1.0, 0.0]), "one")
    ft_acc = float((ft_pred == ft_y).float().mean())
    if ft_acc > 0:
        assert doc["results"][0]["normalised"] == pytest.approx(
            doc["results"][0]["accuracy"] / ft_acc
        )


@pytest.mark.slow
def test_disentanglement(env, vecs, invoke):
    from tvtool.datasets.images import ImageFolder
    from tvtool.models import evaluate as ev
    from tvtool.models import weights as wt
    from tvtool.models.build import load_clip
    from tvtool.store.store import Store

    store = Store(None)
    clip = load_clip(model_config=env["cfg"], base=env["dir"] / "base.safetensors")
    sets = ev.prepare(
        clip, [ImageFolder(env["dir"] / d, "test") for d in ("one", "two")], ev_templates()
    )
    deltas = [wt.vectors_delta(clip, store, [(v, 1.0)]) for v in vecs]
    out = ev.disentanglement(clip, sets, deltas, [0.0, 1.0])
    assert out["xi"][0][0] == 0.0  # nothing added: both sides are the base
    # plain xi(1, 1): D1 under base+tau1 vs base+tau1+tau2, D2 under base+tau2 vs the same
    joint = [plain_predictions(env, plus(env, [1.0, 1.0]), d)[0] for d in ("one", "two")]
    alone = [
        plain_predictions(env, plus(env, s), d)[0]
        for s, d in (([1.0, 0.0], "one"), ([0.0, 1.0], "two"))
    ]
    want = sum(float((j != a).float().mean()) for j, a in zip(joint, alone, strict=True))
    assert out["xi"][1][1] == pytest.approx(want)
    # a vector with itself, at tiny alphas, is nearly disentangled
    same = ev.disentanglement(clip, sets, [deltas[0], deltas[0]], [0.0, 1e-6])
    assert max(max(row) for row in same["xi"]) <= 0.1

    r = invoke(
        *base_args(env, "one", "two"),
        "--disentanglement",
        vecs[0],
        vecs[1],
        "--alphas",
        "0,1",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["disentanglement"]["xi"][1][1] == pytest.approx(want)
    assert doc["disentanglement"]["vectors"] == vecs
    q = invoke(
        *base_args(env, "one", "two"),
        "--disentanglement",
        vecs[0],
        vecs[1],
        "--alphas",
        "0,1",
        "-q",
    )
    assert float(q.stdout) == pytest.approx(
        sum(sum(row) for row in doc["disentanglement"]["xi"]) / 4, abs=1e-6
    )


def test_human_output_goes_to_stderr(env, invoke, vecs):
    r = invoke(*base_args(env, "one", "two"), f"{vecs[0]}:0.5")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert "top-1 accuracy" in r.stderr and "two" in r.stderr and "0.5*v0" in r.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--grid", "0:1:0.5"], "--grid searches the scale of task vectors"),
        (["v0", "--coefs", "v1"], "give one of VECTOR"),
        (["v0", "--grid", "1:0:0.1"], "bad grid"),
        (["--disentanglement", "v0", "v1"], "needs two vectors and two --data"),
        (["v0", "--grid", "0,1", "--val", "x", "--val", "y"], "one --val directory per --data"),
        (["nope"], "no ref or object named 'nope'"),
        (["--coefs", "v0"], "is a vector object, expected coefs"),
    ],
)
def test_usage_errors(env, invoke, vecs, extra, message):
    r = invoke(*base_args(env), *extra)
    assert r.exit_code == 1
    assert message in r.stderr


def test_grid_needs_validation_data(env, invoke, vecs, tmp_path):
    import shutil

    shutil.copytree(env["dir"] / "one" / "test", tmp_path / "flat")
    r = invoke(*base_args(env), "--data", tmp_path / "flat", vecs[0], "--grid", "0,1")
    assert r.exit_code == 1 and "--grid needs validation data" in r.stderr


def test_vector_from_another_base_is_refused(env, invoke):
    from tvtool.store.store import Store
    from tvtool.vectors.stored import save_tensor_object

    store = Store(None)
    m = save_tensor_object(
        store, "vector", env["taus"][0], params={"base": {"fingerprint": "0" * 64}}
    )
    store.set_ref("alien", m.digest)
    r = invoke(*base_args(env), "alien")
    assert r.exit_code == 1 and "another base" in r.stderr
    assert invoke(*base_args(env), "alien", "--allow-other-base").exit_code == 0


def test_finetuned_acc_file_errors(env, invoke, vecs, tmp_path):
    from tvtool.models.eval_run import load_finetuned_acc

    f = tmp_path / "ft.json"
    f.write_text(json.dumps({"results": [{"dataset": "one", "accuracy": 0.9}]}))
    assert load_finetuned_acc(f) == {"one": 0.9}
    r = invoke(*base_args(env, "one", "two"), vecs[0], "--grid", "0,1", "--finetuned-acc", f)
    assert r.exit_code == 1 and "no accuracy for data set(s) two" in r.stderr
    f.write_text("[1, 2]")
    with pytest.raises(Exception, match="expected"):
        load_finetuned_acc(f)


def test_worker_processes_give_the_same_batches(env):
    from tvtool.datasets.images import ImageFolder
    from tvtool.models import evaluate as ev
    from tvtool.models.build import load_clip

    clip = load_clip(model_config=env["cfg"], base=env["dir"] / "base.safetensors")
    folder = ImageFolder(env["dir"] / "one", "test")
    inline, pooled = (
        ev.prepare(clip, [folder], ev_templates(), batch_size=5, workers=w)[0] for w in (0, 1)
    )
    a, b = list(inline.iterate(clip)), list(pooled.iterate(clip))
    assert [x.shape[0] for x, _ in a] == [x.shape[0] for x, _ in b] == [5, 5, 2]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
