"""The learnable coefficients Lambda [T, G] and the composition they drive.

    theta_k = theta_0,k + sum_t Lambda[t, g(k)] * tau_t,k

for every parameter k a vector covers (g(k): the column(s) of k's block; a partitioned tensor has
one column per group, chosen element by element by `partition_ids`). Base weights and vectors are
frozen; only the learnable entries of Lambda (vector t covers, and a selection keeps, the block)
are parameters, the others stay exactly 0. Lambda starts at 0: training starts from the base.

The mix is computed in the vectors' device dtype (fp16/bf16 halve the memory traffic) and added
to the fp32 base; autograd keeps references to the stacks, never copies of them, so memory grows
by the vectors' bytes and no more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tvtool.compose.bank import BankPlan, Stack
from tvtool.vectors.blocks import CoefsLayout, Granularity, make_blocks, partition_ids


def build_layout(
    plan: BankPlan, granularity: Granularity = "tensor", partitions: int = 1, seed: int = 0
) -> CoefsLayout:
    """The layout of a coefs object over the bank's vectors and the keys they cover."""
    blocks = make_blocks(plan.shapes(), granularity, partitions)
    return CoefsLayout(
        vectors=plan.digests,
        blocks=blocks,
        granularity=granularity,
        partitions=partitions,
        partition_seed=seed,
    )


def learnable_mask(layout: CoefsLayout, stacks: Sequence[Stack]) -> torch.Tensor:
    """[T, G] bool: True where a loaded (vector, key) pair feeds the coefficient."""
    mask = torch.zeros(len(layout.vectors), layout.n_groups, dtype=torch.bool)
    index = layout.key_index()
    for s in stacks:
        b, off = index[s.key]
        groups = layout.blocks[b].groups
        for t in s.rows:
            mask[t, off : off + groups] = True
    return mask


def attach_partitions(layout: CoefsLayout, stacks: Sequence[Stack]) -> None:
    """Give every partitioned stack its element -> group map (small ints, on the stack's device)."""
    index = layout.key_index()
    for s in stacks:
        groups = layout.blocks[index[s.key][0]].groups
        if groups > 1:
            ids = partition_ids(s.key, s.shape, groups, layout.partition_seed)
            small = torch.uint8 if groups <= 255 else torch.int32
            s.ids = ids.to(small).to(s.tensor.device)


class Coefs(torch.nn.Module):
    """Lambda [T, G] with only the `mask` entries learnable (a flat parameter `values`)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.shape = tuple(mask.shape)
        self.register_buffer("index", mask.flatten().nonzero().squeeze(1), persistent=False)
        self.values = torch.nn.Parameter(torch.zeros(int(self.index.numel())))

    @property
    def n_learnable(self) -> int:
        return int(self.values.numel())

    def forward(self) -> torch.Tensor:
        flat = torch.zeros(
            self.shape[0] * self.shape[1], dtype=self.values.dtype, device=self.values.device
        )
        return flat.index_put((self.index,), self.values).view(self.shape)

    @torch.no_grad()
    def matrix(self) -> torch.Tensor:
        """The current Lambda, detached, on the CPU."""
        return self.forward().detach().cpu()

    @torch.no_grad()
    def load_matrix(self, m: torch.Tensor) -> None:
        self.values.copy_(m.to(self.values.device, self.values.dtype).flatten()[self.index])


class _PartitionedMix(torch.autograd.Function):
    """delta[i] = sum_j lam[j, ids[i]] * stack[j, i]: one coefficient per (vector, group)."""

    @staticmethod
    def forward(ctx, lam: torch.Tensor, stack: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.long()
        lam_c = lam.to(stack.dtype)
        delta = lam_c[0][idx] * stack[0]
        for j in range(1, stack.shape[0]):
            delta.addcmul_(lam_c[j][idx], stack[j])
        ctx.save_for_backward(stack, ids)
        ctx.groups = lam.shape[1]
        ctx.lam_dtype = lam.dtype
        return delta

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stack, ids = ctx.saved_tensors
        idx = ids.long().flatten()
        g = grad.float().flatten()
        out = torch.zeros(stack.shape[0], ctx.groups, dtype=torch.float32, device=grad.device)
        for j in range(stack.shape[0]):
            out[j].index_add_(0, idx, g * stack[j].flatten().float())
        return out.to(ctx.lam_dtype), None, None


def mix(lam: torch.Tensor, stack: Stack) -> torch.Tensor:
    """sum_j lam[j] * tau_j for one parameter; `lam` is [n, groups] for the stack's rows."""
    if stack.ids is None:
        return torch.tensordot(lam[:, 0].to(stack.tensor.dtype), stack.tensor, dims=1)
    return _PartitionedMix.apply(lam, stack.tensor, stack.ids)


def compose_params(
    coefs: torch.Tensor,
    stacks: Sequence[Stack],
    layout: CoefsLayout,
    base: Mapping[str, torch.Tensor],
    index: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """{parameter name: theta_0 + sum_t Lambda * tau} for every loaded stack (gradients reach
    `coefs` only). Computed in full precision whatever autocast is active outside."""
    index = index or layout.key_index()
    out: dict[str, torch.Tensor] = {}
    device_type = coefs.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        for s in stacks:
            b, off = index[s.key]
            groups = layout.blocks[b].groups
            rows = s.rows_t if s.rows_t is not None else s.rows
            lam = coefs[rows, off : off + groups]
            w0 = base[s.param]
            out[s.param] = w0 + mix(lam, s).to(w0.dtype)
    return out
