"""tvtool.models: building open_clip models offline, zero-shot heads, the functional image tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from compose_assets import TINY, tiny_clip

from tvtool.errors import TvtoolError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny config (own name, so it cannot clash with other modules) and its saved weights."""
    from tvtool.checkpoints.writer import save_safetensors

    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "tvtool-test-models.json"
    _, state = tiny_clip(cfg, TINY)
    st = d / "base.safetensors"
    save_safetensors(st, state, {})
    return {"cfg": cfg, "state": state, "st": st, "dir": d}


@pytest.fixture(scope="module")
def clip(tiny):
    from tvtool.models.build import load_clip

    return load_clip(model_config=tiny["cfg"], base=tiny["st"])


def test_load_from_safetensors_round_trips_state(tiny, clip):
    sd = clip.model.state_dict()
    assert set(sd) == set(tiny["state"])
    for k, v in tiny["state"].items():
        assert torch.equal(sd[k], v), k
    assert clip.name == "tvtool-test-models"
    assert clip.image_size == (16, 16)
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    from reader_helpers import content_fingerprint

    assert clip.base_fingerprint == content_fingerprint(tiny["state"])
    expected = min(float(tiny["state"]["logit_scale"].exp()), 100.0)
    assert clip.logit_scale == pytest.approx(expected)


def test_load_from_torch_pt_with_module_prefix(tiny, tmp_path):
    from tvtool.models.build import load_clip

    pt = tmp_path / "base.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny["state"].items()}}, pt)
    loaded = load_clip(model_config=tiny["cfg"], base=pt)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, tiny["state"][k]), k


def test_config_preprocess_cfg_is_applied(tiny, tmp_path):
    from tvtool.models.build import load_clip

    cfg = tmp_path / "tvtool-test-pp.json"
    cfg.write_text(json.dumps({**TINY, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    loaded = load_clip(model_config=cfg, base=tiny["st"])
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)


def _save(path: Path, state: dict) -> Path:
    from tvtool.checkpoints.writer import save_safetensors

    save_safetensors(path, state, {})
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("visual.proj"), "missing 1 key"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "unexpected 1 key"),
        (lambda s: s.__setitem__("visual.proj", torch.zeros(3, 3)), "shape mismatch"),
    ],
)
def test_base_that_does_not_fit_is_a_clear_error(tiny, tmp_path, change, message):
    from tvtool.models.build import load_clip

    state = dict(tiny["state"])
    change(state)
    path = _save(tmp_path / "bad.safetensors", state)
    with pytest.raises(TvtoolError, match=message):
        load_clip(model_config=tiny["cfg"], base=path)


def test_bad_arguments(tiny, tmp_path):
    from tvtool.models.build import load_clip

    with pytest.raises(TvtoolError, match="exactly one of --model"):
        load_clip(base=tiny["st"])
    with pytest.raises(TvtoolError, match="exactly one of --model"):
        load_clip(model="ViT-B-32", model_config=tiny["cfg"], base=tiny["st"])
    with pytest.raises(TvtoolError, match="no weights"):
        load_clip(model_config=tiny["cfg"])
    with pytest.raises(TvtoolError, match="not both"):
        load_clip(model_config=tiny["cfg"], base=tiny["st"], pretrained="openai")
    with pytest.raises(TvtoolError, match="unknown open_clip architecture"):
        load_clip(model="No-Such-Net", base=tiny["st"])
    with pytest.raises(TvtoolError, match="model config not found"):
        load_clip(model_config=tmp_path / "missing.json", base=tiny["st"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 3}')
    with pytest.raises(TvtoolError, match="needs vision_cfg, text_cfg"):
        load_clip(model_config=bad, base=tiny["st"])
    with pytest.raises(TvtoolError, match="checkpoint not found"):
        load_clip(model_config=tiny["cfg"], base=tmp_path / "nope.safetensors")


def test_pretrained_tag_not_cached_never_downloads(monkeypatch, tmp_path):
    from tvtool.models.build import load_clip

    monkeypatch.setenv("HOME", str(tmp_path))  # empty ~/.cache/clip
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TvtoolError, match="never downloads.*--base FILE"):
        load_clip(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(TvtoolError, match="no pretrained tag 'nope'"):
        load_clip(model="ViT-B-32", pretrained="nope")


def test_resolve_device():
    from tvtool.models.build import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TvtoolError, match="unsupported device|unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TvtoolError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_head_matches_plain_computation_and_is_cached(clip, monkeypatch):
    from tvtool.models import heads
    from tvtool.store.store import Store

    names, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "the {}"]
    expected = []
    with torch.no_grad():
        for c in names:
            toks = clip.tokenizer([t.format(c) for t in templates])
            e = F.normalize(clip.model.encode_text(toks), dim=-1).mean(0)
            expected.append(e / e.norm())
    expected = torch.stack(expected)
    head = heads.zeroshot_head(clip, names, templates)
    assert head.shape == (3, TINY["embed_dim"])
    torch.testing.assert_close(head, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))

    store = Store(None)
    first = heads.zeroshot_head(clip, names, templates, store=store)
    ref = f"cache/heads/{heads.head_key(clip, names, templates)}"
    assert store.get_ref(ref) is not None
    assert store.manifest(store.get_ref(ref)).kind == "head"

    def boom(*a, **k):
        raise AssertionError("the cached head should have been used")

    monkeypatch.setattr(heads, "compute_head", boom)
    again = heads.zeroshot_head(clip, names, templates, store=store)
    assert torch.equal(first, again)
    with pytest.raises(AssertionError):  # other templates: a different key, computed anew
        heads.zeroshot_head(clip, names, ["{}"], store=store)


def test_templates_file(tmp_path):
    from tvtool.models.heads import DEFAULT_TEMPLATES, load_templates

    assert load_templates(None) == list(DEFAULT_TEMPLATES)
    good = tmp_path / "t.txt"
    good.write_text("a {}.\n\n  an image of {}  \n")
    assert load_templates(good) == ["a {}.", "an image of {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder\n")
    with pytest.raises(TvtoolError, match="exactly one"):
        load_templates(bad)


def test_encode_images_override_equals_loaded_weights(clip, tiny):
    from tvtool.models import functional as fn
    from tvtool.models.build import load_clip, load_state

    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    base = fn.encode_images(clip, None, images)
    torch.testing.assert_close(base, clip.model.encode_image(images, normalize=True))

    params = fn.visual_params(clip)
    assert set(params) == set(clip.visual_keys())
    assert "visual.conv1.weight" in params
    g = torch.Generator().manual_seed(2)
    tau = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items() if v.dim() == 2}
    override = {k: params[k] + tau[k] for k in tau}
    got = fn.encode_images(clip, override, images)

    other = load_clip(model_config=tiny["cfg"], base=tiny["st"])
    path = _save(tiny["dir"] / "moved.safetensors", {k: v.detach() for k, v in override.items()})
    load_state(other.model, path, strict=False)
    want = other.model.encode_image(images, normalize=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base)
    # the model itself is untouched by the functional call
    torch.testing.assert_close(fn.encode_images(clip, None, images), base)


def test_gradients_flow_only_to_coefficients(clip):
    from tvtool.models import functional as fn

    params = fn.visual_params(clip)
    keys = [k for k, v in params.items() if v.dim() == 2]
    tau = {k: torch.randn(params[k].shape) * 0.05 for k in keys}
    lam = torch.zeros(len(keys), requires_grad=True)
    override = {k: params[k] + lam[i] * tau[k] for i, k in enumerate(keys)}
    feats = fn.encode_images(clip, override, torch.randn(3, 3, 16, 16))
    head = F.normalize(torch.randn(5, feats.shape[1]), dim=-1)
    logits = fn.logits(clip, feats, head)
    torch.testing.assert_close(logits, clip.logit_scale * feats @ head.T)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())


def test_check_keys(clip):
    from tvtool.models.functional import check_keys

    check_keys(clip, {"visual.proj": tuple(clip.model.visual.proj.shape)})
    with pytest.raises(TvtoolError, match="not image-tower parameters"):
        check_keys(clip, {"transformer.resblocks.0.attn.in_proj_weight": (1,)})
    with pytest.raises(TvtoolError, match="shape mismatch"):
        check_keys(clip, {"visual.proj": (1, 2)})


# -- the activation the weights were trained with --------------------------------------------
def _reference(name: str, quick: bool, seed: int = 3):
    """An independent open_clip model of `name` (random weights from `seed`)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick).eval()


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("how", ["option", "name", "module-pickle"])
def test_quickgelu_features_equal_open_clip_quickgelu(tiny, tmp_path, how):
    """The tvtool-built model computes what open_clip's QuickGELU model computes, and clearly not
    what the same weights give with nn.GELU."""
    from public_bank import public_names

    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.models.build import load_clip
    from tvtool.models.functional import encode_images

    ref = _reference("tvtool-test-models", quick=True)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    kwargs: dict = {"model_config": tiny["cfg"]}
    if how == "option":
        save_safetensors(tmp_path / "w.safetensors", state, {})
        kwargs.update(base=tmp_path / "w.safetensors", quick_gelu=True)
    elif how == "name":  # a config file named -quickgelu
        cfg = tmp_path / "tvtool-test-models-quickgelu.json"
        cfg.write_text(tiny["cfg"].read_text())
        save_safetensors(tmp_path / "w.safetensors", state, {})
        kwargs.update(model_config=cfg, base=tmp_path / "w.safetensors")
    else:  # a whole pickled module names open_clip.transformer.QuickGELU
        with public_names():
            torch.save(ref, tmp_path / "module.pt")
        kwargs.update(base=tmp_path / "module.pt")
    loaded = load_clip(**kwargs)
    assert loaded.activation == "quick_gelu"
    plain = load_clip(**{**kwargs, "quick_gelu": False}, warn=lambda m: None)
    assert plain.activation == "gelu"
    x = _images()
    with torch.no_grad():
        want = F.normalize(ref.encode_image(x), dim=-1)
        got = encode_images(loaded, None, x)
        gelu = encode_images(plain, None, x)
    assert torch.allclose(got, want, atol=1e-6)
    assert (gelu - want).abs().max() > 1e-3  # nn.GELU would shift the features measurably


def test_module_pickle_with_gelu_is_detected_and_conflicts_warn(tiny, tmp_path):
    from tvtool.models.build import load_clip

    torch.save(_reference("tvtool-test-models", quick=False), tmp_path / "gelu.pt")
    notes: list[str] = []
    assert load_clip(model_config=tiny["cfg"], base=tmp_path / "gelu.pt").activation == "gelu"
    forced = load_clip(
        model_config=tiny["cfg"], base=tmp_path / "gelu.pt", quick_gelu=True, warn=notes.append
    )
    assert forced.activation == "quick_gelu" and "following the option" in notes[0]


def test_resolve_activation_warns_for_openai_architectures_only():
    from tvtool.models.activation import resolve_activation

    quick, why, note = resolve_activation("ViT-B-32", None, None)
    assert (quick, why) == (False, "default") and "--quick-gelu" in note
    assert resolve_activation("ViT-B-32", "quick_gelu", None)[:2] == (True, "checkpoint")
    assert resolve_activation("ViT-B-32-quickgelu", None, None)[:2] == (True, "architecture")
    assert resolve_activation("ViT-B-32", None, False) == (False, "option", None)
    assert resolve_activation("tvtool-test-models", None, None) == (False, "default", None)


def test_image_tower_only_base_needs_a_head_source(tiny, tmp_path):
    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.models.build import load_clip
    from tvtool.models.heads import compute_head, zeroshot_head

    visual = {k: v for k, v in tiny["state"].items() if not k.startswith("transformer.")}
    save_safetensors(tmp_path / "img.safetensors", visual, {})
    img = load_clip(model_config=tiny["cfg"], base=tmp_path / "img.safetensors")
    assert not img.has_text and not hasattr(img.model, "transformer")
    with pytest.raises(TvtoolError, match="image tower only.*--head FILE.*--text-tower"):
        zeroshot_head(img, ["a", "b"], ["{}"])
    # the text tower of another checkpoint gives the heads of the full model
    both = load_clip(
        model_config=tiny["cfg"], base=tmp_path / "img.safetensors", text_tower=str(tiny["st"])
    )
    full = load_clip(model_config=tiny["cfg"], base=tiny["st"])
    assert both.has_text and both.text_fingerprint
    assert torch.allclose(
        compute_head(both, ["a", "b"], ["{}"]), compute_head(full, ["a", "b"], ["{}"])
    )
    with pytest.raises(TvtoolError, match="no text tower"):
        load_clip(
            model_config=tiny["cfg"], base=tiny["st"], text_tower=str(tmp_path / "img.safetensors")
        )


def test_head_files_classification_head_and_tensor(clip, tmp_path):
    from public_bank import ClassificationHead, save_module

    from tvtool.models.heads import compute_head, zeroshot_head
    from tvtool.store.store import Store

    want = compute_head(clip, ["x", "y", "z"], ["a {}."])
    w = want * clip.logit_scale
    save_module(ClassificationHead(True, w), tmp_path / "head.pt")
    save_module(ClassificationHead(True, w), tmp_path / "head.pkl", plain=True)
    torch.save(w.clone(), tmp_path / "tensor.pt")
    store = Store()
    for f in ("head.pt", "head.pkl", "tensor.pt"):
        got = zeroshot_head(clip, ["x", "y", "z"], None, store, head_file=tmp_path / f)
        assert torch.allclose(got, want, atol=1e-6), f
    from tvtool.checkpoints.readers import file_sha256

    assert store.get_ref(f"cache/heads/file-{file_sha256(tmp_path / 'head.pt')}")  # kept
    with pytest.raises(TvtoolError, match="3 classes, the data set 2"):
        zeroshot_head(clip, ["x", "y"], None, None, head_file=tmp_path / "tensor.pt")
    torch.save(torch.zeros(3, 5), tmp_path / "wide.pt")
    with pytest.raises(TvtoolError, match="5 dimensions"):
        zeroshot_head(clip, ["x", "y", "z"], None, None, head_file=tmp_path / "wide.pt")
