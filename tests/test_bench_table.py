"""bench/table.py: the README's benchmark table is exactly what the recorded results give."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_readme_table_equals_the_recorded_results() -> None:
    table = _table()
    readme = (ROOT / "README.md").read_text()
    assert table.START in readme and table.END in readme
    current = readme.split(table.START, 1)[1].split(table.END, 1)[0].strip("\n")
    expected = table.render().strip("\n")
    assert current == expected, "README benchmark table is stale: run python bench/table.py --write"


def test_every_results_file_has_rows_and_numbers_come_from_it(tmp_path: Path) -> None:
    table = _table()
    (tmp_path / "newbench.json").write_text(json.dumps({
        "vectors": 3,
        "rows": [
            {"mode": "import", "label": "import only", "wall_s": 0.0, "over_import_mb": 0.0},
            {"mode": "a", "label": "tvtool thing", "wall_s": 1.234, "over_import_mb": 56.7,
             "x_floor": 1.5},
        ],
    }))
    (tmp_path / "compose-cpu.json").write_text(json.dumps({
        "settings": {"batch_size": 8},
        "rows": [
            {"mode": "plain", "vectors": 0, "dtype": "-", "step_s": 0.2, "step_ratio": 1.0,
             "extra_bytes": 0},
            {"mode": "compose", "vectors": 8, "dtype": "float32", "step_s": 0.25,
             "step_ratio": 1.25, "extra_bytes": 3e6},
        ],
    }))
    out = table.render(tmp_path)
    assert "| newbench | tvtool thing | 1.23 s | 57 MB | 1.50x floor |" in out
    assert "import only" not in out
    assert "| compose-cpu | compose step, 8 vectors float32 | 250.0 ms | 3 MB" in out
    assert "1.25x plain" in out and "- `newbench`: vectors 3" in out
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.START}\nold\n{table.END}\noutro\n")
    assert table.refresh_readme(tmp_path, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert out in text
    assert not table.refresh_readme(tmp_path, readme)  # idempotent
