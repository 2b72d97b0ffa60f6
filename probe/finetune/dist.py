"""Data-parallel fine-tuning under `torchrun`: the process group, the model wrapper and the few collectives
the loop needs. A plain process is world size 1 and every helper here is then a no-op.

    torchrun --nproc-per-node 2 -m probe finetune DATA --out RUN ...

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `distributed()` reads them, joins the
group (NCCL on GPU, gloo on CPU) and pins each process to cuda:LOCAL_RANK. Rank 0 is the one that writes files
and logs at INFO; the others log warnings only.

Example:
    >>> with distributed("cpu") as ctx:
    ...     ctx.rank, ctx.world_size, ctx.device
    (0, 1, device(type='cpu'))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..device import resolve_device
from ..errors import ProbeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in a new DistributedDataParallel, registering the parameters that require grad *now*.

        DDP fixes its gradient buckets at construction: a parameter frozen then is never all-reduced, even
        after it thaws (each rank would silently train its own copy), and find_unused_parameters does not
        change that — it only tolerates registered parameters that get no gradient. So the loop wraps again
        whenever the trainable set changes (`gradual` thawing a group) and wraps exactly the trainable set,
        which needs no find_unused_parameters (and skips its extra graph walk every step)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers (the default): BatchNorm running statistics follow rank 0's at every forward
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64: counts stay exact); every rank gets it."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere: after an epoch each rank's copy also holds its
        own last batch; with this all ranks evaluate, and rank 0 saves, one and the same model."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 in a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True unless this is a torchrun worker of rank > 0 (the CLI prints its summary on rank 0 only)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistContext]:
    """Join torchrun's process group for the duration (world size 1: just resolve ``device``).

    A group that is already initialised (the caller's) is used and left alone; one created here is destroyed
    on exit. Ranks > 0 log at WARNING meanwhile."""
    world = env_world_size()
    if world <= 1:
        yield DistContext(device=resolve_device(device))
        return
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ProbeError(f"WORLD_SIZE={world} but {var} is not set: start distributed fine-tuning with "
                             f"`torchrun --nproc-per-node N -m probe finetune …`")
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ProbeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: use "
                             f"--nproc-per-node <= {torch.cuda.device_count()} or --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ProbeError(f"--device {device}: distributed fine-tuning runs on cuda (NCCL) or cpu (gloo)")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)
    pkg = logging.getLogger(__name__.split(".")[0])  # "probe"
    level = pkg.level
    if not ctx.is_main:
        pkg.setLevel(max(logging.WARNING, level))
    try:
        yield ctx
    finally:
        pkg.setLevel(level)
        if owned:
            dist.destroy_process_group()
