"""Build (or reuse) the example zoo: data folders, a pre-trained tiny CLIP, fine-tuned checkpoints.

    DIR/zoo.json                          what was built: recipe, domains, splits, paths, accuracies
    DIR/data/<domain>/<split>/<class>/    PNG image folders
    DIR/models/<name>.json                the open_clip model config (name = file stem)
    DIR/models/templates.txt              the prompt templates the zero-shot head was built with
    DIR/models/zeroshot.safetensors       the "pre-trained" model
    DIR/models/<domain>/finetuned.safetensors
    DIR/models/<domain>/attention.safetensors   only the attention linear layers fine-tuned

Each stage is keyed by a hash of the part of the recipe it depends on (stored in the
safetensors metadata / a stamp file), so a second run reuses whatever is already there.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from tvtool.demo.domains import CLASSNAMES, describe
from tvtool.demo.recipe import Size, ZooRecipe, recipe_for
from tvtool.errors import TvtoolError

MARKER = ".tvtool-zoo"
KEY = "tvtool.zoo.key"

# progress(stage description, total units) -> tick(n)
Progress = Callable[[str, int], Callable[[int], None]]


class ZooInfo(BaseModel):
    """zoo.json: everything a consumer (tests, `tvtool demo`) needs, paths relative to the zoo."""

    format: int
    recipe: ZooRecipe
    recipe_hash: str
    model_name: str
    model_config_path: str
    templates_path: str
    zeroshot: str
    finetuned: dict[str, str]
    attention: dict[str, str] = {}  # attention-only fine-tunes
    data: dict[str, dict[str, str]]
    split_sizes: dict[str, int]
    classnames: list[str]
    domains: dict[str, str]
    accuracy: dict[str, dict[str, float]]  # domain -> {"zeroshot"|"finetuned"|"attention": %}
    seconds: dict[str, float]


@dataclass
class ZooPaths:
    """Absolute paths of a built zoo."""

    root: Path
    info: ZooInfo
    reused: list[str] = field(default_factory=list)

    @property
    def recipe(self) -> ZooRecipe:
        return self.info.recipe

    @property
    def model_config(self) -> Path:
        return self.root / self.info.model_config_path

    @property
    def templates(self) -> Path:
        return self.root / self.info.templates_path

    @property
    def zeroshot(self) -> Path:
        return self.root / self.info.zeroshot

    def finetuned(self, domain: str) -> Path:
        return self.root / self.info.finetuned[domain]

    def attention(self, domain: str) -> Path:
        return self.root / self.info.attention[domain]

    def data(self, domain: str, split: str) -> Path:
        return self.root / self.info.data[domain][split]


def load_zoo(root: Path) -> ZooPaths:
    path = Path(root) / "zoo.json"
    if not path.is_file():
        raise TvtoolError(f"no example zoo at {root} (zoo.json missing): run `tvtool demo build`")
    return ZooPaths(Path(root), ZooInfo.model_validate_json(path.read_text()))


def _check_out_dir(root: Path, recipe: ZooRecipe, force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise TvtoolError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
        raise TvtoolError(f"{root} is not empty and holds no example zoo; choose another --out")
    info = root / "zoo.json"
    if info.is_file() and not force:
        try:
            old = ZooInfo.model_validate_json(info.read_text())
        except ValueError:  # an older zoo.json format: a stale cache, rebuilt
            return
        # same size and seed under an older recipe (a tvtool upgrade): stale, rebuilt quietly
        if (old.recipe.size, old.recipe.seed) != (recipe.size, recipe.seed):
            raise TvtoolError(
                f"{root} holds a zoo built with another recipe (size {old.recipe.size}, "
                f"seed {old.recipe.seed}); use --force to rebuild it or choose another --out"
            )


def _stored_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(KEY)
    except Exception:
        return None


def stage_keys(recipe: ZooRecipe) -> dict[str, str]:
    """The hash each stage's output is stored with: a stage is rebuilt when its key changes."""
    data = recipe.digest("seed", "splits", "pretrain_domains", "task_domains", "target_domains")
    keys = {"data": f"{data}-{recipe.model.image_size}"}
    keys["pretrain"] = recipe.digest(
        "seed", "threads", "model", "splits", "pretrain_domains", "templates", "pretrain"
    )
    for d in recipe.task_domains:
        keys[f"finetune:{d}"] = f"{keys['pretrain']}-{recipe.digest('finetune')}-{d}"
    attn = recipe.digest("attention_finetune")
    for d in recipe.task_domains:
        keys[f"attention:{d}"] = f"{keys['pretrain']}-{attn}-attention-{d}"
    return keys


def _complete(root: Path, recipe: ZooRecipe) -> ZooPaths | None:
    """The zoo already at `root` when every stage of `recipe` is there, else None."""
    try:
        zoo = load_zoo(root)
    except (TvtoolError, ValueError):
        return None
    keys = stage_keys(recipe)
    stamp = root / "data" / ".stamp"
    ok = (
        zoo.info.recipe_hash == recipe.digest()
        and stamp.is_file()
        and stamp.read_text() == keys["data"]
        and zoo.model_config.is_file()
        and _stored_key(zoo.zeroshot) == keys["pretrain"]
        and all(_stored_key(zoo.finetuned(d)) == keys[f"finetune:{d}"] for d in recipe.task_domains)
        and set(zoo.info.attention) == set(recipe.task_domains)
        and all(
            _stored_key(zoo.attention(d)) == keys[f"attention:{d}"] for d in recipe.task_domains
        )
    )
    if not ok:
        return None
    zoo.reused = list(keys)
    return zoo


def _no_progress(desc: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def build_zoo(
    out_dir: Path | str,
    seed: int = 0,
    size: Size = "full",
    *,
    force: bool = False,
    progress: Progress | None = None,
    recipe: ZooRecipe | None = None,
) -> ZooPaths:
    """Build the zoo under `out_dir` (reusing every stage already built with the same recipe).

    `recipe` replaces the calibrated one for (`size`, `seed`) — for experiments.
    """
    import torch

    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.demo import data as zdata
    from tvtool.demo import train

    progress = progress or _no_progress
    recipe = recipe or recipe_for(size, seed)
    root = Path(out_dir)
    _check_out_dir(root, recipe, force)
    done = _complete(root, recipe)
    if done is not None:
        return done
    keys = stage_keys(recipe)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()
    models = root / "models"
    models.mkdir(exist_ok=True)
    seconds: dict[str, float] = {}
    reused: list[str] = []

    # the open_clip config and templates (tiny text files: always rewritten)
    cfg_path = models / f"{recipe.model.name}.json"
    cfg_path.write_text(json.dumps(recipe.model.open_clip_config(), indent=2) + "\n")
    templates_path = models / "templates.txt"
    templates_path.write_text("\n".join(recipe.templates) + "\n")

    # data
    t0 = time.perf_counter()
    data_key = keys["data"]
    stamp = root / "data" / ".stamp"
    sets = zdata.render(
        recipe.all_domains,
        recipe.pretrain_domains,
        recipe.splits,
        recipe.seed,
        recipe.model.image_size,
    )
    if stamp.is_file() and stamp.read_text() == data_key:
        reused.append("data")
    else:
        shutil.rmtree(root / "data", ignore_errors=True)
        n = sum(len(dd.labels) for by in sets.values() for dd in by.values())
        tick = progress("writing image folders", n)
        zdata.write_image_folders(root / "data", sets)
        tick(n)
        stamp.write_text(data_key)
    seconds["data"] = time.perf_counter() - t0

    with train.deterministic(recipe.seed, recipe.threads):
        tokens = train.caption_tokens(cfg_path, recipe.templates)
        n_t = len(recipe.templates)

        # pre-training
        t0 = time.perf_counter()
        zs_path = models / "zeroshot.safetensors"
        pre_key = keys["pretrain"]
        if _stored_key(zs_path) == pre_key:
            reused.append("pretrain")
            model = train.create_model(cfg_path, _load(zs_path))
        else:
            torch.manual_seed(recipe.seed)
            model = train.create_model(cfg_path)
            imgs = torch.cat([sets[d]["pretrain"].images for d in recipe.pretrain_domains])
            labels = torch.cat([sets[d]["pretrain"].labels for d in recipe.pretrain_domains])
            tick = progress("pre-training (CLIP contrastive)", recipe.pretrain.epochs)
            train.pretrain_clip(
                model, imgs, labels, tokens, n_t, recipe.pretrain, recipe.seed, tick
            )
            _save(save_safetensors, zs_path, model.state_dict(), pre_key, "zeroshot")
        seconds["pretrain"] = time.perf_counter() - t0
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        head = train.zeroshot_head(model, tokens, n_t)

        # fine-tuning, one checkpoint per task domain
        accuracy: dict[str, dict[str, float]] = {}
        for d in [*recipe.pretrain_domains, *recipe.task_domains, *recipe.target_domains]:
            test = sets[d]["test"]
            accuracy[d] = {"zeroshot": train.accuracy(model, head, test.images, test.labels)}
        finetuned: dict[str, str] = {}
        attention: dict[str, str] = {}
        jobs = [("finetune", "finetuned", recipe.finetune, finetuned, "fine-tuning")]
        jobs.append(
            ("attention", "attention", recipe.attention_finetune, attention, "attention-only")
        )
        for stage, stem, sched, paths, verb in jobs:
            for i, d in enumerate(recipe.task_domains):
                t0 = time.perf_counter()
                path = models / d / f"{stem}.safetensors"
                key = keys[f"{stage}:{d}"]
                if _stored_key(path) == key:
                    reused.append(f"{stage}:{d}")
                    ft_model = train.create_model(cfg_path, _load(path))
                else:
                    model.load_state_dict(base_state)
                    ft_model = model
                    train_set = sets[d]["train"]
                    tick = progress(f"{verb} {d}", sched.epochs)
                    train.finetune_image_tower(
                        ft_model,
                        head,
                        train_set.images,
                        train_set.labels,
                        sched,
                        recipe.seed * 1000 + i + 1,  # the same data order for both kinds
                        tick,
                        attention_only=stage == "attention",
                    )
                    path.parent.mkdir(exist_ok=True)
                    what = d if stage == "finetune" else f"{d} {stem}"
                    _save(save_safetensors, path, ft_model.state_dict(), key, what)
                test = sets[d]["test"]
                accuracy[d][stem] = train.accuracy(ft_model, head, test.images, test.labels)
                paths[d] = str(path.relative_to(root))
                seconds[f"{stage}:{d}"] = time.perf_counter() - t0
        model.load_state_dict(base_state)

    info = ZooInfo(
        format=recipe.format,
        recipe=recipe,
        recipe_hash=recipe.digest(),
        model_name=recipe.model.name,
        model_config_path=str(cfg_path.relative_to(root)),
        templates_path=str(templates_path.relative_to(root)),
        zeroshot=str(zs_path.relative_to(root)),
        finetuned=finetuned,
        attention=attention,
        data={d: {s: f"data/{d}/{s}" for s in by} for d, by in sets.items()},
        split_sizes={s: len(sets[recipe.pretrain_domains[0]][s].labels) for s in zdata.SPLITS},
        classnames=list(CLASSNAMES),
        domains={d: describe(d) for d in recipe.all_domains},
        accuracy={d: {k: round(v, 2) for k, v in a.items()} for d, a in accuracy.items()},
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    (root / "zoo.json").write_text(info.model_dump_json(indent=2) + "\n")
    return ZooPaths(root, info, reused)


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(save_fn, path: Path, state: dict, key: str, what: str) -> None:
    tensors = {k: v.detach().contiguous() for k, v in sorted(state.items())}
    save_fn(path, tensors, {KEY: key, "tvtool.zoo.model": what}, force=True)
