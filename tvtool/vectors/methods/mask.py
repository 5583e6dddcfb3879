"""`mask`: apply each term's stored importance mask (from `select`), then task arithmetic.
A tensor the mask lacks is dropped; a negative weight forgets."""

from __future__ import annotations

from typing import Literal

from tvtool.vectors.methods.base import Method, Params, TensorInfo, TermState


class MaskParams(Params):
    method: Literal["mask"] = "mask"


class Mask(Method):
    name = "mask"
    summary = (
        "apply the importance masks written by `select` (--mask, matched to terms by vector; "
        "tensors a mask lacks are dropped), then sum; a negative weight forgets."
    )
    Params = MaskParams
    uses_masks = True

    def term(self, x, t: TensorInfo, term: TermState, p: MaskParams, mask=None):
        return x.mul_(mask.to(x.dtype).clamp_(max=1)) if mask is not None else x.zero_()


METHOD = Mask()
