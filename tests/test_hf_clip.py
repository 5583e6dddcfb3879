"""HF CLIP end to end: tiny `CLIPModel`s from a `CLIPConfig` (random weights), fine-tunes saved as
`CLIPVisionModel` in the transformers 4.x and 5.x layouts; tvtool's model against transformers'
own forward; extract, compose, select, eval and merge on an HF bank."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from compose_assets import accuracy, train_tower, write_task

transformers = pytest.importorskip("transformers")

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=16, patch_size=4, hidden_act="quick_gelu",
)
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    vocab_size=49408, max_position_embeddings=16, hidden_act="quick_gelu",
)


def clip_config():
    return transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)


def save_vision_4x(vision_state: dict[str, torch.Tensor], out: Path, dtype=torch.float32) -> Path:
    """A `CLIPVisionModel` as transformers 4.x saved it: keys under `vision_model.`, with the
    persistent `position_ids` buffer of transformers < 4.31."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    n = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
    state = {f"vision_model.{k}": v.to(dtype).contiguous() for k, v in vision_state.items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(n).unsqueeze(0)
    save_file(state, str(out / "model.safetensors"), {"format": "pt"})
    cfg = transformers.CLIPVisionConfig(**VISION).to_dict()
    cfg.update(architectures=["CLIPVisionModel"], transformers_version="4.40.0")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def save_vision_5x(vision_state: dict[str, torch.Tensor], out: Path, **kw) -> Path:
    """A `CLIPVisionModel` saved by the installed transformers (5.x: keys without a prefix)."""
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    target = getattr(model, "vision_model", model)  # 4.x wraps the transformer
    target.load_state_dict(vision_state)
    model.save_pretrained(out, **kw)
    return out


def finetune(base: Path, data: Path, steps: int = 40, lr: float = 2e-3) -> dict:
    """Fine-tune the vision tower (not the projection, as FusionBench) with the base's head."""
    from tvtool.models.build import load_clip

    clip = load_clip(base=base)
    train_tower(clip, clip.model.vision_model, data, steps, lr)
    return {k: v.detach().clone() for k, v in clip.model.vision_model.state_dict().items()}


@dataclass
class HF:
    root: Path
    base: Path  # CLIPModel folder (installed transformers' layout)
    colors: Path
    colors_val: Path
    stripes: Path
    ft_colors_4x: Path
    ft_colors_5x: Path
    ft_stripes_5x: Path


_CACHE: dict[str, HF] = {}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> HF:
    if "hf" not in _CACHE:
        root = tmp_path_factory.mktemp("hf-clip")
        torch.manual_seed(0)
        transformers.CLIPModel(clip_config()).save_pretrained(root / "base")
        colors = write_task(root / "colors", "colors", 12, seed=1)
        colors_val = write_task(root / "colors_val", "colors", 8, seed=2)
        stripes = write_task(root / "stripes", "stripes", 12, seed=3)
        c = finetune(root / "base", colors)
        s = finetune(root / "base", stripes)
        _CACHE["hf"] = HF(
            root,
            root / "base",
            colors,
            colors_val,
            stripes,
            save_vision_4x(c, root / "ft_colors_4x"),
            save_vision_5x(c, root / "ft_colors_5x"),
            save_vision_5x(s, root / "ft_stripes_5x", max_shard_size="20KB"),
        )
    return _CACHE["hf"]


def _extract(base: Path, ft: Path, name: str) -> str:
    from tvtool.store.store import Store
    from tvtool.vectors.extract import extract_vector

    return extract_vector(Store(), base, ft, name=name).digest


def test_features_equal_transformers_forward(hf, tmp_path):
    from tvtool.models.build import load_clip
    from tvtool.models.functional import encode_images, visual_params

    clip = load_clip(base=hf.base)
    ref = transformers.CLIPModel.from_pretrained(hf.base).eval()
    assert clip.tower_prefix == "" and set(clip.model.state_dict()) == set(ref.state_dict())
    tower = visual_params(clip)
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in tower  # q, k, v separate
    assert "visual_projection.weight" in tower and not any(k.startswith("text") for k in tower)
    images = torch.randn(3, 3, 16, 16)
    tokens = clip.tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        got = encode_images(clip, None, images, normalize=False)
        want = ref.get_image_features(pixel_values=images)
        want = getattr(want, "pooler_output", want)
        assert (got - want).abs().max() < 1e-5
        text = ref.get_text_features(input_ids=tokens)
        text = getattr(text, "pooler_output", text)
        assert (clip.model.encode_text(tokens) - text).abs().max() < 1e-5
        # a functional override equals transformers' forward on the changed weights
        bumped = {k: v + 0.01 * torch.randn_like(v) for k, v in tower.items()}
        ref.load_state_dict(bumped, strict=False)
        want = ref.get_image_features(pixel_values=images)
        want = getattr(want, "pooler_output", want)
        assert (encode_images(clip, bumped, images, normalize=False) - want).abs().max() < 1e-5
    # an HF config.json as --model-config with a weights file as --base: the same model
    split = load_clip(model_config=hf.base / "config.json", base=hf.base / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(encode_images(split, None, images), encode_images(clip, None, images))
    # a half-precision copy of the base loads into the same (fp32) architecture
    half = tmp_path / "half"
    transformers.CLIPModel.from_pretrained(hf.base, dtype=torch.bfloat16).save_pretrained(half)
    lo = load_clip(base=half)
    with torch.no_grad():
        err = (encode_images(lo, None, images) - encode_images(clip, None, images)).abs().max()
    assert 0 < err < 0.1


def test_tokenizer_files_give_the_same_heads(hf, tmp_path):
    """A folder with CLIP tokenizer files (as the hub's openai/clip-* have; built here from
    open_clip's BPE, the same vocabulary) gives the heads of the open_clip BPE fallback."""
    import gzip
    import shutil

    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    from tvtool.models.build import load_clip
    from tvtool.models.heads import compute_head

    folder = tmp_path / "with-tokenizer"
    shutil.copytree(hf.base, folder)
    encoder = dict(SimpleTokenizer().encoder)
    encoder["<|startoftext|>"] = encoder.pop("<start_of_text>")
    encoder["<|endoftext|>"] = encoder.pop("<end_of_text>")
    (tmp_path / "vocab.json").write_text(json.dumps(encoder))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 1]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tok.save_pretrained(folder)
    with_files, fallback = load_clip(base=folder), load_clip(base=hf.base)
    names, templates = ["red car", "Green-ish dog!"], ["a photo of a {}.", "an image of {}"]
    ids = with_files.tokenizer(["a photo of a red car."])
    assert ids.shape == (1, TEXT["max_position_embeddings"]) and int(ids[0, 0]) == 49406
    assert int(ids[0, -1]) == 49407  # transformers' CLIP tokenizer pads with <|endoftext|>
    assert int(fallback.tokenizer(["a photo of a red car."])[0, -1]) == 0  # open_clip with 0
    torch.testing.assert_close(compute_head(with_files, names, templates),
                               compute_head(fallback, names, templates), rtol=0, atol=1e-6)


def test_vision_only_base_gives_pooled_features(hf):
    from tvtool.models.build import load_clip
    from tvtool.models.functional import encode_images

    clip = load_clip(base=hf.ft_colors_4x)  # 4.x layout, position_ids buffer in the file
    ref = transformers.CLIPVisionModel.from_pretrained(hf.ft_colors_5x).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = encode_images(clip, None, images, normalize=False)
        assert (got - ref(pixel_values=images).pooler_output).abs().max() < 1e-5
    with pytest.raises(Exception, match="CLIPVisionModel"):
        clip.model.encode_text(torch.zeros(1, 16, dtype=torch.long))


def test_both_layouts_and_shards_give_one_vector(hf):
    from tvtool.store.store import Store
    from tvtool.vectors.stored import load_tensor_object

    a = _extract(hf.base, hf.ft_colors_4x, "c4")
    b = _extract(hf.base, hf.ft_colors_5x, "c5")
    store = Store()
    ma, ta = load_tensor_object(store, a, "vector")
    _, tb = load_tensor_object(store, b, "vector")
    assert set(ta) == set(tb) and all(k.startswith("vision_model.") for k in ta)
    assert not any(k.endswith("position_ids") for k in ta)
    assert "visual_projection.weight" not in ta  # FusionBench: the base's projection is kept
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)
    assert ma.params["submodel"] == "vision_model"
    base = transformers.CLIPModel.from_pretrained(hf.base).state_dict()
    ft = transformers.CLIPVisionModel.from_pretrained(hf.ft_colors_5x).state_dict()
    for k, v in ft.items():
        name = k if k.startswith("vision_model.") else "vision_model." + k
        if name in ta:
            torch.testing.assert_close(ta[name], v - base[name], rtol=0, atol=1e-7)
    assert len(list(hf.ft_stripes_5x.glob("*.safetensors"))) > 1  # sharded fine-tune
    _extract(hf.base, hf.ft_stripes_5x, "s5")
    # a bare 5.x CLIPVisionModel base against 4.x and 5.x fine-tunes: one vector, bare names
    vbase = save_vision_5x({k.removeprefix("vision_model."): v for k, v in base.items()
                            if k.startswith("vision_model.")}, hf.root / "vbase-layouts")
    v4, v5 = _extract(vbase, hf.ft_colors_4x, "v4"), _extract(vbase, hf.ft_colors_5x, "v5")
    assert v4 == v5
    _, tv = load_tensor_object(store, v4, "vector")
    assert set(tv) == {k.removeprefix("vision_model.") for k in ta}


def test_merge_writes_the_base_layout(hf, invoke, tmp_path):
    """Vectors keyed like a CLIPModel merge into a bare (5.x) CLIPVisionModel base and back:
    base + tau is the fine-tune, in the base's own keys; transformers loads the result."""
    from safetensors.torch import load_file, save_file

    _extract(hf.base, hf.ft_colors_4x, "mc")
    full = transformers.CLIPModel.from_pretrained(hf.base)
    vision = tmp_path / "base_vision"
    save_vision_5x(full.vision_model.state_dict() if hasattr(full.vision_model, "embeddings")
                   else full.vision_model.vision_model.state_dict(), vision)
    out = tmp_path / "merged" / "model.safetensors"
    out.parent.mkdir()
    r = invoke("merge", "--base", vision / "model.safetensors", "mc:1", "--out", out, "-q",
               "--allow-other-base")  # the same weights in another file
    assert r.exit_code == 0, r.stderr
    merged, ft = load_file(out), load_file(hf.ft_colors_5x / "model.safetensors")
    assert set(merged) == set(ft) and not any(k.startswith("vision_model.") for k in merged)
    for k, v in ft.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    # a bare 5.x vector (CLIPVisionModel pair) merges into the CLIPModel base under its names
    save_file(ft, str(tmp_path / "ft.safetensors"))
    _extract(vision / "model.safetensors", tmp_path / "ft.safetensors", "bare")
    r = invoke("merge", "--base", hf.base / "model.safetensors", "bare:1", "--out",
               tmp_path / "m2.safetensors", "-q", "--allow-other-base")
    assert r.exit_code == 0, r.stderr
    m2 = load_file(tmp_path / "m2.safetensors")
    for k, v in ft.items():
        torch.testing.assert_close(m2["vision_model." + k], v, rtol=0, atol=1e-6)


def test_presets_know_hf_and_open_clip_names():
    from tvtool.checkpoints.keymaps import open_clip_to_hf
    from tvtool.vectors.filters import TensorFilter

    attn, visual = TensorFilter(presets=["attn"]), TensorFilter(presets=["visual"])
    hf_q = "vision_model.encoder.layers.3.self_attn.q_proj.weight"
    oc = "visual.transformer.resblocks.3.attn.in_proj_weight"
    for key in (hf_q, oc, "vision_model.encoder.layers.0.self_attn.out_proj.bias"):
        assert attn(key) and visual(key)
    for key in ("vision_model.encoder.layers.0.mlp.fc1.weight", "visual.conv1.weight"):
        assert visual(key) and not attn(key)
    assert visual("visual_projection.weight") and not visual("text_model.final_layer_norm.bias")
    assert attn("model.layers.0.self_attn.o_proj.weight")  # an LLM's attention
    assert open_clip_to_hf(oc) == [hf_q, hf_q.replace("q_proj", "k_proj"),
                                   hf_q.replace("q_proj", "v_proj")]
    assert open_clip_to_hf("visual.proj") == ["visual_projection.weight"]


def test_presets_select_the_tower_in_all_three_layouts(invoke, tmp_path):
    """`visual` and `attn` on real key sets: open_clip, HF CLIPModel / 4.x CLIPVisionModel
    (`vision_model.`), bare 5.x CLIPVisionModel; a bare 5.x CLIPTextModel is not visual."""
    open_clip = pytest.importorskip("open_clip")
    from tvtool.vectors.filters import TensorFilter

    oc = list(open_clip.CLIP(**OC_CFG).state_dict())
    full = list(transformers.CLIPModel(clip_config()).state_dict())
    bare = list(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).state_dict())
    text = list(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).state_dict())
    assert not any(k.startswith("vision_model.") for k in bare)  # the installed 5.x layout
    layouts = {  # keys -> (image tower keys, attention projection keys)
        "open_clip": (oc, [k for k in oc if k.startswith("visual.")],
                      [k for k in oc if ".attn.in_proj_" in k or ".attn.out_proj." in k]),
        "hf": (full, [k for k in full if k.startswith(("vision_model.", "visual_projection."))],
               [k for k in full if "self_attn." in k]),
        "hf-4.x-vision": (["vision_model." + k for k in bare], ["vision_model." + k for k in bare],
                          ["vision_model." + k for k in bare if "self_attn." in k]),
        "hf-5.x-vision": (bare, bare, [k for k in bare if "self_attn." in k]),
        "hf-5.x-text": (text, [], [k for k in text if "self_attn." in k]),
    }
    for name, (keys, tower, attn) in layouts.items():
        visual = TensorFilter(presets=["visual"]).bind(keys)
        both = TensorFilter(presets=["visual", "attn"]).bind(keys)
        assert [k for k in keys if visual(k)] == tower, name
        assert [k for k in keys if TensorFilter(presets=["attn"]).bind(keys)(k)] == attn, name
        assert [k for k in keys if both(k)] == [k for k in attn if k in tower], name
        layers = {"open_clip": 3, "hf": 3, "hf-5.x-text": 1}.get(name, 2)  # both towers' layers
        assert len(attn) == layers * (4 if name == "open_clip" else 8), name
    # end to end: extract --preset on a bare 5.x CLIPVisionModel pair
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "ft")
    for preset, n in (("visual", len(bare)), ("attn", 16)):
        r = invoke("extract", tmp_path / "base", tmp_path / "ft", "--preset", preset, "--json",
                   "--name", f"bare-{preset}")
        assert r.exit_code == 0, r.stderr
        assert len(json.loads(r.stdout)["tensors"]) == n


OC_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32,
          "layers": 2, "head_width": 8, "mlp_ratio": 2.0},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                       "layers": 1}}


def test_open_clip_key_map_covers_a_matching_tower():
    """Every open_clip image-tower tensor maps to HF tensors of the same total size."""
    open_clip = pytest.importorskip("open_clip")
    from tvtool.checkpoints.keymaps import open_clip_to_hf

    oc = open_clip.CLIP(**OC_CFG).visual.state_dict()
    hf_model = transformers.CLIPModel(clip_config())
    hf_state = hf_model.state_dict()
    seen = set()
    for k, v in oc.items():
        names = open_clip_to_hf("visual." + k)
        assert names and all(n in hf_state for n in names), k
        assert sum(hf_state[n].numel() for n in names) == v.numel(), k
        seen.update(names)
    assert seen == {k for k in hf_state if k.startswith(("vision_model.", "visual_projection"))
                    and not k.endswith("position_ids")}


@pytest.mark.slow
def test_compose_select_eval_merge_on_an_hf_bank(hf, invoke, tmp_path):
    from tvtool.models.build import load_clip
    from tvtool.models.functional import visual_params
    from tvtool.models.weights import apply_delta, coefs_delta
    from tvtool.store.store import Store

    _extract(hf.base, hf.ft_colors_4x, "hf/colors")
    _extract(hf.base, hf.ft_stripes_5x, "hf/stripes")
    clip = load_clip(base=hf.base)
    base_acc = accuracy(clip, hf.colors_val)
    model = ["--base", hf.base, "--device", "cpu"]
    r = invoke(
        "compose", "hf/colors", "hf/stripes", *model, "--data", hf.colors, "--val",
        hf.colors_val, "--shots", "4", "--epochs", "4", "--name", "hf/learned", "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["val_acc"]["colors"] >= base_acc + 0.4
    n_keys = len([k for k in visual_params(clip) if k.startswith("vision_model.")])
    assert rep["learnable"] == 2 * n_keys  # one coefficient per HF tensor and vector
    # eval applies the same coefficients, and a fine-tuned CLIPVisionModel as --weights
    e = invoke("eval", *model, "--coefs", "hf/learned", "--data", hf.colors_val, "--json")
    assert e.exit_code == 0, e.stderr
    assert json.loads(e.stdout)["results"][0]["accuracy"] == pytest.approx(
        rep["val_acc"]["colors"])
    w = invoke("eval", *model, "--weights", hf.ft_colors_5x, "--data", hf.colors_val, "-q")
    assert w.exit_code == 0, w.stderr
    v = invoke("eval", *model, "hf/colors", "--data", hf.colors_val, "-q")
    assert float(v.stdout) == pytest.approx(float(w.stdout))
    # select scores the HF bank with gradients
    s = invoke("select", "hf/colors", "hf/stripes", *model, "--data", hf.colors, "--shots", "2",
               "--score", "grad", "--top", "1", "--json")
    assert s.exit_code == 0, s.stderr
    # merge --coefs writes the base's (CLIPModel) layout; transformers loads it
    out = tmp_path / "merged.safetensors"
    m = invoke("merge", "--base", hf.base / "model.safetensors", "--coefs", "hf/learned",
               "--out", out, "-q")
    assert m.exit_code == 0, m.stderr
    from safetensors.torch import load_file

    merged = load_file(out)
    ref = transformers.CLIPModel.from_pretrained(hf.base).eval()
    assert set(merged) == set(ref.state_dict())
    ref.load_state_dict(merged)
    delta, _ = coefs_delta(clip, Store(), "hf/learned")
    applied = apply_delta(clip, delta)
    for k, t in applied.items():
        torch.testing.assert_close(merged[k], t, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vision_only_base_with_a_head_file_through_compose_eval_merge(hf, invoke, tmp_path):
    """A bare 5.x `CLIPVisionModel` base folder (no text tower, no projection: features are
    `pooler_output`) with `--head FILE`: extract (4.x and 5.x fine-tunes), compose, eval and
    merge through the CLI; the merged folder loads in transformers and its predictions with the
    head give eval's accuracy."""
    from tvtool.datasets import images as mdata
    from tvtool.models.build import load_clip

    full = transformers.CLIPModel.from_pretrained(hf.base)
    vbase = save_vision_5x(full.vision_model.state_dict(), tmp_path / "vbase")
    for name, ft in (("v/colors", hf.ft_colors_4x), ("v/stripes", hf.ft_stripes_5x)):
        r = invoke("extract", vbase, ft, "--name", name, "-q")
        assert r.exit_code == 0, r.stderr
    folder = mdata.ImageFolder(hf.colors)
    clip = load_clip(base=vbase)
    images, labels = mdata.load_tensors(folder, list(range(len(folder))),
                                        mdata.eval_transform(clip))
    ft = transformers.CLIPVisionModel.from_pretrained(hf.ft_colors_5x).eval()
    with torch.no_grad():  # a linear-probe-like head: class means of the fine-tune's features
        feats = torch.nn.functional.normalize(ft(pixel_values=images).pooler_output, dim=-1)
    head = torch.stack([feats[labels == c].mean(0) for c in range(len(folder.classnames))])
    torch.save(torch.nn.functional.normalize(head, dim=-1), tmp_path / "head.pt")
    model = ["--base", vbase, "--device", "cpu", "--head", tmp_path / "head.pt"]
    r = invoke("compose", "v/colors", "v/stripes", *model, "--data", hf.colors, "--val",
               hf.colors_val, "--shots", "4", "--epochs", "4", "--name", "v/learned", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    base_acc = invoke("eval", *model, "--data", hf.colors_val, "-q")
    assert base_acc.exit_code == 0, base_acc.stderr
    e = invoke("eval", *model, "--coefs", "v/learned", "--data", hf.colors_val, "-q")
    assert e.exit_code == 0, e.stderr
    assert float(e.stdout) == pytest.approx(rep["val_acc"]["colors"])
    assert float(e.stdout) > float(base_acc.stdout)
    m = invoke("merge", "--base", vbase, "--coefs", "v/learned", "--out", tmp_path / "merged",
               "-q")
    assert m.exit_code == 0, m.stderr
    merged = transformers.CLIPVisionModel.from_pretrained(tmp_path / "merged").eval()
    val = mdata.ImageFolder(hf.colors_val)
    vimages, vlabels = mdata.load_tensors(val, list(range(len(val))), mdata.eval_transform(clip))
    with torch.no_grad():
        pred = (merged(pixel_values=vimages).pooler_output @ head.T).argmax(-1)
    assert float((pred == vlabels).float().mean()) == pytest.approx(float(e.stdout))
