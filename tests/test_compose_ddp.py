"""compose under DistributedDataParallel: 2 gloo processes on the CPU match one process."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compose_assets import extract, model_args

from tvtool.store.store import Store
from tvtool.vectors.stored import load_tensor_object


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    """One torchrun-like rank: the environment torchrun would set, then the CLI in-process."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from typer.testing import CliRunner

    from tvtool.cli.app import app

    r = CliRunner().invoke(app, args, catch_exceptions=True)
    Path(out).write_text(
        json.dumps(
            {"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "exc": repr(r.exception)}
        )
    )


def _args(a, extra: list[str]) -> list[str]:
    return [
        "compose",
        "c",
        "s",
        *model_args(a),
        "--data",
        str(a.colors),
        "--val",
        str(a.colors_val),
        "--shots",
        "5",
        "--min-steps",
        "0",
        "--epochs",
        "2",
        "--batch-size",
        "5",
        "--grad-accum",
        "2",
        "--partitions",
        "2",
        *extra,
    ]


@pytest.mark.slow
def test_two_gloo_processes_match_one(assets, clip, invoke, tmp_path):
    extract(assets, assets.ft_colors, "c")
    extract(assets, assets.ft_stripes, "s")
    single = invoke(*_args(assets, ["--json"]))
    assert single.exit_code == 0, single.stderr
    one = json.loads(single.stdout)
    assert one["world_size"] == 1

    # spawn, not fork: forking a process whose torch thread pools already ran can deadlock
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, port, _args(assets, ["--json"]), outs[r]))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0
    res = [json.loads(Path(o).read_text()) for o in outs]
    assert [r["code"] for r in res] == [0, 0], res
    assert res[1]["stdout"] == ""  # only rank 0 reports and writes
    two = json.loads(res[0]["stdout"])
    assert two["world_size"] == 2
    torch.testing.assert_close(
        torch.tensor(two["coefs"]), torch.tensor(one["coefs"]), rtol=1e-4, atol=1e-6
    )
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["val_acc"] == b["val_acc"]
        if a["train_loss"] is not None:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    m = Store().manifest(two["digest"])
    assert m.params["world_size"] == 2


@pytest.mark.slow
def test_torchrun_launches_the_same_command(assets, clip, invoke):
    extract(assets, assets.ft_colors, "c")
    extract(assets, assets.ft_stripes, "s")
    single = json.loads(invoke(*_args(assets, ["--json"])).stdout)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "tvtool",
            *_args(assets, ["-q"]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    digest = p.stdout.strip()
    assert len(digest) == 64  # one line: rank 1 prints nothing
    _, t = load_tensor_object(Store(), digest, "coefs")
    torch.testing.assert_close(t["coefs"], torch.tensor(single["coefs"]), rtol=1e-4, atol=1e-6)
