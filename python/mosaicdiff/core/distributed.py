"""torch.distributed helpers: the same code runs in one process and under ``torchrun``.

Every helper works with and without an initialised process group: without one the world is
one process of rank 0 and the collectives do nothing, so a single-process run takes exactly the
code path (and gives exactly the results) it took before data parallelism existed.

Collectives (`all_reduce_sums`, `check_same_across_ranks`, `check_same_tensor`, `run_on_main`,
`barrier`) must be called by every rank in the same order, as any torch.distributed collective.
With NCCL, set the rank's device first (``torch.cuda.set_device(LOCAL_RANK)``, as
`launched_process_group` does); the object collectives use it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sums", "barrier", "batch_shard", "check_same_across_ranks", "check_same_tensor",
           "is_distributed", "is_main_process", "launched_process_group", "rank", "rank_device", "run_on_main",
           "spawn_local", "state_digest", "tensors_digest", "world_size"]


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and shows progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def batch_shard(num_rows: int, batch_size: int, rank_: int | None = None, world: int | None = None) -> range:
    """The row offsets of the model batches of one rank: whole batches, contiguous, balanced.

    The batches are those of a single process (``[0, b), [b, 2b), ...``), dealt out in
    contiguous runs, so every row is run in the same batch as in one process and the forward
    passes are the same; only the order in which the sums are added differs. With fewer batches
    than ranks, the last ranks get none (their sums are zero).

    Args:
        num_rows (`int`): rows in all (B).
        batch_size (`int`): rows per model batch.
        rank_ (`int`, *optional*): the rank (default: this process's).
        world (`int`, *optional*): the world size (default: this process group's).

    Returns:
        `range` of the batch start offsets of `rank_` (a sub-range of ``range(0, B, batch_size)``).
    """
    rank_ = rank() if rank_ is None else int(rank_)
    world = world_size() if world is None else int(world)
    starts = range(0, int(num_rows), int(batch_size))
    n = len(starts)
    return starts[rank_ * n // world:(rank_ + 1) * n // world]


def all_reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor of `sums` over the ranks, in place (e.g. float64 Hessian sums ``X^T X``).

    One all-reduce per tensor (no flattened copy: a DiT-XL block's fc2 Hessian alone is 170 MB
    of float64). The result is the same on every rank. Without a process group: unchanged.

    Returns:
        `sums`, its tensors now holding the sums over all ranks.
    """
    if is_distributed():
        for name in sorted(sums):  # the same order on every rank
            dist.all_reduce(sums[name], op=dist.ReduceOp.SUM)
    return sums


def check_same_tensor(value: torch.Tensor, what: str) -> None:
    """Raise on every rank if `value` (a small float tensor) differs between ranks.

    Uses two all-reduces (min and max) on the tensor's own device, so it works with any backend.

    Raises:
        ValueError: the ranks disagree (on every rank, so none is left waiting in a collective).
    """
    if not is_distributed():
        return
    low, high = value.detach().clone().to(torch.float64), value.detach().clone().to(torch.float64)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError(f"the {world_size()} ranks disagree on {what}; launch every rank with the same seed, "
                         f"data and settings")


def check_same_across_ranks(settings: dict[str, Any], what: str = "the settings",
                            advice: str = "every rank must get the same command line") -> None:
    """Raise on every rank if `settings` (a dict of plain values) is not the same on all ranks.

    Args:
        advice (`str`, *optional*): what to do, ending the message.

    Raises:
        ValueError: naming the first keys that differ and their value per rank.
    """
    if not is_distributed():
        return
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, settings)
    keys = sorted({k for g in gathered for k in g}, key=str)
    differ = [k for k in keys if any(g.get(k) != gathered[0].get(k) for g in gathered)]
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {g.get(k)!r}" for r, g in enumerate(gathered))
                           for k in differ[:3])
        raise ValueError(f"the ranks were launched with different {what} ({detail}); {advice}")


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and give its result, or raise its error, on every rank.

    For work only one rank may do (reading and writing a shared folder): the other ranks wait,
    and an error on rank 0 is raised on all of them (same type and message) instead of leaving
    them blocked in the next collective.

    Returns:
        `fn()`'s return value (it must be picklable under a process group).
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def tensors_digest(named: Iterable[tuple[str, Any]]) -> str:
    """A SHA-256 of named values: tensors by name, dtype, shape and bytes (the same on any device),
    anything else by name and ``repr``."""
    import hashlib

    h = hashlib.sha256()
    for name, value in named:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{data.dtype}|{tuple(value.shape)}|".encode())
            h.update(data.view(torch.uint8).numpy())  # the buffer, no copy
        else:
            h.update(f"{name}|{value!r}|".encode())
    return h.hexdigest()


def state_digest(module: torch.nn.Module | None) -> str | None:
    """A SHA-256 of a module's state (names, dtypes, shapes, bytes): the same model on any device.

    For comparing ranks (`check_same_across_ranks`) and for recognising a model across runs
    (the sharded sampler's manifest). Each tensor is copied to the CPU once (seconds for DiT-XL/2).
    None for None.
    """
    return None if module is None else tensors_digest(module.state_dict().items())


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher (one GPU per rank)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


@contextlib.contextmanager
def launched_process_group(device: str = "cpu", timeout_s: float | None = None) -> Iterator[str]:
    """Initialise the process group a launcher (``torchrun``) describes in the environment, if any.

    Under ``torchrun`` (``WORLD_SIZE`` set) and with no group yet: ``init_process_group`` with
    NCCL for a CUDA device (after ``torch.cuda.set_device(LOCAL_RANK)``) or gloo otherwise, torn
    down on exit (after a barrier when the body succeeded, so that rank 0 finishes writing before
    the others end). Without a launcher, or with a group the caller made: nothing.

    Args:
        device (`str`): the requested device (``cuda`` is mapped to the rank's GPU).
        timeout_s (`float`, *optional*): collective timeout (default: torch's).

    Yields:
        `str`: the device this rank should use.
    """
    device = rank_device(device)
    if is_distributed() or "WORLD_SIZE" not in os.environ:
        yield device
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kwargs)
    try:
        yield device
        dist.barrier()  # done: leave together (not after an error, when a peer may be in another collective)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- local launches

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    fn(*args)


def spawn_local(fn: Callable, nprocs: int, args: tuple = (), timeout_s: float = 120.0) -> None:
    """Run ``fn(*args)`` in `nprocs` fresh processes with the environment ``torchrun`` would set.

    A CPU rehearsal of a one-node ``torchrun --nproc-per-node nprocs`` launch (tests, gloo):
    each process gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
    and calls `fn` (a module-level function), which initialises the group itself (env://), e.g.
    through `launched_process_group`. When one process fails, the others are terminated, as
    ``torchrun`` does.

    Raises:
        TimeoutError: the processes were still running after `timeout_s` (they are killed).
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: a process failed.
    """
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(_spawned, args=(fn, nprocs, _free_port(), tuple(args)), nprocs=nprocs,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"spawn_local: {nprocs} processes still running after {timeout_s:g} s")
