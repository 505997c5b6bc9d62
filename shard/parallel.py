"""Tensor-parallel group: which slice of the model this process holds, and the collectives.

At world size 1 every collective is a no-op, so the single-process path pays nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def kv_heads_per_rank(self, num_kv_heads: int) -> int:
        # More ranks than KV heads: each rank keeps a replica of one KV head (as vLLM does).
        return max(1, num_kv_heads // self.size)

    def kv_head_range(self, num_kv_heads: int) -> tuple[int, int]:
        per = self.kv_heads_per_rank(num_kv_heads)
        if self.size <= num_kv_heads:
            return self.rank * per, (self.rank + 1) * per
        first = self.rank * num_kv_heads // self.size
        return first, first + 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's slice along the last dimension (vocabulary-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


def check_divisible(num_heads: int, num_kv_heads: int, intermediate: int, size: int) -> None:
    """Fail before anything starts when the model can't be split `size` ways, and say which N work."""
    def ok(n: int) -> bool:
        kv_ok = num_kv_heads % n == 0 or n % num_kv_heads == 0
        return num_heads % n == 0 and kv_ok and intermediate % n == 0

    if not ok(size):
        good = [n for n in range(1, num_heads + 1) if ok(n)]
        raise ValueError(
            f"cannot split the model {size} ways: {num_heads} attention heads, {num_kv_heads} KV heads "
            f"and MLP width {intermediate} must each divide evenly; --num-shard can be one of {good}"
        )


def init_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str | None = None) -> TPGroup:
    """Join the tensor-parallel group: gloo on CPU, NCCL when CUDA is there (overridable)."""
    import datetime

    import torch.distributed as dist

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # Idle ranks wait in a broadcast for the next step: the timeout must outlast any idle spell.
    dist.init_process_group(
        backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(days=365),
    )
    return TPGroup(rank, world_size)


def broadcast_step(payload: object) -> object:
    """Rank 0 sends this step's inputs (or None: shut down); the other ranks receive them."""
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]
