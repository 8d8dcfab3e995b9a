"""The CPU replacement (test-owned) for vLLM's NCCL weight-update group: two ranks, the trainer (rank 0, which hosts
the TCP store, as vLLM's ``StatelessProcessGroup`` does) and the stand-in server (rank 1), joined by a gloo process
group of their own. It never touches ``torch.distributed``'s default group, which accelerate uses for training."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=300)


@dataclass
class StatelessGroup:
    """What TRL's ``VLLMClient.close_communicator`` reaches into (``communicator.group.store`` / ``.socket``)."""

    store: Any
    socket: Any = None


class WeightChannel:
    """A two-rank gloo group on its own TCP store; :meth:`broadcast` sends a tensor from rank 0 to rank 1."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=TIMEOUT)
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        options._timeout = TIMEOUT
        self.pg = dist.ProcessGroupGloo(store, rank, world_size, options)
        self.group = StatelessGroup(store)
        self.rank = rank

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        options = dist.BroadcastOptions()
        options.rootRank = src
        tensor = tensor.detach().contiguous().cpu() if self.rank == src else tensor
        self.pg.broadcast([tensor], options).wait()
        return tensor

    def receive(self, dtype_name: str, shape: list[int], src: int = 0) -> torch.Tensor:
        return self.broadcast(torch.empty(shape, dtype=getattr(torch, dtype_name)), src)


def join(init_info: dict[str, Any], rank: int) -> WeightChannel:
    """Join the group described by TRL's ``init_info`` (``master_address``, ``master_port``, ``world_size``)."""
    return WeightChannel(init_info["master_address"], int(init_info["master_port"]), rank, int(init_info["world_size"]))
