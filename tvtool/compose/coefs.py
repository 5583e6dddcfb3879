"""The learnable coefficients Lambda [T, G] and the composition they drive.

    theta_k = theta_0,k + sum_t Lambda[t, g(k)] * tau_t,k

for every parameter k a vector covers (g(k): the column(s) of k's block; a partitioned tensor has
one column per group, chosen element by element by `partition_ids`). Base weights and vectors are
frozen; only the learnable entries of Lambda (vector t covers, and a selection keeps, the block)
are parameters, the others stay exactly 0. Lambda starts at 0 (training starts from the base) or
at `--init` (AdaMerging's isotropic 0.3), optionally clamped (`--clamp 0:1`).

The products (one per stack of same-shape parameters) are in compose.mixing; autograd keeps
references to the stacks, never copies of them, so memory grows by the vectors' bytes and no
more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tvtool.compose.mixing import compose_parts
from tvtool.models.bank import BankPlan, Stack
from tvtool.vectors.blocks import (
    CoefsLayout,
    Granularity,
    PartitionRule,
    make_blocks,
    partition_ids,
)


def build_layout(
    plan: BankPlan,
    granularity: Granularity = "tensor",
    partitions: int = 1,
    seed: int = 0,
    rule: PartitionRule = "tvtool",
) -> CoefsLayout:
    """The layout of a coefs object over the bank's vectors and the keys they cover."""
    blocks = make_blocks(plan.shapes(), granularity, partitions, rule)
    return CoefsLayout(
        vectors=plan.digests,
        blocks=blocks,
        granularity=granularity,
        partitions=partitions,
        partition_seed=seed,
        partition_rule=rule,
    )


def learnable_mask(layout: CoefsLayout, stacks: Sequence[Stack]) -> torch.Tensor:
    """[T, G] bool: True where a loaded (vector, key) pair feeds the coefficient. Under atlas's
    partition rule only the partitioned (2-D) tensors are learned: the released code gives every
    other tensor a zero update (`mask_multiply` returns 0 for them): their coefficients stay 0."""
    mask = torch.zeros(len(layout.vectors), layout.n_groups, dtype=torch.bool)
    index = layout.key_index()
    atlas = layout.partition_rule == "atlas" and layout.partitions > 1
    for s in stacks:
        for key in s.keys:
            b, off = index[key]
            if atlas and layout.blocks[b].groups == 1:
                continue
            groups = layout.blocks[b].groups
            for t in s.rows:
                mask[t, off : off + groups] = True
    return mask


def attach_layout(layout: CoefsLayout, stacks: Sequence[Stack]) -> None:
    """Give every stack the index that gathers its coefficients from Lambda ([L, n, groups])
    and, when partitioned, its element -> group map (small ints, on the stack's device)."""
    index = layout.key_index()
    for s in stacks:
        dev = s.device
        where = [index[k] for k in s.keys]
        groups = {layout.blocks[b].groups for b, _ in where}
        if len(groups) != 1:
            raise ValueError(f"parameters of one shape with different partitions: {s.keys[:3]}")
        s.groups = groups.pop()
        if s.groups > 1:
            s.expand()  # per-element groups weight dense tensors
        cols = torch.tensor([off for _, off in where], dtype=torch.long, device=dev)
        rows = torch.tensor(s.rows, dtype=torch.long, device=dev)
        span = torch.arange(s.groups, device=dev)
        s.index = (rows[None, :, None], cols[:, None, None] + span[None, None, :])
        s.ids = None
        if s.groups > 1:
            ids = torch.stack(
                [partition_ids(k, s.shape, s.groups, layout.partition_seed) for k in s.keys]
            )
            small = torch.uint8 if s.groups <= 255 else torch.int32
            s.ids = ids.to(small).to(dev)


attach_partitions = attach_layout  # the older name


class Coefs(torch.nn.Module):
    """Lambda [T, G] with only the `mask` entries learnable (a flat parameter `values`).

    `init`: the starting value of every learnable entry (0: the base model; AdaMerging starts
    from 0.3). `clamp` (lo, hi): Lambda = clamp(values, lo, hi) in the forward pass, as
    AdaMerging clamps to [0, 1] (the gradient is 0 outside the range)."""

    def __init__(
        self, mask: torch.Tensor, init: float = 0.0, clamp: tuple[float, float] | None = None
    ):
        super().__init__()
        self.shape = tuple(mask.shape)
        self.clamp = clamp
        self.register_buffer("index", mask.flatten().nonzero().squeeze(1), persistent=False)
        self.values = torch.nn.Parameter(torch.full((int(self.index.numel()),), float(init)))

    @property
    def n_learnable(self) -> int:
        return int(self.values.numel())

    def forward(self) -> torch.Tensor:
        flat = torch.zeros(
            self.shape[0] * self.shape[1], dtype=self.values.dtype, device=self.values.device
        )
        values = self.values if self.clamp is None else self.values.clamp(*self.clamp)
        return flat.index_put((self.index,), values).view(self.shape)

    @torch.no_grad()
    def matrix(self) -> torch.Tensor:
        """The current Lambda, detached, on the CPU."""
        return self.forward().detach().cpu()

    @torch.no_grad()
    def load_matrix(self, m: torch.Tensor) -> None:
        self.values.copy_(m.to(self.values.device, self.values.dtype).flatten()[self.index])


def compose_params(
    coefs: torch.Tensor,
    stacks: Sequence[Stack],
    layout: CoefsLayout,
    base: Mapping[str, torch.Tensor],
    buffers: dict[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """{parameter name: theta_0 + sum_t Lambda * tau} for every loaded parameter (gradients
    reach `coefs` only). Computed in full precision whatever autocast is active outside.

    `buffers` (a dict the caller keeps between steps, filled here): theta is written into the
    same memory every step instead of freshly allocated pages (on the CPU, faulting in the
    pages of a new theta costs about as much as computing it), and the backward copies transposed
    gradients into one parameter's worth of reused memory. The tensors of one call are
    then overwritten by the next: only for a loop that is done with them by then (a training
    step; autograd raises if a graph that saved them is still backpropagated)."""
    out: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=coefs.device.type, enabled=False):
        for i, s in enumerate(stacks):
            if s.index is None:
                attach_layout(layout, [s])
            lam = coefs[s.index]  # type: ignore[index]
            w0 = s.base if s.base is not None else torch.stack([base[p] for p in s.params])
            buf = scratch = None
            if buffers is not None and s.factors is None and s.ids is None:
                buf, scratch = buffers.get(i), buffers.get(-1 - i)
                if buf is None or buf.shape != w0.shape or buf.dtype != w0.dtype:
                    buf = buffers[i] = torch.empty_like(w0)
                    scratch = buffers[-1 - i] = w0.new_empty(w0[0].numel())
            out.update(zip(s.params, compose_parts(lam, s, w0, buf, scratch), strict=True))
    return out
