"""Multi-process helpers over paddle.distributed: set-up, rank checks, and sums across ranks.

Processes are started by Paddle's own launcher (``python -m paddle.distributed.launch``), which sets the
PADDLE_* environment each rank reads; one process on its own is a world of size 1 and needs no set-up.
"""
from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

import paddle
import paddle.distributed as dist
from paddle import nn


def setup() -> Tuple[int, int]:
    """Join the process group when launched with several ranks; return (rank, world_size)."""
    world = dist.get_world_size()
    if world > 1:
        dist.init_parallel_env()
    return dist.get_rank(), world


def sum_across_ranks(values: Sequence[float], world: int) -> List[float]:
    """Element-wise sum of ``values`` over all ranks (float64, so counts stay exact)."""
    if world == 1:
        return [float(v) for v in values]
    tensor = paddle.to_tensor([float(v) for v in values], dtype="float64")
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.numpy()]


def average_running_stats(model: nn.Layer, world: int) -> None:
    """Average BatchNorm running statistics over ranks (gradients never touch them, so each rank's
    drift apart); afterwards every rank holds the same full state dict and evaluates the same model."""
    if world == 1:
        return
    for tensor in [*model.buffers(), *[p for p in model.parameters() if p.stop_gradient]]:
        if paddle.is_floating_point(tensor):
            dist.all_reduce(tensor)
            tensor.set_value(tensor / world)


def replica_fingerprints(model: nn.Layer, world: int) -> List[str]:
    """A 56-bit hash of each rank's full state dict, from every rank: equal when replicas are in sync."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.numpy().tobytes())
    local = int.from_bytes(digest.digest()[:7], "big")  # fits an int64 tensor
    if world == 1:
        return [f"{local:014x}"]
    gathered: List[paddle.Tensor] = []
    dist.all_gather(gathered, paddle.to_tensor([local], dtype="int64"))
    return [f"{int(t.numpy()[0]):014x}" for t in gathered]
