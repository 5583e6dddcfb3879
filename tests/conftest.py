"""Every fixture of the suite (test modules import helpers, never another module's fixtures).

Every test gets its own store through $TVTOOL_HOME; the compose assets and the small example zoo
are built once per session in pytest's temporary directory (no cache outside the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compose_assets import TINY_CLIP, Assets, build_assets, extract, model_args
from eval_assets import build_eval_env
from typer.testing import CliRunner

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(autouse=True)
def isolated_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $TVTOOL_HOME at a fresh directory so no test sees another's store."""
    home = tmp_path / "tvtool-home"
    monkeypatch.setenv("TVTOOL_HOME", str(home))
    monkeypatch.delenv("TVTOOL_DEBUG", raising=False)
    return home


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner: CliRunner):
    """Run the CLI in-process; returns the click Result (stdout and stderr separate)."""
    from tvtool.cli.app import app

    def _invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return _invoke


@pytest.fixture
def run_tvtool():
    """Run `python -m tvtool ARGS` in a child process on one thread, with the test's store
    ($TVTOOL_HOME) unless `env` says otherwise; returns the CompletedProcess (text)."""

    def _run(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tvtool", *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            cwd=ROOT,
            check=False,
        )

    return _run


@pytest.fixture
def tiny_clip_config(tmp_path: Path) -> Path:
    """A tiny open_clip model config (registered by name 'tvtool-tiny' via its file name)."""
    path = tmp_path / "tvtool-tiny.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """A tiny open_clip base, two synthetic image tasks and their fine-tuned models."""
    return build_assets(tmp_path_factory.mktemp("compose-assets"))


@pytest.fixture(scope="session")
def clip(assets: Assets):
    """The base model (shared: tests must not change its weights' values)."""
    from tvtool.models.build import load_clip

    return load_clip(model_config=assets.cfg, base=assets.base)


@pytest.fixture
def two_vectors(assets: Assets) -> list[str]:
    """The colours and stripes task vectors of the assets, stored as `c` and `s` (digests)."""
    return [extract(assets, assets.ft_colors, "c"), extract(assets, assets.ft_stripes, "s")]


@pytest.fixture
def select_two(assets: Assets, two_vectors: list[str], invoke):
    """`tvtool select c s MODEL --data COLOURS ARGS...` (the CLI result)."""
    return lambda *args: invoke(
        "select", "c", "s", *model_args(assets), "--data", assets.colors, *args
    )


@pytest.fixture
def bank(assets: Assets, clip, two_vectors: list[str]):
    """The two vectors planned over the base's image tower, the colours folder, its zero-shot
    head and all its indices: ``(store, digests, plan, folder, head, idx)``."""
    from tvtool.datasets.images import ImageFolder
    from tvtool.models.bank import plan_bank
    from tvtool.models.functional import visual_params
    from tvtool.models.heads import zeroshot_head
    from tvtool.store.store import Store

    store = Store()
    plan = plan_bank(
        store, two_vectors, visual_params(clip), set(clip.model.state_dict()),
        clip.base_fingerprint,
    )
    folder = ImageFolder(assets.colors)
    head = zeroshot_head(clip, folder.classnames)
    return store, two_vectors, plan, folder, head, list(range(len(folder)))


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The eval tests' tiny base, two 'fine-tuned' checkpoints (base + tau_t) and two data sets
    with splits (`tests/eval_assets.py`)."""
    return build_eval_env(tmp_path_factory.mktemp("eval"))


@pytest.fixture
def vecs(env: dict) -> list[str]:
    """The two task vectors of `env`, stored (with the base fingerprint) in this test's store."""
    from tvtool.checkpoints.readers import checkpoint_fingerprint
    from tvtool.store.store import Store
    from tvtool.vectors.stored import save_tensor_object

    store = Store(None)
    fp = checkpoint_fingerprint(env["dir"] / "base.safetensors")
    names = []
    for t, tau in enumerate(env["taus"]):
        m = save_tensor_object(store, "vector", tau, params={"base": {"fingerprint": fp}})
        store.set_ref(f"v{t}", m.digest)
        names.append(f"v{t}")
    return names


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The reduced example zoo (`tvtool demo build --small`), built once per session."""
    from tvtool.demo.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("demo-small") / "zoo", seed=0, size="small")
