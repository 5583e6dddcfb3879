"""Shared fixtures: every test gets its own store through $TVTOOL_HOME."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 16,
        "patch_size": 4,
        "width": 64,
        "layers": 2,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


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
