"""Running on several processes with PyTorch's own distributed engine (``torch.distributed``).

The one place that knows about ranks. A process started by ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) joins the process group with
:func:`init_from_env`; any other process is the single rank 0 of a world of 1 and every helper
here is then a no-op returning the one-process answer, so callers never branch on "distributed or
not" except where the work itself is split.

* backend: ``nccl`` when the device is a GPU, ``gloo`` on CPU (:func:`backend_for`);
* device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process);
* :func:`current` / :func:`is_main`: the rank of this process (rank 0 logs, shows progress bars and
  writes files);
* collectives: :func:`barrier`, :func:`all_gather_objects` (pickled Python objects, e.g. per-image
  certification results), :func:`all_reduce_sum_`, :func:`average_buffers_`, :func:`broadcast_object`;
* :func:`rank_seed`: a per-rank seed (rank 0 keeps the one-process random stream).

Collectives must be called by every rank in the same order (else the ranks wait for each other
until the timeout): the trainer and the CLI call them at the same points on every rank. The
timeout is ``LIRPA_DEQ_DIST_TIMEOUT_MIN`` minutes (default 1440): a certification rank may wait at
the final gather for as long as the slowest rank still works.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch

__all__ = ["Context", "SINGLE", "launched_by_torchrun", "backend_for", "init_from_env", "current", "is_main",
           "barrier", "all_gather_objects", "broadcast_object", "all_reduce_sum_", "average_buffers_",
           "rank_seed", "shutdown"]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_JOINED = []  # [True] once init_from_env created the process group (shutdown leaves others' alone)


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` in [0, world_size), ``local_rank`` on its machine,
    ``backend`` ('gloo' / 'nccl'; None when no process group is initialised)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Any = None

    @property
    def enabled(self) -> bool:
        """True in a process group (even a world of 1 under ``torchrun --nproc_per_node 1``)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def launched_by_torchrun(environ=None) -> bool:
    """Whether the launcher's variables RANK, WORLD_SIZE and LOCAL_RANK are all set."""
    env = os.environ if environ is None else environ
    return all(k in env for k in ENV_VARS)


def backend_for(device) -> str:
    """'nccl' for a CUDA device, else 'gloo'."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _timeout() -> datetime.timedelta:
    text = os.environ.get("LIRPA_DEQ_DIST_TIMEOUT_MIN", "1440")
    try:
        minutes = float(text)
    except ValueError:
        raise ValueError(f"LIRPA_DEQ_DIST_TIMEOUT_MIN must be a number of minutes, got {text!r}") from None
    if not minutes > 0:
        raise ValueError(f"LIRPA_DEQ_DIST_TIMEOUT_MIN must be > 0, got {text!r}")
    return datetime.timedelta(minutes=minutes)


def init_from_env(device="cpu"):
    """Join the process group described by torchrun's environment (once per process).

    Returns ``(context, device)``: ``device`` with a bare 'cuda' made 'cuda:LOCAL_RANK' (and set
    as the current CUDA device). Without torchrun's variables: ``(SINGLE, device)``, nothing
    initialised. ValueError (one line) when ``torch.distributed`` or the backend is missing or
    the variables are malformed."""
    if not launched_by_torchrun():
        return current(), str(device)
    import torch.distributed as dist

    try:
        rank, world, local = (int(os.environ[k]) for k in ENV_VARS)
    except ValueError:
        raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: run in one process (without torchrun)")
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = backend_for(dev)
    available = dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()
    if not available:
        raise ValueError(f"torch.distributed backend {backend!r} (for --device {device}) is not available in "
                         "this torch build")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=_timeout())
        _JOINED.append(True)
    return current(local_rank=local), str(dev)


def current(local_rank=None) -> Context:
    """This process's :class:`Context` (``SINGLE`` outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else int(local_rank)
    return Context(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def is_main() -> bool:
    """True on rank 0 (and in every process outside a process group)."""
    return current().is_main


def barrier() -> None:
    if current().enabled:
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(obj) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process). ``obj``
    must pickle; tensors in it are best moved to the CPU first."""
    ctx = current()
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not current().enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if current().enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def average_buffers_(module: torch.nn.Module) -> None:
    """Replace every floating-point buffer of ``module`` (BatchNorm running mean / variance) by its
    mean over the ranks, in place. Integer buffers (``num_batches_tracked``) are equal on every rank
    and left alone."""
    ctx = current()
    if not ctx.enabled or ctx.world_size == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            all_reduce_sum_(buf).div_(ctx.world_size)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank ``rank`` of a run seeded ``seed``, distinct per rank (rank 0: ``seed``)."""
    return int(seed) if rank == 0 else (int(seed) * 1_000_003 + 7919 * int(rank)) % (2 ** 63 - 1)


def shutdown() -> None:
    """Leave the process group if :func:`init_from_env` created it (a group the caller made is
    left alone)."""
    import torch.distributed as dist

    if _JOINED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _JOINED.clear()
