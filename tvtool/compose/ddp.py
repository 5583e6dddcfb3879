"""Running under `torchrun --nproc-per-node N -m tvtool compose ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_from_env` joins
the process group (gloo on CPU, nccl on CUDA, each rank on `cuda:LOCAL_RANK`). The coefficient
module is wrapped in DistributedDataParallel (gradients averaged across ranks), the data of every
step is sharded by rank (see sampling.py) and only rank 0 writes checkpoints and the result.
Without those variables (or with WORLD_SIZE=1) everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tvtool.errors import TvtoolError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False  # by us (so we tear it down)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast_object(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel over `module` when distributed, else the module itself."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        if self.initialised and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.initialised = False


def env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TvtoolError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number") from None


def init_from_env(device_spec: str) -> tuple[Dist, str]:
    """Join torchrun's process group when WORLD_SIZE > 1; returns (Dist, the device to use).

    Under torchrun with CUDA, `auto`/`cuda` become `cuda:LOCAL_RANK`."""
    world = env_world()
    if world <= 1:
        return Dist(), device_spec
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    spec = (device_spec or "auto").lower()
    use_cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise TvtoolError("--device cuda under torchrun, but CUDA is not available")
        if spec in ("auto", "cuda"):
            spec = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(spec))
    elif spec == "auto":
        spec = "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
        return Dist(rank, world, local, initialised=True), spec
    return Dist(rank, world, local), spec
