"""Every fixture of the suite (test modules import helpers, never another module's fixtures).

Every test gets its own store through $TVTOOL_HOME; the compose assets and the small example zoo
are built once per session in pytest's temporary directory (no cache outside the run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from compose_assets import TINY_CLIP, Assets, build_assets
from typer.testing import CliRunner

os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The reduced example zoo (`tvtool demo build --small`), built once per session."""
    from tvtool.demo.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("demo-small") / "zoo", seed=0, size="small")
