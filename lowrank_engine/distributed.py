"""Several processes, one compression: torch.distributed with NCCL on GPUs, gloo on CPUs.

Launch with `torchrun --nproc-per-node N -m lowrank_engine.cli compress ...`. Each rank streams
its share of the calibration windows through the blocks; the statistics are summed with
all-reduce, each group's solve runs on one rank, and the factors are broadcast, so every rank
holds the same compressed block before the streams move on. Rank 0 writes the output.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    # non-owner ranks wait while one rank whitens a 28672-wide metric, which on a CPU takes long
    minutes = float(os.environ.get("LOWRANK_ENGINE_DIST_TIMEOUT_MIN", "180"))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", timeout=datetime.timedelta(minutes=minutes))
    return device


def shutdown(failed: bool) -> None:
    """A failing rank exits at once: its peers' collectives then fail instead of waiting for the timeout."""
    if not dist.is_initialized():
        return
    if failed:
        os._exit(2)
    dist.destroy_process_group()


def shard(input_ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows."""
    if not active():
        return input_ids
    if input_ids.shape[0] < world_size():
        raise ValueError(f"{input_ids.shape[0]} calibration windows cannot be split over {world_size()} processes")
    return torch.tensor_split(input_ids, world_size())[rank()]


def all_reduce_sum_(*tensors) -> None:
    if active():
        for t in tensors:
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_max_(t: torch.Tensor) -> None:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def _collective_device() -> str:
    """NCCL only reduces GPU tensors; gloo takes CPU ones."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks."""
    if not active():
        return t
    out = t.to(_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def all_reduce_max(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def broadcast_object(obj, src: int):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    if active():
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    if active():
        dist.barrier()


def reduce_statistics(stats, diagonal: Optional[str] = None) -> None:
    """Sum a group's single-stream statistics over the processes (a no-op in one): A or the output
    covariances, and D with its token count (D's maximum for absmax)."""
    all_reduce_sum_(stats.A, *(stats.outputs or {}).values())
    if stats.D is not None:
        stats.tokens = int(all_reduce_sum_tensor(torch.tensor([stats.tokens])))
        if diagonal == "absmax":
            all_reduce_max_(stats.D)
        else:
            all_reduce_sum_(stats.D)


def owner(index: int) -> int:
    """The process that solves the index-th group of a block (groups are dealt round-robin)."""
    return index % world_size()


def broadcast_factors(factors: Optional[dict], shapes: dict, dtype: torch.dtype, device, src: int) -> dict:
    """One group's factors on every process, from the process `src` that solved them (`factors` is None
    elsewhere); `shapes`: linear → (out, in). A no-op in one process."""
    from lowrank_engine.solvers import Factors

    if not active():
        return factors
    meta = broadcast_object({n: (f.rank, f.beta, f.sigma.numel(), f.sigma_rank) for n, f in factors.items()}
                            if factors is not None else None, src=src)
    out = {}
    for name, (k, beta, n_sigma, sigma_rank) in meta.items():  # the group's compressed linears
        if factors is None:
            m, n = shapes[name]
            empty = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
            f = Factors(U=empty(m, k), V=empty(n, k), sigma=empty(n_sigma), rank=k, beta=beta, sigma_rank=sigma_rank)
        else:
            f = factors[name]
            f.U, f.V, f.sigma = (t.to(device, dtype).contiguous() for t in (f.U, f.V, f.sigma))
        for t in (f.U, f.V, f.sigma):
            broadcast_(t, src=src)
        out[name] = f
    return out
