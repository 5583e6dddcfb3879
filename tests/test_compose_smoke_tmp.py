import os, subprocess, sys, time, json, torch
from pathlib import Path
from test_compose_support import *  # noqa

def test_smoke(assets, clip, invoke, tmp_path):
    d = extract(assets, assets.ft_colors, "colors")
    args = ["compose", "colors", *model_args(assets), "--data", str(assets.colors), "--val", str(assets.colors_val), "--epochs", "3", "--shots", "5", "--batch-size", "4", "--json"]
    t0 = time.time()
    r = invoke(*args)
    single = json.loads(r.stdout)
    print("single", time.time() - t0)
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "tvtool", *args[:-1], "-q"], capture_output=True, text=True, env=env)
    print("ddp", time.time() - t0, p.returncode, p.stdout, p.stderr[-3000:])
    from tvtool.vectors.stored import load_tensor_object
    from tvtool.store.store import Store
    m, t = load_tensor_object(Store(), p.stdout.strip(), "coefs")
    a = torch.tensor(single["coefs"])
    print((t["coefs"] - a).abs().max())
    print(m.params["history"])
    print(single["history"])
