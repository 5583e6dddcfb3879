"""The small example zoo, built once per test session (cached between sessions in pytest's cache
directory: `build_zoo` reuses every stage whose recipe is unchanged)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_zoo(request: pytest.FixtureRequest):
    from filelock import FileLock

    from tvtool.demo.zoo import build_zoo

    root = Path(request.config.cache.mkdir("tvtool-demo-small"))
    with FileLock(str(root / ".lock")):
        return build_zoo(root / "zoo", seed=0, size="small")
