import torch
from test_compose_support import *  # noqa
from tvtool.models.build import load_clip
from tvtool.models.functional import visual_params
from tvtool.vectors.stored import load_tensor_object
from tvtool.store.store import Store
def test_x(assets, clip):
    d = extract(assets, assets.ft_colors, "c")
    ft = load_clip(model_config=assets.cfg, base=assets.ft_colors)
    _, tau = load_tensor_object(Store(), d, "vector")
    vp = visual_params(ft)
    for lam in [0, -0.25, -0.5, -0.75, -1.0]:
        ov = {k: vp[k] + lam * tau[k] for k in tau}
        print(lam, accuracy(ft, assets.colors, ov), accuracy(ft, assets.stripes, ov))
