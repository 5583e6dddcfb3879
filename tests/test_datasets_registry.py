"""The built-in data sets: class names and templates as the papers' code publishes them."""

from __future__ import annotations

import json

import pytest

from tvtool.datasets import registry
from tvtool.datasets.templates import check_template, fill
from tvtool.errors import TvtoolError


@pytest.mark.parametrize(
    ("name", "classes", "first", "last", "templates"),
    [
        # task_vectors / atlas src/datasets (templates.py) and FusionBench classnames
        ("cifar100", 100, "apple", "worm", 18),
        ("cifar10", 10, "airplane", "truck", 18),
        ("sun397", 397, "abbey", "youth hostel", 2),
        ("imagenet", 1000, "tench", "toilet paper", 80),
        ("cars", 196, "AM General Hummer SUV 2000", "smart fortwo Convertible 2012", 8),
        ("dtd", 47, "banded", "zigzagged", 8),
        ("eurosat", 10, "annual crop land", "lake or sea", 3),
        ("gtsrb", 43, "red and white circle 20 kph speed limit",
         "white circle with gray strike bar indicating no passing for trucks has ended", 3),
        ("resisc45", 45, "airplane", "wetland", 18),
        ("mnist", 10, "0", "9", 1),
        ("svhn", 10, "0", "9", 1),
        ("flowers102", 102, "pink primrose", "blackberry lily", 1),
        ("country211", 211, "Andorra", "Zimbabwe", 5),
        ("voc2007", 20, "aeroplane", "tv monitor", 1),
        ("pets", 37, "Abyssinian", "Yorkshire Terrier", 1),
        ("food101", 101, "apple pie", "waffles", 1),
        ("cub200", 200, "Black footed Albatross", "Common Yellowthroat", 1),
        ("fer2013", 7, "angry", "surprised", 6),
        ("pcam", 2, "lymph node", "lymph node containing metastatic tumor tissue", 1),
        ("rendered_sst2", 2, "negative", "positive", 1),
        ("emnist_letters", 26, "A", "Z", 1),
        ("fashion_mnist", 10, "T - shirt / top", "Ankle boot", 2),
        ("kmnist", 10, "お", "を", 1),
        ("stl10", 10, "airplane", "truck", 2),
        ("tiny_imagenet", 200, "goldfish", "orange", 80),
        # atlas names these from the data; stored: its rule on the standard release
        ("caltech101", 101, "Faces", "yin_yang", 34),
        ("caltech256", 257, "ak47", "clutter", 34),
        ("ucf101", 101, "Apply_Eye_Makeup", "Yo_Yo", 48),
        # openai/CLIP data/prompts.md (FGVC-Aircraft's variants.txt)
        ("fgvc_aircraft", 100, "707-320", "Yak-42", 2),
        ("mango_leaf_disease", 8, "Anthracnose", "Sooty Mould", 6),  # FusionBench addition
    ],
)
def test_published_names_and_templates(name, classes, first, last, templates):
    d = registry.get(name)
    assert len(d.classnames) == classes
    assert (d.classnames[0], d.classnames[-1]) == (first, last)
    assert len(d.templates) == templates
    # no duplicates, except the two the OpenAI ImageNet names have ('missile', 'sunglasses')
    assert len(set(d.classnames)) == classes - (2 if name == "imagenet" else 0)
    assert all(check_template(t) == t for t in d.templates)
    assert d.sources["templates"] and "@" in d.sources["templates"]


def test_specific_templates_and_names():
    assert registry.get("mnist").templates == ['a photo of the number: "{}".']
    assert registry.get("eurosat").templates == [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ]
    cars = registry.get("cars").templates
    assert cars[0] == "a photo of a {}." and cars[3] == "i love my {}!"
    assert registry.get("imagenet").templates[0] == "a bad photo of a {}."
    assert registry.get("imagenet").classnames[1] == "goldfish"
    assert registry.get("gtsrb").templates[0] == 'a zoomed in photo of a "{}" traffic sign.'
    assert registry.get("sun397").classnames[1] == "airplane cabin"
    assert registry.get("dtd").templates[0] == "a photo of a {} texture."


def test_suites_match_the_papers():
    ta8 = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
    assert sorted(registry.names("ta8")) == ta8
    t14 = registry.names("tall14")
    assert len(t14) == 14 and set(ta8) <= set(t14)
    assert {"flowers102", "pcam", "fer2013", "pets", "stl10", "cifar100"} <= set(t14)
    t20 = registry.names("tall20")
    assert len(t20) == 20 and set(t14) <= set(t20)
    assert {"cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered_sst2"} \
        <= set(t20)
    a22 = registry.names("atlas22")
    assert len(a22) == 22 and {"ucf101", "caltech256", "voc2007", "country211", "imagenet"} \
        <= set(a22)
    with pytest.raises(TvtoolError, match="unknown suite"):
        registry.names("nope")


def test_aliases_variants_and_unknown_names():
    assert registry.get("Stanford-Cars").name == "cars"
    assert registry.get("oxford_pets").name == "pets"
    fb = registry.get("pets:fusionbench")
    assert fb.variant == "fusionbench" and fb.classnames[0] == "abyssinian"
    assert fb.templates == registry.get("pets").templates
    with pytest.raises(TvtoolError, match="no variant 'x'"):
        registry.get("pets:x")
    with pytest.raises(TvtoolError, match="unknown data set 'carz'"):
        registry.get("carz")
    assert registry.lookup("carz") is None
    assert registry.get("ucf101").classnames[36] == "Handstand_Pushups"  # CoOp's, not CLIP's


def test_parse_data_arg(tmp_path):
    d, p = registry.parse_data_arg(f"cars={tmp_path}")
    assert d.name == "cars" and p == tmp_path
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert registry.parse_data_arg(odd) == (None, odd)  # '=' inside a path: a path
    assert registry.parse_data_arg(str(tmp_path)) == (None, tmp_path)
    with pytest.raises(TvtoolError, match="unknown data set 'carz'"):
        registry.parse_data_arg(f"carz={tmp_path}")


def test_match_classnames():
    d = registry.get("eurosat")
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
               "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
    names, how = registry.match_classnames(d, folders, "x")
    assert how == "position" and names == d.classnames
    cifar = registry.get("cifar10")
    names, how = registry.match_classnames(cifar, ["truck", "Airplane", "ship"], "x")
    assert how == "name" and names == ["truck", "airplane", "ship"]
    names, how = registry.match_classnames(cifar, ["9", "0"], "x")
    assert how == "index" and names == ["truck", "airplane"]
    with pytest.raises(TvtoolError, match="3 classes, but data set 'eurosat' has 10"):
        registry.match_classnames(d, ["a", "b", "c"], "x")
    cal = registry.get("caltech256")  # atlas renames torchvision's category folders
    names, how = registry.match_classnames(
        cal, ["001.ak47", "002.american-flag", "253.faces-easy-101"], "x"
    )
    assert how == "name" and names == ["ak47", "american flag", "faces easy"]
    names, how = registry.match_classnames(cal, [str(i) for i in (0, 256)], "x")
    assert how == "index" and names == ["ak47", "clutter"]  # integer labels get atlas's names
    names, _ = registry.match_classnames(registry.get("ucf101"), ["Apply_Eye_Makeup"], "x")
    assert names == ["Apply_Eye_Makeup"]  # as atlas uses them
    names, _ = registry.match_classnames(registry.get("caltech101"), ["Faces_easy"], "x")
    assert names == ["Faces_easy"]
    fgvc = registry.get("fgvc_aircraft")  # 'F-16A/B' cannot be a folder: 100 folders by position
    names, how = registry.match_classnames(fgvc, [f"c{i:03d}" for i in range(100)], "x")
    assert how == "position" and names[72:74] == ["F-16A/B", "F/A-18"]
    pets = registry.get("pets")
    names, how = registry.match_classnames(pets, ["american_bulldog", "Abyssinian"], "x")
    assert how == "name" and names == ["American Bulldog", "Abyssinian"]


def test_clip_prompt_lists_as_variants():
    """openai/CLIP data/prompts.md, where it names classes differently from atlas."""
    c101 = registry.get("caltech101:openai").classnames
    assert len(c101) == 102 and c101[:4] == ["background", "off-center face", "centered face",
                                             "leopard"]
    assert c101[84] == "snoopy (cartoon beagle)" and c101[-1] == "yin and yang symbol"
    # one to one with the sorted folders after CLIP's 'background' (car_side <-> side of a car)
    assert registry.get("caltech101").classnames[19] == "car_side" and c101[20] == "side of a car"
    ucf = registry.get("ucf101:openai").classnames
    assert len(ucf) == 101 and ucf[36] == "Hand Stand Pushups" and ucf[-1] == "Yo Yo"
    assert [c.replace(" ", "_") for c in ucf][:36] == registry.get("ucf101").classnames[:36]
    src = registry.get("ucf101:openai").sources  # a variant names its own source
    assert src["classnames"].startswith("openai/CLIP") and src["templates"].startswith("fredzzhang")
    assert registry.get("caltech101").templates[10] == "a {} in a video game."
    assert registry.get("ucf101").templates[-1] == "a demonstration of the person practicing {}."
    assert registry.get("fgvc_aircraft").templates == [
        "a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."]


@pytest.mark.parametrize("bad", ["{}{0.__class__}", "{} {", "no placeholder", "{} and {}",
                                 "{0}", "{c.__init__}", "}{}"])
def test_unsafe_templates_are_refused(bad):
    with pytest.raises(TvtoolError, match="exactly one"):
        check_template(bad)


def test_fill_does_not_format():
    assert fill("a photo of a {}.", "{0.__class__}") == "a photo of a {0.__class__}."
    assert fill("a {c} here", "cat") == "a cat here"


def test_every_builtin_file_is_valid():
    from importlib import resources

    files = [f for f in (resources.files("tvtool.datasets") / "builtin").iterdir()
             if f.name.endswith(".json")]
    assert len(files) == len(registry.names()) >= 30
    for f in files:
        raw = json.loads(f.read_text(encoding="utf-8"))
        d = registry.BuiltinDataset.model_validate(raw)
        assert f.name == f"{d.name}.json"
        for t in d.templates:
            check_template(t)
        assert set(d.suites) <= set(registry.SUITES)


@pytest.mark.slow  # imports open_clip (torch)
def test_imagenet_equals_open_clip_zero_shot_metadata():
    """An independent copy of the same published lists: open_clip's zero-shot metadata."""
    from open_clip import zero_shot_metadata as meta

    d = registry.get("imagenet")
    assert d.classnames == list(meta.IMAGENET_CLASSNAMES)
    assert d.templates == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]


def test_datasets_cli(invoke):
    r = invoke("datasets", "ls", "--suite", "ta8")
    assert r.exit_code == 0
    head, *rows = [ln.split("\t") for ln in r.stdout.splitlines()]  # not a terminal: TSV
    assert head == ["name", "classes", "templates", "suites", "title"]
    assert [row[0] for row in rows] == sorted(registry.names("ta8"))
    assert rows[0] == ["cars", "196", "8", "ta8,tall14,tall20,atlas22", "Stanford Cars"]
    r = invoke("datasets", "ls", "--json")
    doc = json.loads(r.stdout)
    assert {d["name"]: d["classes"] for d in doc["datasets"]}["sun397"] == 397
    r = invoke("datasets", "show", "dtd", "--classnames")
    assert r.stdout.splitlines() == registry.get("dtd").classnames
    r = invoke("datasets", "show", "eurosat", "--templates")
    assert r.stdout.splitlines() == registry.get("eurosat").templates
    r = invoke("datasets", "show", "pets:fusionbench", "--json")
    assert json.loads(r.stdout)["classnames"][0] == "abyssinian"
    r = invoke("datasets", "show", "carz")
    assert r.exit_code == 1 and "unknown data set 'carz'" in r.stderr
    assert "Traceback" not in r.output
