"""The public task-arithmetic / aTLAS bank layout end to end through the CLI.

A random-weight bank in their layout (pickled `ImageEncoder`s with QuickGELU and no text
transformer, `ClassificationHead` pickles, three fine-tuned variants by seeded perturbation; see
public_bank.py), saved with torch.save (zip) and with plain pickle.dump, runs
extract -> inspect -> select -> compose --shots 4 -> merge -> eval, with heads from the head
pickles and, separately, from a text tower. The same flow runs on the real ViT-B-32
architecture (random weights; slow, one optimisation step), and a ViT-B-16 `zeroshot.pt` loads as
open_clip's QuickGELU model; the small custom architecture covers the plain-pickle form.
"""

from __future__ import annotations

import json

import pytest
import torch
from compose_assets import CLASSES, write_task
from public_bank import build_bank, register

TEMPLATES = ["a photo of a {}.", "an image of the {}."]
# class names in the data folders' (sorted) order, as the authors' heads follow their labels
COLORS, STRIPES = sorted(CLASSES["colors"]), sorted(CLASSES["stripes"])
DATASETS = {"Colors": COLORS, "Stripes": STRIPES, "Tints": COLORS}


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bank")
    name, cfg = register(root)
    out = {"name": name, "cfg": cfg, "root": root}
    out["zip"] = build_bank(root / "zip", name, DATASETS, TEMPLATES)
    out["plain"] = build_bank(root / "plain", name, DATASETS, TEMPLATES, plain=True)
    out["colors"] = write_task(root / "data" / "colors", "colors", 6, seed=1)
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    out["templates"] = root / "templates.txt"
    return out


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_public_layout_loads_with_quickgelu_and_no_text(bank):
    from tvtool.models.build import load_clip

    for layout in ("zip", "plain"):
        clip = load_clip(model_config=bank["cfg"], base=bank[layout]["zeroshot"])
        assert clip.activation == "quick_gelu" and clip.activation_source == "checkpoint"
        assert not clip.has_text


def test_plain_pickle_and_zip_hold_the_same_tensors(bank):
    from tvtool.checkpoints.readers import open_checkpoint

    for key in ("zeroshot", "ft:Colors", "head:Colors"):
        with open_checkpoint(bank["zip"][key]) as a, open_checkpoint(bank["plain"][key]) as b:
            assert a.keys() == b.keys()
            assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_head_pickle_equals_the_text_tower_head(bank):
    """The head a public `ClassificationHead` holds is what tvtool computes from the text tower
    of the full checkpoint with the same templates."""
    from tvtool.models.build import load_clip
    from tvtool.models.heads import compute_head, read_head_file

    clip = load_clip(
        model_config=bank["cfg"], base=bank["zip"]["zeroshot"], text_tower=str(bank["zip"]["full"])
    )
    from_file = read_head_file(bank["zip"]["head:Colors"], clip, 3)
    assert torch.allclose(from_file, compute_head(clip, DATASETS["Colors"], TEMPLATES), atol=1e-5)


@pytest.mark.slow
def test_bank_end_to_end_through_the_cli(bank, invoke, tmp_path):
    z = bank["zip"]
    model = ["--model-config", bank["cfg"], "--base", z["zeroshot"], "--device", "cpu"]
    head = ["--head", z["head:Colors"]]
    names = []
    for d in DATASETS:
        r = invoke(
            "extract", z["zeroshot"], z[f"ft:{d}"], "--preset", "visual", "--name", f"tv/{d}", "-q"
        )
        assert r.exit_code == 0, r.stderr
        names.append(f"tv/{d}")
    # the plain-pickle files give the very same vector
    r = invoke(
        "extract",
        bank["plain"]["zeroshot"],
        bank["plain"]["ft:Colors"],
        "--preset",
        "visual",
        "--name",
        "tv/plain",
        "-q",
    )
    assert r.exit_code == 0, r.stderr
    from tvtool.store.store import Store
    from tvtool.vectors.stored import load_tensor_object

    st = Store()
    _, a = load_tensor_object(st, st.resolve("tv/Colors"), "vector")
    _, b = load_tensor_object(st, st.resolve("tv/plain"), "vector")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = _json(invoke("inspect", *names, "--json"))
    assert info
    sel = _json(
        invoke(
            "select",
            *names,
            *model,
            "--data",
            bank["colors"],
            *head,
            "--shots",
            "4",
            "--top",
            "2",
            "--name",
            "sel",
            "--json",
        )
    )
    assert sel["kind"] == "selection" and len(sel["keep"]) > 0
    rep = _json(
        invoke(
            "compose",
            *model,
            "--selection",
            "sel",
            "--data",
            bank["colors"],
            *head,
            "--shots",
            "4",
            "--epochs",
            "2",
            "--name",
            "co",
            "--json",
        )
    )
    assert rep["data"][0]["train"] == 12 and any(abs(c) > 0 for row in rep["coefs"] for c in row)
    out = tmp_path / "merged.safetensors"
    r = invoke("merge", "--base", z["zeroshot"], "--coefs", "co", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "image tower only" in r.stderr
    from tvtool.checkpoints.readers import open_checkpoint

    with open_checkpoint(out) as merged, open_checkpoint(z["zeroshot"]) as base:
        assert set(merged.keys()) == set(base.keys())  # what the base had, no text transformer
        assert merged.metadata().get("tvtool.activation") == "quick_gelu"
    data = ["--data", bank["colors"]]
    by_coefs = _json(invoke("eval", *model, "--coefs", "co", *data, *head, "--json"))
    by_file = _json(
        invoke(
            "eval",
            "--model-config",
            bank["cfg"],
            "--weights",
            out,
            "--device",
            "cpu",
            *data,
            *head,
            "--json",
        )
    )
    assert by_file["results"][0]["accuracy"] == pytest.approx(by_coefs["results"][0]["accuracy"])
    # heads from the text tower of the full checkpoint instead of the head pickles
    by_text = _json(
        invoke(
            "eval",
            *model,
            "--coefs",
            "co",
            *data,
            "--text-tower",
            z["full"],
            "--templates",
            bank["templates"],
            "--json",
        )
    )
    assert by_text["results"][0]["accuracy"] == pytest.approx(by_coefs["results"][0]["accuracy"])
    # without any head source the error says what to give
    r = invoke("eval", *model, *data)
    assert r.exit_code == 1 and "--head FILE" in r.stderr


# -- the real architectures (random weights): ViT-B-32 end to end, ViT-B-16 as a builder ------
@pytest.fixture(scope="module")
def vit_bank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The ViT-B-32 bank itself: three fine-tuned variants, their heads, the full CLIP."""
    root = tmp_path_factory.mktemp("vit-b-32")
    torch.set_num_threads(1)
    out = build_bank(root, "ViT-B-32", DATASETS, TEMPLATES)
    out["colors"] = write_task(root / "data" / "colors", "colors", 6, seed=1)
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    out["templates"] = root / "templates.txt"
    return out


@pytest.mark.slow
def test_vit_b_32_bank_end_to_end_through_the_cli(vit_bank, invoke, tmp_path):
    """extract -> inspect -> select -> compose --shots 4 -> merge -> eval on the real ViT-B-32
    architecture in the public layout; heads from the pickles (select, eval) and from the text
    tower (compose, eval)."""
    z = vit_bank
    model = ["--model", "ViT-B-32", "--base", z["zeroshot"], "--device", "cpu"]
    data = ["--data", z["colors"]]
    names = []
    for d in DATASETS:
        r = invoke("extract", z["zeroshot"], z[f"ft:{d}"], "--preset", "visual",
                   "--name", f"b32/{d}", "-q")
        assert r.exit_code == 0, r.stderr
        names.append(f"b32/{d}")
    info = _json(invoke("inspect", *names, "--json"))
    assert info
    sel = _json(invoke("select", *names, *model, *data, "--head", z["head:Colors"],
                       "--shots", "4", "--top", "2", "--name", "sel", "--json"))
    assert sel["kind"] == "selection" and len(sel["keep"]) > 0
    # compose takes its head from the full CLIP's text tower (select above took the pickle);
    # one step of 12 images: CI-sized
    rep = _json(invoke("compose", *model, "--selection", "sel", *data, "--text-tower", z["full"],
                       "--templates", z["templates"], "--shots", "4", "--epochs", "1",
                       "--min-steps", "1", "--batch-size", "12", "--name", "co", "--json"))
    assert rep["data"][0]["train"] == 12 and any(abs(c) > 0 for row in rep["coefs"] for c in row)
    out = tmp_path / "merged.safetensors"
    r = invoke("merge", "--base", z["zeroshot"], "--coefs", "co", "--out", out)
    assert r.exit_code == 0 and "image tower only" in r.stderr, r.stderr
    from tvtool.checkpoints.readers import open_checkpoint

    with open_checkpoint(out) as merged:  # the activation came from the pickle
        assert merged.metadata().get("tvtool.activation") == "quick_gelu"
        assert not any(k.startswith("model.transformer.") for k in merged.keys())
    by_head = _json(invoke("eval", *model, "--coefs", "co", *data, "--head", z["head:Colors"],
                           "--json"))
    by_text = _json(invoke("eval", *model, "--coefs", "co", *data, "--text-tower", z["full"],
                           "--templates", z["templates"], "--json"))
    assert by_text["results"][0]["accuracy"] == pytest.approx(by_head["results"][0]["accuracy"])


@pytest.mark.slow
def test_vit_b_16_public_encoder_builds_with_quickgelu(tmp_path):
    """A ViT-B-16 `zeroshot.pt` in the public layout loads as the model it was saved from:
    QuickGELU from the pickle, no text tower, open_clip's own features."""
    import torch.nn.functional as F
    from public_bank import encoder_file

    from tvtool.models.build import load_clip
    from tvtool.models.functional import encode_images

    torch.set_num_threads(1)
    ref = encoder_file(tmp_path / "zeroshot.pt", "ViT-B-16", seed=2)
    clip = load_clip(model="ViT-B-16", base=tmp_path / "zeroshot.pt")
    assert (clip.activation, clip.activation_source, clip.has_text) == (
        "quick_gelu", "checkpoint", False)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = F.normalize(ref.encode_image(x), dim=-1)
        assert torch.allclose(encode_images(clip, None, x), want, atol=1e-5)
